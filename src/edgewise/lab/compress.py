"""``edgewise compress``: prune -> distill (or fine-tune) -> export -> optimize, measured at every stage.

Python API (any model)::

    from edgewise.lab.compress import compress
    report = compress(model, data, out_dir="out", ratio=0.5, profile="rpi5")   # model: nn.Module
    print(report.to_markdown())

``data`` is a :class:`.datasets.DataSplit` (numpy ``x_train, y_train, x_test, y_test``;
``DataSplit(x_tr, y_tr, x_te, y_te)`` wraps a user's arrays). The command line cannot
take torch code, so it takes one of the built-in examples (``--model digits-cnn``) or a
user's factory (``--module pkg.module:factory``, a zero-argument callable returning an
``nn.Module``; ``--weights state_dict.pt`` to load trained weights) with the user's data
(``--data file.npz``: see :func:`.datasets.load_npz`); see :func:`resolve_model`.

Stages, each exported to ONNX in ``out_dir`` and measured the same way (ONNX Runtime,
CPU, one thread, batch 1; accuracy from the ONNX graph on the test split):

1. ``original``   the model as given
2. ``pruned``     channels removed (:func:`.prune.structured_prune`), before recovery
3. ``distilled``  (or ``fine-tuned``) accuracy recovered: the pruned model as student of
                  the original (Hinton loss, :mod:`.distill`), or plain fine-tuning
4. ``optimized``  the best variant from ``edgewise.lab.optimize.optimize`` within
                  ``max_accuracy_drop`` (e.g. int8 quantization); skipped with ``optimize=False``

``report.json`` and ``report.md`` in ``out_dir`` hold every stage's figures.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import DataSplit, load_npz
from .torch_models import TrainConfig, TrainResult, builtin, clone, example_input, model_stats, train

Progress = Callable[[str], None]


class CompressError(ValueError):
    """A compress/prune/distill request that cannot run as given (its message says what to change)."""


# --------------------------------------------------------------------------- what the user gives


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """``"pkg.module:factory"`` -> the callable (the current directory is importable, as for ``python -m``)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise CompressError(f"--module must look like pkg.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CompressError(f"cannot import {mod_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CompressError(f"{mod_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise CompressError(f"{spec} is not callable")
    return obj  # type: ignore[no-any-return]


@dataclass
class ResolvedModel:
    """A model and its data, ready for the lab: what the CLI built from its options."""

    name: str
    model: nn.Module
    data: DataSplit
    factory: Callable[..., nn.Module] | None
    training: TrainResult | None = None
    config: TrainConfig = field(default_factory=TrainConfig)  # the schedule that suits this model and data

    @property
    def recovery_epochs(self) -> int:
        """Default fine-tuning/distillation epochs after pruning: half the training schedule."""
        return max(1, self.config.epochs // 2)


def resolve_model(
    model: str | None = None,
    *,
    module: str | None = None,
    data: str | Path | None = None,
    weights: str | Path | None = None,
    train_epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> ResolvedModel:
    """Build the model the command line names, with its data, trained if it has to be.

    * ``model="digits-cnn"`` (a built-in): its own data, or ``data`` (an .npz of the same
      input shape); trained with its default schedule (or ``train_epochs``) unless
      ``weights`` (a ``state_dict`` file) is given.
    * ``module="pkg.module:factory"``: ``factory()`` returns the user's ``nn.Module``,
      already trained or loaded with ``weights``; ``data`` (.npz) is required;
      ``train_epochs > 0`` trains it first.
    """
    if (model is None) == (module is None):
        raise CompressError("give one of --model (a built-in example) or --module pkg.module:factory")
    split = load_npz(data) if data is not None else None
    if module is not None:
        factory = load_factory(module)
        if split is None:
            raise CompressError("--module needs --data file.npz (keys x_train, y_train, x_test, y_test)")
        torch.manual_seed(seed)
        try:
            net = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code: report it, whatever it raised
            raise CompressError(f"{module}() failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(net, nn.Module):
            raise CompressError(f"{module}() returned {type(net).__name__}, not a torch nn.Module")
        name = module.rpartition(":")[2]
        epochs = train_epochs or 0
        cfg = TrainConfig(epochs=max(epochs, 10), lr=lr or 3e-3, seed=seed)
    else:
        spec = builtin(model)  # type: ignore[arg-type]
        factory = spec.factory
        split = split if split is not None else spec.load_data()
        torch.manual_seed(seed)
        net = spec.build()
        name = spec.name
        epochs = spec.train_config.epochs if train_epochs is None and weights is None else (train_epochs or 0)
        cfg = replace(spec.train_config, lr=lr or spec.train_config.lr, seed=seed)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            net.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, TypeError) as exc:
            raise CompressError(f"cannot load weights {weights}: {exc}") from None
    _check_fits(net, split, name)
    result = None
    if epochs > 0:
        (progress or (lambda _m: None))(f"training {name} for {epochs} epochs")
        result = train(net, split, epochs, cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                       seed=seed, progress=progress)
    net.eval()
    return ResolvedModel(name=name, model=net, data=split, factory=factory, training=result, config=cfg)


def _check_fits(model: nn.Module, data: DataSplit, name: str) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input(data, 2))
    except Exception as exc:  # noqa: BLE001 - any failure here means the data does not fit the model
        raise CompressError(f"{name} cannot take inputs of shape {data.sample_shape}: {exc}") from None
    if out.ndim != 2:
        raise CompressError(f"{name} must return class logits of shape (batch, classes), got {tuple(out.shape)}")
    top = int(max(data.y_train.max(), data.y_test.max()))
    if top >= out.shape[1]:
        raise CompressError(f"labels go up to {top} but {name} has {out.shape[1]} outputs")


# --------------------------------------------------------------------------- one measured stage


@dataclass
class StageReport:
    """Figures of one stage of the chain; ``size_bytes`` is the ONNX file, latency is ORT batch 1."""

    stage: str
    params: int
    macs: int
    size_bytes: int
    accuracy: float
    latency_ms: float | None = None
    onnx: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export_stage(stage: str, model: nn.Module, data: DataSplit, path: Path, *, input_name: str = "x", note: str = "") -> StageReport:
    """Export ``model`` to ``path`` (checked against torch) and fill in params, MACs, size, ONNX accuracy."""
    from .export import export_onnx, onnx_accuracy

    model.eval()
    ex = example_input(data, 2)
    stats = model_stats(model, ex[:1])
    res = export_onnx(model, ex, path, input_name=input_name)
    return StageReport(
        stage=stage, params=stats.params, macs=stats.macs, size_bytes=res.size_bytes,
        accuracy=onnx_accuracy(path, data.x_test, data.y_test), onnx=str(path), note=note,
    )


def measure_latencies(stages: Sequence[StageReport], example: np.ndarray, runs: int = 200, rounds: int = 3) -> None:
    """Fill ``latency_ms`` (ORT, 1 thread, batch of ``example``): rounds interleave the stages, median of p50s."""
    from .export import measure_latency

    runs_per_round = max(1, runs // rounds)
    samples: dict[int, list[float]] = {i: [] for i, s in enumerate(stages) if s.onnx}
    for _ in range(rounds):
        for i in samples:
            samples[i].append(measure_latency(stages[i].onnx, example, runs=runs_per_round, warmup=5).p50_ms)  # type: ignore[arg-type]
    for i, vals in samples.items():
        stages[i].latency_ms = float(np.median(vals))


# --------------------------------------------------------------------------- the report


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


@dataclass
class LabReport:
    """What ``compress``, ``prune`` or ``distill`` did: one :class:`StageReport` per stage, plus details."""

    command: str
    name: str
    out_dir: Path
    stages: list[StageReport]
    settings: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    final_onnx: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command, "name": self.name, "out_dir": str(self.out_dir), "final_onnx": self.final_onnx,
            "settings": self.settings, "stages": [s.to_json() for s in self.stages], **self.details,
            "seconds": self.seconds, "notes": self.notes,
        }

    def to_markdown(self) -> str:
        return stages_markdown(f"edgewise {self.command}: {self.name}", self.stages, self.settings, self.notes)

    def write(self) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``out_dir``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        j, m = self.out_dir / "report.json", self.out_dir / "report.md"
        j.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        m.write_text(self.to_markdown())
        return j, m


CompressReport = LabReport


def stages_markdown(title: str, stages: Sequence[StageReport], settings: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """A Markdown report: one row per stage, ratios against the first stage."""
    base = stages[0]
    lines = [f"# {title}", "", "| stage | params | MACs | ONNX size | latency p50 (ms, b=1) | accuracy | vs first |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        lat = f"{s.latency_ms:.3f}" if s.latency_ms is not None else "-"
        rel = (f"{s.params / base.params:.0%} params, {s.macs / base.macs:.0%} MACs, {s.size_bytes / base.size_bytes:.0%} size, "
               f"{(s.accuracy - base.accuracy) * 100:+.1f} pt accuracy") if s is not base else ""
        lines.append(f"| {s.stage} | {s.params:,} | {s.macs:,} | {_fmt_bytes(s.size_bytes)} | {lat} | {s.accuracy:.2%} | {rel} |")
    lines += ["", "Latency: ONNX Runtime, CPU, 1 intra-op thread, batch 1, median over interleaved rounds, on the machine "
              "that ran the lab. Accuracy: the ONNX graph on the test split. Size: the ONNX file.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    for s in stages:
        if s.note:
            lines.append(f"- **{s.stage}**: {s.note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the chain


def _optimize_fn() -> Callable[..., Any]:
    try:
        from .optimize import optimize  # type: ignore[attr-defined]
    except ImportError as exc:
        raise CompressError(
            f"the optimize step needs edgewise.lab.optimize, which cannot be imported here ({exc}); "
            "pass --skip-optimize (optimize=False) to stop after export"
        ) from None
    return optimize  # type: ignore[no-any-return]


def compress(
    model: nn.Module,
    data: DataSplit,
    *,
    out_dir: str | Path,
    name: str = "model",
    ratio: float | None = 0.5,
    target_macs: float | None = None,
    steps: int = 1,
    recover: str = "distill",
    epochs: int = 8,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 4.0,
    alpha: float = 0.7,
    seed: int = 0,
    global_pruning: bool = False,
    optimize: bool = True,
    profile: Any = None,
    max_accuracy_drop: float = 0.01,
    recipes: Sequence[str] | None = None,
    calibration_size: int = 256,
    latency_runs: int = 200,
    input_name: str = "x",
    progress: Progress | None = None,
) -> LabReport:
    """Prune ``model`` (a copy), recover its accuracy, export and optimize it; measure and report every stage.

    ``ratio`` / ``target_macs`` / ``steps`` / ``global_pruning``: see :func:`.prune.structured_prune`
    (with ``steps > 1`` the intermediate steps are fine-tuned for ``epochs``, the last one is
    recovered by ``recover``). ``recover``: ``"distill"`` (the original model teaches the pruned one,
    ``temperature``, ``alpha``), ``"finetune"`` (cross-entropy) or ``"none"``; ``epochs`` of it.
    ``optimize``/``profile``/``max_accuracy_drop``/``recipes``: passed to
    ``edgewise.lab.optimize.optimize`` with ``calibration_size`` training samples for
    calibration and the test split for evaluation. Writes ONNX files, ``report.json`` and
    ``report.md`` (and ``compressed.pth``, a torch-pruning state dict) to ``out_dir``.
    """
    from .distill import distillation_loss
    from .prune import PruneError, structured_prune

    say = progress or (lambda _m: None)
    if recover not in ("distill", "finetune", "none"):
        raise CompressError(f"recover must be 'distill', 'finetune' or 'none', got {recover!r}")
    if target_macs is not None:
        ratio = None
    if ratio is not None and not 0 < ratio < 1:
        raise CompressError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    if not 0 <= max_accuracy_drop < 1:
        raise CompressError(f"max_accuracy_drop must be in [0, 1), got {max_accuracy_drop}")
    optimize_fn = _optimize_fn() if optimize else None  # fail before any work if it cannot run
    if optimize:
        _require_profile(profile)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "ratio": ratio, "target_macs": target_macs, "steps": steps, "global_pruning": global_pruning,
        "recover": recover, "epochs": epochs, "lr": lr, "batch_size": batch_size, "temperature": temperature,
        "alpha": alpha, "seed": seed, "optimize": optimize, "profile": str(profile) if profile is not None else None,
        "max_accuracy_drop": max_accuracy_drop, "recipes": list(recipes) if recipes else None,
        "train_samples": len(data.x_train), "test_samples": len(data.x_test), "input_shape": list(data.sample_shape),
        "torch_threads": torch.get_num_threads(),
    }
    teacher = clone(model).eval()
    stages: list[StageReport] = []
    notes: list[str] = []

    say("exporting the original model")
    stages.append(export_stage("original", teacher, data, out_dir / "original.onnx", input_name=input_name))

    say(f"pruning ({'ratio ' + str(ratio) if ratio is not None else 'target MACs ' + str(target_macs)}, {steps} step(s))")
    try:
        pruned = structured_prune(
            teacher, example_input(data, 2), ratio=ratio, target_macs=target_macs, steps=steps, data=data,
            finetune_epochs=epochs if steps > 1 else 0, lr=lr, batch_size=batch_size, seed=seed,
            global_pruning=global_pruning, finetune_last_step=False, progress=say,
        )
    except PruneError as exc:
        raise CompressError(str(exc)) from None
    if not pruned.target_met:
        notes.append(f"MAC target not reached: {pruned.after.macs:,} MACs (pruning stops at 90% of a layer's channels)")
    stages.append(export_stage("pruned", pruned.model, data, out_dir / "pruned.onnx", input_name=input_name,
                               note="channels removed, before recovery" + (" (intermediate steps fine-tuned)" if steps > 1 else "")))

    student = pruned.model
    distill_info = None
    if recover != "none" and epochs > 0:
        if recover == "distill":
            say(f"distilling the original into the pruned model ({epochs} epochs, T={temperature}, alpha={alpha})")
            run = train(student, data, epochs, lr, batch_size=batch_size, seed=seed,
                        loss_fn=distillation_loss(clone(teacher), temperature, alpha), progress=say)
            stage_name, note = "distilled", f"pruned model trained as student of the original (T={temperature}, alpha={alpha})"
        else:
            say(f"fine-tuning the pruned model ({epochs} epochs)")
            run = train(student, data, epochs, lr, batch_size=batch_size, seed=seed, progress=say)
            stage_name, note = "fine-tuned", "pruned model fine-tuned with cross-entropy"
        distill_info = {"mode": recover, "training": run.to_json()}
        stages.append(export_stage(stage_name, student, data, out_dir / f"{stage_name}.onnx", input_name=input_name, note=note))
    student.eval()
    _save_torch(student, out_dir / "compressed.pth")
    final = Path(stages[-1].onnx)  # type: ignore[arg-type]

    opt_info = None
    if optimize_fn is not None:
        opt_info, opt_stage = _run_optimize(optimize_fn, final, data, stages[-1], out_dir / "optimize", profile=profile,
                                            max_accuracy_drop=max_accuracy_drop, recipes=recipes,
                                            calibration_size=calibration_size, input_name=input_name, progress=say)
        if opt_stage is not None:
            stages.append(opt_stage)
            final = Path(opt_stage.onnx)  # type: ignore[arg-type]
        if not opt_info.get("ok", True) or opt_stage is None:
            reason = opt_info.get("reason") or "no variant within the accuracy budget"
            notes.append(f"optimize chose nothing ({reason}); the final model is the {stages[-1].stage} FP32 one")
    say("measuring latency")
    measure_latencies(stages, example_input(data, 1).numpy(), runs=latency_runs)
    report = LabReport(
        command="compress", name=name, out_dir=out_dir, stages=stages, settings=settings,
        details={"prune": pruned.to_json(), "recover": distill_info, "optimize": opt_info},
        final_onnx=str(final), seconds=time.perf_counter() - start, notes=notes,
    )
    report.write()
    return report


def _save_torch(model: nn.Module, path: Path) -> None:
    """A torch-pruning state dict: weights and the pruned layer shapes (``tp.load_state_dict(Factory(), torch.load(p))``)."""
    import torch_pruning as tp

    torch.save(tp.state_dict(model), path)


def _require_profile(profile: Any) -> None:
    if profile is None:
        from . import optimize as opt_mod  # type: ignore[attr-defined]

        names = getattr(opt_mod, "list_profiles", lambda: [])()
        raise CompressError(
            "the optimize step needs the target device's profile: --profile "
            + (" | ".join(names) if names else "NAME") + " (or a profile file), or --skip-optimize"
        )


def _run_optimize(optimize_fn: Callable[..., Any], model_path: Path, data: DataSplit, prev: StageReport, out_dir: Path, *,
                  profile: Any, max_accuracy_drop: float, recipes: Sequence[str] | None, calibration_size: int,
                  input_name: str, progress: Progress) -> tuple[dict[str, Any], StageReport | None]:
    from . import optimize as opt_mod  # type: ignore[attr-defined]
    from .export import onnx_accuracy

    _require_profile(profile)
    progress(f"optimizing {model_path.name} for profile {profile}")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permutation(len(data.x_train))[:calibration_size])

    def relay(message: Any = "", *_rest: Any, **_kw: Any) -> None:
        progress(str(message))

    errors: tuple[type[BaseException], ...] = tuple(
        e for e in (getattr(opt_mod, "OptimizeError", None),) if isinstance(e, type)
    ) or (ValueError,)
    try:
        result = optimize_fn(
            model_path, {input_name: data.x_train[idx]}, {input_name: data.x_test, "y": data.y_test}, profile,
            max_accuracy_drop=max_accuracy_drop, out_dir=out_dir, recipes=list(recipes) if recipes else None,
            progress=relay,
        )
    except errors as exc:
        raise CompressError(f"optimize: {exc}") from None
    info = result.to_json() if hasattr(result, "to_json") else {"result": repr(result)}
    info = json.loads(json.dumps(info, default=str))
    info.setdefault("ok", bool(getattr(result, "ok", True)))
    chosen = getattr(result, "chosen", None)
    path = Path(chosen.path) if chosen is not None and getattr(chosen, "path", None) else None
    if path is not None and not path.is_absolute() and not path.exists():
        path = out_dir / path
    if path is None or not path.exists():
        return info, None
    recipe = str(getattr(chosen, "recipe", "") or getattr(chosen, "name", "") or "")
    runtime = getattr(chosen, "runtime", None)
    stage = StageReport(
        stage="optimized", params=prev.params, macs=prev.macs, size_bytes=path.stat().st_size,
        accuracy=onnx_accuracy(path, data.x_test, data.y_test), onnx=str(path),
        note=f"{getattr(chosen, 'name', recipe)} chosen by edgewise optimize for {profile} "
             "(same graph as the stage before: params/MACs carried over; latency here is the same 1-thread "
             "batch-1 measure as the other rows, the optimizer's tuned figures are in report.json)",
        extra={"recipe": recipe, "variant": getattr(chosen, "name", None),
               "runtime": runtime.to_runtime() if hasattr(runtime, "to_runtime") else None,
               "optimizer_latency_ms": getattr(chosen, "latency_ms", None)},
    )
    return info, stage


# --------------------------------------------------------------------------- prune and distill, reported alike


def run_prune(
    model: nn.Module,
    data: DataSplit,
    *,
    out_dir: str | Path,
    name: str = "model",
    ratio: float | None = 0.5,
    target_macs: float | None = None,
    steps: int = 1,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    global_pruning: bool = False,
    importance: str = "l2",
    unstructured: float | None = None,
    latency_runs: int = 200,
    input_name: str = "x",
    progress: Progress | None = None,
) -> LabReport:
    """Structured pruning with fine-tuning (``epochs`` after each step), exported and measured.

    Stages: ``original``, ``pruned`` (right after the last cut), ``fine-tuned``. With
    ``unstructured=0.5`` a ``sparse-50%`` stage shows magnitude pruning of the original at that
    amount for contrast: same params, MACs, file size and latency (the zeros are still
    multiplied), only its zlib-compressed size shrinks.
    """
    from .prune import PruneError, structured_prune, unstructured_prune, weight_sparsity

    say = progress or (lambda _m: None)
    if target_macs is not None:
        ratio = None
    if unstructured is not None and not 0 < unstructured < 1:
        raise CompressError(f"unstructured amount must be between 0 and 1 (exclusive), got {unstructured}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = clone(model).eval()
    stages = [export_stage("original", model, data, out_dir / "original.onnx", input_name=input_name)]
    try:
        res = structured_prune(
            model, example_input(data, 2), ratio=ratio, target_macs=target_macs, steps=steps, data=data,
            finetune_epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, importance=importance,
            global_pruning=global_pruning, finetune_last_step=False, progress=say,
        )
    except PruneError as exc:
        raise CompressError(str(exc)) from None
    stages.append(export_stage("pruned", res.model, data, out_dir / "pruned.onnx", input_name=input_name,
                               note="channels removed, before the last fine-tuning"))
    if epochs > 0:
        say(f"fine-tuning the pruned model ({epochs} epochs)")
        train(res.model, data, epochs, lr, batch_size=batch_size, seed=seed + steps)
        stages.append(export_stage("fine-tuned", res.model, data, out_dir / "fine-tuned.onnx", input_name=input_name,
                                   note=f"{epochs} epochs of fine-tuning after {'each' if steps > 1 else 'the'} step"))
    _save_torch(res.model, out_dir / "pruned.pth")
    details: dict[str, Any] = {"prune": res.to_json()}
    notes = [] if res.target_met else [f"MAC target not reached: {res.after.macs:,} MACs"]
    if unstructured is not None:
        import zlib

        say(f"magnitude-pruning {unstructured:.0%} of the original's weights for comparison")
        sparse = unstructured_prune(model, unstructured)
        tag = f"sparse-{unstructured:.0%}"
        st = export_stage(tag, sparse, data, out_dir / f"{tag}.onnx", input_name=input_name)
        dense_raw, sparse_raw = Path(stages[0].onnx).read_bytes(), Path(st.onnx).read_bytes()  # type: ignore[arg-type]
        sp = weight_sparsity(sparse)
        st.note = (f"unstructured l1 magnitude pruning of the original, {sp['total']:.0%} of conv/linear weights zero: "
                   "same tensors, so same params, MACs, file size and dense-kernel latency; "
                   f"zlib size {len(zlib.compress(dense_raw, 6)):,} -> {len(zlib.compress(sparse_raw, 6)):,} B")
        st.extra = {"sparsity": sp["total"], "zlib_bytes_original": len(zlib.compress(dense_raw, 6)),
                    "zlib_bytes": len(zlib.compress(sparse_raw, 6))}
        stages.append(st)
        details["unstructured"] = {"amount": unstructured, "sparsity": sp, "zlib_bytes_original": st.extra["zlib_bytes_original"],
                                   "zlib_bytes": st.extra["zlib_bytes"]}
    say("measuring latency")
    measure_latencies(stages, example_input(data, 1).numpy(), runs=latency_runs)
    final = next(s for s in reversed(stages) if not s.stage.startswith("sparse"))
    report = LabReport(
        command="prune", name=name, out_dir=out_dir, stages=stages, notes=notes, details=details,
        settings={"ratio": ratio, "target_macs": target_macs, "steps": steps, "epochs": epochs, "lr": lr,
                  "batch_size": batch_size, "seed": seed, "global_pruning": global_pruning, "importance": importance,
                  "unstructured": unstructured},
        final_onnx=final.onnx, seconds=time.perf_counter() - start,
    )
    report.write()
    return report


def run_distill(
    teacher: nn.Module,
    student: nn.Module,
    data: DataSplit,
    *,
    out_dir: str | Path,
    name: str = "model",
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    latency_runs: int = 200,
    input_name: str = "x",
    progress: Progress | None = None,
) -> LabReport:
    """Distill ``teacher`` into ``student`` and train the same student without a teacher; export and measure all three.

    Stages: ``teacher``, ``student`` (cross-entropy only), ``student-distilled`` (Hinton loss),
    same initial weights, seed and epochs for both students.
    """
    from .distill import distill

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = distill(teacher, student, data, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
                  batch_size=batch_size, seed=seed, compare=True, example=example_input(data, 1), progress=progress)
    assert res.baseline is not None
    stages = [
        export_stage("teacher", clone(teacher).eval(), data, out_dir / "teacher.onnx", input_name=input_name),
        export_stage("student", res.baseline, data, out_dir / "student.onnx", input_name=input_name,
                     note=f"cross-entropy only, {epochs} epochs, seed {seed}"),
        export_stage("student-distilled", res.student, data, out_dir / "student-distilled.onnx", input_name=input_name,
                     note=f"Hinton loss, T={temperature}, alpha={alpha}, same initial weights/seed/epochs"),
    ]
    torch.save(res.student.state_dict(), out_dir / "student-distilled.pt")
    (progress or (lambda _m: None))("measuring latency")
    measure_latencies(stages, example_input(data, 1).numpy(), runs=latency_runs)
    report = LabReport(
        command="distill", name=name, out_dir=out_dir, stages=stages, details={"distill": res.to_json()},
        settings={"temperature": temperature, "alpha": alpha, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
        final_onnx=stages[-1].onnx, seconds=time.perf_counter() - start,
    )
    report.write()
    return report
