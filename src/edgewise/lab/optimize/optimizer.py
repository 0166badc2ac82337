"""``optimize()``: build every candidate, measure it on this machine, choose the fastest within budget.

The steps, in order (each one reported to ``progress``):

1. refuse a target ONNX Runtime cannot run on (microcontrollers), with what would fit;
2. bind the calibration and eval data to the model, choose the metric;
3. ``quant_pre_process`` (shape inference + portable graph optimization) once;
   every recipe starts from that FP32 graph;
4. build each recipe's variant into ``out_dir`` and score it on the eval set;
5. if every full-INT8 static variant breaks the accuracy budget, search mixed precision
   (``sensitivity``) and add the result as a candidate;
6. tune each variant's runtime settings (``tuning``), then time all variants
   interleaved at batch 1 and at the profile's batch, with those settings;
7. peak memory of each in a child process;
8. choose: among variants within budget (accuracy drop ≤ budget; peak RSS ≤ the
   profile's RAM budget; batch-1 median ≤ the profile's latency budget *when measured
   on the target*: proxy figures cannot prove or break a latency budget, so they
   only warn), the fastest batch-1 median. Variants within 2 % of the fastest count
   as tied and the smallest file wins, but never one slower than FP32. FP32 is always a
   candidate, so the choice is never slower than FP32 by the report's own figures.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .data import GENERIC_INPUT_KEY, CalibrationSet, EvalSet, ModelIO, bind_inputs, check_labels, load_npz, repeat_to
from .errors import DataError, MetricError, OptimizeError, RecipeSkipped, TargetOutOfReachError
from .machine import MachineInfo
from .measure import (
    Latency,
    RuntimeSettings,
    baseline_peak_mb,
    make_session,
    probe_peak_mb,
    run_all,
    save_feed,
    time_interleaved,
)
from .metrics import Metric, choose_metric
from .profiles import DeviceProfile, load_profile
from .recipes import DEFAULT_RECIPES, StaticInt8, get_recipe

TIE_TOLERANCE = 0.02
EVAL_BATCH = 256
CALIB_BATCH = 16

Progress = Callable[[str, int, int], None]


@dataclass
class Variant:
    """One candidate model and every figure measured for it."""

    name: str
    recipe: str
    precision: str
    path: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None  # why skipped or failed
    size_bytes: int | None = None
    latency: Latency | None = None  # batch 1
    latency_batch: Latency | None = None  # the profile's batch size (None if 1 or the model cannot batch)
    peak_rss_mb: float | None = None
    model_rss_mb: float | None = None
    metric_value: float | None = None
    drop: float | None = None
    within_budget: bool = False
    budget_notes: list[str] = field(default_factory=list)
    runtime: RuntimeSettings | None = None
    tuning: list[dict[str, Any]] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)
    build_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def latency_ms(self) -> float | None:
        """Batch-1 median latency in ms (the figure the choice ranks by)."""
        return self.latency.median_ms if self.latency else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "recipe": self.recipe, "precision": self.precision,
            "path": str(self.path) if self.path else None, "file": self.path.name if self.path else None,
            "status": self.status, "reason": self.reason, "params": self.params, "size_bytes": self.size_bytes,
            "latency_ms": {
                "batch_1": self.latency.to_json() if self.latency else None,
                "batch_profile": self.latency_batch.to_json() if self.latency_batch else None,
            },
            "peak_rss_mb": self.peak_rss_mb, "model_rss_mb": self.model_rss_mb,
            "metric_value": self.metric_value, "drop": self.drop, "within_budget": self.within_budget,
            "budget_notes": self.budget_notes, "runtime": self.runtime.to_runtime() if self.runtime else None,
            "fp32_nodes": self.fp32_nodes, "build_s": round(self.build_s, 3), "tuning_trials": self.tuning,
        }


@dataclass
class OptimizeResult:
    chosen: Variant | None
    candidates: list[Variant]
    baseline: Variant
    ok: bool
    reason: str
    closest: Variant | None
    metric: dict[str, Any]
    max_accuracy_drop: float
    profile: DeviceProfile
    machine: MachineInfo
    measured_on_target: bool
    measurement: dict[str, Any]
    mixed_precision: dict[str, Any] | None
    notes: list[str]
    out_dir: Path
    model: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "edgewise-optimize-report/1",
            "model": str(self.model) if self.model else None,
            "ok": self.ok,
            "reason": self.reason,
            "chosen": self.chosen.name if self.chosen else None,
            "closest": self.closest.name if self.closest else None,
            "runtime": self.chosen.runtime.to_runtime() if self.chosen and self.chosen.runtime else None,
            "max_accuracy_drop": self.max_accuracy_drop,
            "metric": self.metric,
            "baseline": self.baseline.name,
            "measured_on_target": self.measured_on_target,
            "measurement": self.measurement,
            "machine": self.machine.to_json(),
            "profile": self.profile.to_json(),
            "mixed_precision": self.mixed_precision,
            "notes": self.notes,
            "candidates": [c.to_json() for c in self.candidates],
            "files": self.files,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _bind_calibration(calibration: Any, io: ModelIO) -> dict[str, np.ndarray]:
    if isinstance(calibration, (str, Path)):
        from .data import load_npz

        calibration = load_npz(calibration)[0]
    if isinstance(calibration, EvalSet):
        calibration = calibration.inputs
    return bind_inputs(calibration, io, what="calibration")


def _preprocessed(arrays: Mapping[str, np.ndarray], io: ModelIO, spec: Any, what: str) -> dict[str, np.ndarray]:
    """``arrays`` with the bundle's preprocessing applied to the model's first input (as the agent does)."""
    from ...data.preprocessing import PreprocessingError, PreprocessingSpec

    if not isinstance(spec, PreprocessingSpec):
        spec = PreprocessingSpec.model_validate(spec)
    first = io.inputs[0].name
    key = first if first in arrays else GENERIC_INPUT_KEY if GENERIC_INPUT_KEY in arrays else None
    if key is None:
        return dict(arrays)  # bind_inputs names what is missing
    try:
        return {**arrays, key: spec.apply(np.asarray(arrays[key]))}
    except PreprocessingError as exc:
        raise DataError(f"{what} data: the preprocessing rejects it: {exc}") from None


def _preprocess(model: Path, out: Path, notes: list[str]) -> Path:
    """quant_pre_process with fallbacks; every node gets a unique name (mixed precision needs names)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from .recipes import quiet

    done = False
    for kwargs in ({}, {"skip_symbolic_shape": True}, {"skip_symbolic_shape": True, "skip_optimization": True}):
        try:
            with quiet():
                quant_pre_process(str(model), str(out), **kwargs)
            done = True
            if kwargs:
                notes.append(f"quant_pre_process needed {kwargs}")
            break
        except Exception as exc:  # noqa: BLE001 - try the next, more conservative pre-processing
            last = exc
    proto = onnx.load(str(out) if done else str(model))
    if not done:
        notes.append(f"quant_pre_process failed ({str(last).splitlines()[0][:160]}); recipes start from the model as given")
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(proto, str(out))
    return out


def _notify(progress: Progress | None, state: dict[str, int], message: str, step: bool = True) -> None:
    if step:
        state["done"] += 1
    if progress is not None:
        progress(message, min(state["done"], state["total"]), state["total"])


def optimize(
    model: Path | str,
    calibration: Mapping[str, np.ndarray] | Path | str,
    evaluation: EvalSet | Mapping[str, Any] | Path | str,
    profile: DeviceProfile | str | Path,
    *,
    max_accuracy_drop: float = 0.01,
    out_dir: Path | str,
    metric: str | None = None,
    measure_here: bool | None = None,
    recipes: Sequence[str] | None = None,
    progress: Progress | None = None,
    preprocessing: Any = None,
) -> OptimizeResult:
    """Return the fastest variant of ``model`` within ``max_accuracy_drop`` on ``profile``, with the evidence.

    ``calibration`` and ``evaluation`` are arrays keyed by input name (or ``x``); ``evaluation``
    may carry labels ``y`` (or be an :class:`EvalSet`); either may be an ``.npz`` path.
    ``max_accuracy_drop`` is in the metric's units (accuracy: a fraction, 0.01 = 1 point).
    ``measure_here``: None decides from the profile (``DeviceProfile.matches``), True labels
    this machine as the target, False labels every figure as a proxy. ``recipes``: names
    from ``recipes.RECIPES`` (default ``DEFAULT_RECIPES``); FP32 is always added.
    ``progress(message, done, total)`` is called as work proceeds.
    ``preprocessing``: the bundle's ``PreprocessingSpec`` (or its JSON dict) when the data is raw: it is
    applied to the first input of the calibration and eval data with the one implementation the agent
    serves with, so the variants are calibrated and scored on what the device will feed them.

    Raises :class:`TargetOutOfReachError` (microcontroller-class profiles), ``ProfileError``,
    ``DataError``, ``MetricError``. A budget that no variant meets is *not* an exception:
    the result has ``ok=False``, ``chosen=None`` and ``closest`` set, and the report is written.
    """
    t_start = time.perf_counter()
    model = Path(model)
    out_dir = Path(out_dir)
    prof = load_profile(profile)
    unreachable = prof.out_of_reach()
    if unreachable:
        raise TargetOutOfReachError(unreachable)
    if not model.is_file():
        raise OptimizeError(f"model {model} does not exist")
    names = list(dict.fromkeys(["fp32", *(recipes if recipes is not None else DEFAULT_RECIPES)]))
    chosen_recipes = [get_recipe(n) for n in names]  # unknown names fail before any work

    machine = MachineInfo.detect()
    matches, match_reason = prof.matches(machine)
    on_target = matches if measure_here is None else bool(measure_here)
    threads = min(prof.threads, machine.cores)
    measurement = {
        "measured_on_target": on_target,
        "decision": (
            f"profile matches this machine: {match_reason}" if measure_here is None and matches
            else f"not the target: {match_reason}" if measure_here is None
            else "--measure-here: this machine is declared the target" if measure_here
            else "--no-measure-here: figures are declared proxies"
        ),
        "machine": machine.describe(),
        "statement": (
            f"latencies measured on the target ({machine.describe()})" if on_target else
            f"PROXY figures: measured on {machine.describe()}, not on a {prof.name} device; "
            "rank the variants with them, re-measure on the device before trusting absolute numbers"
        ),
        "threads": threads,
        "method": "interleaved rounds after warm-up; median and p95 of individually timed runs; "
                  "peak memory = peak RSS (VmHWM) of a child process that creates the session and runs the profile's batch 20 times; "
                  "baseline = a child that only imports onnxruntime",
    }
    notes: list[str] = []
    if measure_here and not matches:
        notes.append(f"this machine was declared the target although {match_reason}")
    if threads < prof.threads:
        notes.append(f"profile asks {prof.threads} threads; this machine has {machine.cores} usable cores, so at most {threads} were used")

    import onnxruntime as ort

    try:
        ref_sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise OptimizeError(f"ONNX Runtime cannot load {model}: {str(exc).splitlines()[0]}") from None
    io = ModelIO.from_session(ref_sess)
    ev = evaluation if isinstance(evaluation, EvalSet) else (
        EvalSet.from_npz(evaluation) if isinstance(evaluation, (str, Path)) else EvalSet.from_mapping(evaluation)
    )
    if preprocessing:
        ev = EvalSet(_preprocessed(ev.inputs, io, preprocessing, "eval"), ev.labels)
        calibration = _preprocessed(
            load_npz(calibration)[0] if isinstance(calibration, (str, Path)) else
            (calibration.inputs if isinstance(calibration, EvalSet) else calibration), io, preprocessing, "calibration",
        )
    eval_inputs = bind_inputs(ev.inputs, io, what="eval")
    n_eval = len(next(iter(eval_inputs.values())))
    labels = check_labels(ev.labels, n_eval)
    calib_inputs = _bind_calibration(calibration, io)
    the_metric, metric_why = choose_metric(io, has_labels=labels is not None, override=metric, model_path=model)
    fixed = io.fixed_batch
    eval_batch = fixed or EVAL_BATCH
    reference = run_all(ref_sess, eval_inputs, eval_batch, fixed=bool(fixed))
    del ref_sess

    state = {"done": 0, "total": 3 * len(chosen_recipes) + 4 + len(chosen_recipes)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgewise-optimize-") as tmp:
        work = Path(tmp)
        _notify(progress, state, "pre-processing the FP32 graph", step=False)
        fp32_src = _preprocess(model, work / "preprocessed.onnx", notes)
        calib = CalibrationSet(calib_inputs, batch=fixed or CALIB_BATCH, cache_dir=work / "calibration")

        def score(path: Path) -> float:
            sess = make_session(path, RuntimeSettings(intra_op_threads=threads))
            return the_metric.score(run_all(sess, eval_inputs, eval_batch, fixed=bool(fixed)), reference, labels)

        # 4. build and score -------------------------------------------------------------------
        candidates: list[Variant] = []
        for recipe in chosen_recipes:
            v = Variant(name=recipe.name, recipe=recipe.name, precision=recipe.precision, params=recipe.params(prof))
            path = out_dir / f"{recipe.name}.onnx"
            t0 = time.perf_counter()
            try:
                recipe.build(fp32_src, calib, prof, path)
                v.path, v.size_bytes = path, path.stat().st_size
            except RecipeSkipped as exc:
                v.status, v.reason = "skipped", str(exc)
            except Exception as exc:  # noqa: BLE001 - a recipe that fails is a recorded outcome
                v.status, v.reason = "failed", f"build failed: {str(exc).splitlines()[0][:300]}"
            v.build_s = time.perf_counter() - t0
            _notify(progress, state, f"built {recipe.name}")
            if v.ok:
                try:
                    v.metric_value = score(path)
                except (MetricError, DataError):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. FP16 kernels this ORT's CPU provider lacks
                    v.status, v.reason = "failed", f"ONNX Runtime cannot run it here: {str(exc).splitlines()[0][:300]}"
            _notify(progress, state, f"scored {recipe.name}")
            candidates.append(v)
        baseline = candidates[0]
        if not baseline.ok:
            raise OptimizeError(f"the FP32 baseline could not be built or run: {baseline.reason}")
        for v in candidates:
            if v.ok and v.metric_value is not None:
                v.drop = the_metric.drop(baseline.metric_value, v.metric_value)  # type: ignore[arg-type]

        # 5. mixed precision --------------------------------------------------------------------
        mixed_info = None
        statics = [(v, r) for v, r in zip(candidates, chosen_recipes) if v.ok and isinstance(r, StaticInt8)]
        if statics and not any(v.drop is not None and v.drop <= max_accuracy_drop for v, _ in statics):
            base_v, base_r = min(statics, key=lambda vr: vr[0].drop)  # the most accurate full-INT8 variant
            state["total"] += 3

            def evaluate(path: Path) -> tuple[float, float]:
                value = score(path)
                return value, the_metric.drop(baseline.metric_value, value)  # type: ignore[arg-type]

            from . import sensitivity

            _notify(progress, state, f"mixed precision from {base_r.name}: ranking node sensitivity")
            try:
                found = sensitivity.search(
                    base_r, fp32_src, calib, prof, evaluate=evaluate, budget=max_accuracy_drop, work_dir=work,
                    batch=fixed or CALIB_BATCH, progress=lambda m: _notify(progress, state, m, step=False),
                )
            except Exception as exc:  # noqa: BLE001
                mixed_info = {"base": base_r.name, "error": str(exc).splitlines()[0][:300]}
                found = None
            if found is not None:
                mixed_info = found.to_json()
                if found.path is not None:
                    name = f"{base_r.name}-mixed"
                    dest = out_dir / f"{name}.onnx"
                    dest.write_bytes(found.path.read_bytes())
                    mv = Variant(
                        name=name, recipe=base_r.name, precision="mixed", path=dest,
                        params=base_r.with_fp32_nodes(found.fp32_nodes).params(prof), size_bytes=dest.stat().st_size,
                        fp32_nodes=found.fp32_nodes,
                    )
                    mv.metric_value = score(dest)
                    mv.drop = the_metric.drop(baseline.metric_value, mv.metric_value)  # type: ignore[arg-type]
                    candidates.append(mv)
                    state["total"] += 2
            _notify(progress, state, "mixed precision searched")

        ok_vs = [v for v in candidates if v.ok]

        # 6. tune, then time interleaved ---------------------------------------------------------
        from .tuning import tune, usable_providers

        providers, skipped_eps = usable_providers(prof.execution_providers)
        if skipped_eps:
            notes.append("execution providers not tried: " + "; ".join(f"{k}: {v}" for k, v in skipped_eps.items()))
        batch1 = fixed or 1
        feed1 = repeat_to(eval_inputs, batch1)
        for v in ok_vs:
            try:
                v.runtime, v.tuning = tune(v.path, feed1, threads=threads, providers=providers)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001
                v.runtime = RuntimeSettings(intra_op_threads=threads)
                v.tuning = [{"error": str(exc).splitlines()[0][:200]}]
            _notify(progress, state, f"tuned runtime settings of {v.name}")

        sessions = {v.name: (make_session(v.path, v.runtime), feed1) for v in ok_vs}  # type: ignore[arg-type]
        for name, lat in time_interleaved(sessions).items():
            next(v for v in ok_vs if v.name == name).latency = lat
        del sessions
        _notify(progress, state, "timed batch 1")
        pb = prof.batch_size
        feedb = None
        if pb > 1 and (fixed is None or fixed == pb):
            feedb = repeat_to(eval_inputs, pb)
            sessions = {v.name: (make_session(v.path, v.runtime), feedb) for v in ok_vs}  # type: ignore[arg-type]
            for name, lat in time_interleaved(sessions).items():
                next(v for v in ok_vs if v.name == name).latency_batch = lat
            del sessions
        elif pb > 1:
            notes.append(f"the model's batch is fixed at {fixed}: batch-{pb} latency not measured")
        _notify(progress, state, f"timed batch {pb}")

        # 7. memory ------------------------------------------------------------------------------
        feed_path = save_feed(feedb if feedb is not None else feed1, work / "feed.npz")
        try:
            base_mb = baseline_peak_mb()
        except Exception as exc:  # noqa: BLE001
            base_mb = None
            notes.append(f"memory baseline failed: {exc}")
        _notify(progress, state, "memory baseline")
        for v in ok_vs:
            try:
                v.peak_rss_mb = probe_peak_mb(v.path, feed_path, v.runtime)
                v.model_rss_mb = v.peak_rss_mb - base_mb if base_mb is not None else None
            except Exception as exc:  # noqa: BLE001
                v.budget_notes.append(f"peak memory not measured: {exc}")
            _notify(progress, state, f"peak memory of {v.name}")

    # 8. budgets and the choice --------------------------------------------------------------------
    for v in ok_vs:
        fails = []
        if v.drop is None or v.drop > max_accuracy_drop:
            fails.append(f"{the_metric.name} drop {v.drop:.4g} > budget {max_accuracy_drop:g}")
        if v.peak_rss_mb is not None and v.peak_rss_mb > prof.ram_budget_mb:
            fails.append(f"peak RSS {v.peak_rss_mb:.1f} MB > RAM budget {prof.ram_budget_mb:g} MB")
        if prof.latency_budget_ms and v.latency_ms is not None and v.latency_ms > prof.latency_budget_ms:
            if on_target:
                fails.append(f"batch-1 median {v.latency_ms:.3f} ms > latency budget {prof.latency_budget_ms:g} ms")
            else:
                v.budget_notes.append(f"proxy batch-1 median {v.latency_ms:.3f} ms is above the {prof.latency_budget_ms:g} ms budget (not enforced on proxies)")
        v.within_budget = not fails
        v.budget_notes = fails + v.budget_notes
    if prof.latency_budget_ms and not on_target:
        notes.append(f"latency budget {prof.latency_budget_ms:g} ms not enforced: figures are proxies from {machine.hostname}")

    chosen, reason, closest = _choose(ok_vs, baseline, the_metric, max_accuracy_drop)
    result = OptimizeResult(
        chosen=chosen, candidates=candidates, baseline=baseline, ok=chosen is not None, reason=reason, closest=closest,
        metric={
            "name": the_metric.name, "units": the_metric.units, "higher_is_better": the_metric.higher_is_better,
            "why": metric_why, "baseline_value": baseline.metric_value, "eval_samples": n_eval,
            "calibration_samples": len(next(iter(calib_inputs.values()))),
        },
        max_accuracy_drop=max_accuracy_drop, profile=prof, machine=machine, measured_on_target=on_target,
        measurement=measurement, mixed_precision=mixed_info, notes=notes, out_dir=out_dir, model=model,
    )
    result.elapsed_s = time.perf_counter() - t_start
    from .report import write_reports

    result.files = write_reports(result)
    _notify(progress, state, "reports written")
    return result


def _choose(ok_vs: list[Variant], baseline: Variant, metric: Metric, budget: float) -> tuple[Variant | None, str, Variant | None]:
    timed = [v for v in ok_vs if v.latency is not None]
    within = [v for v in timed if v.within_budget]
    if not within:
        pool = [v for v in timed if v.drop is not None]
        closest = min(pool, key=lambda v: (v.drop, v.latency_ms)) if pool else None
        if closest is None:
            return None, "no variant could be measured", None
        why = "; ".join(closest.budget_notes[:2]) or "outside the budget"
        return None, (
            f"no variant meets the budget (max {metric.name} drop {budget:g}); closest: {closest.name} "
            f"({metric.name} {closest.metric_value:.4g}, drop {closest.drop:.4g}, batch-1 median {closest.latency_ms:.3f} ms, "
            f"{closest.size_bytes:,} bytes): {why}"
        ), closest
    fastest = min(within, key=lambda v: v.latency_ms)  # type: ignore[arg-type, return-value]
    ceiling = fastest.latency_ms * (1 + TIE_TOLERANCE)  # type: ignore[operator]
    if baseline in within:
        ceiling = min(ceiling, baseline.latency_ms)  # type: ignore[type-var]
    tied = [v for v in within if v.latency_ms <= ceiling]  # type: ignore[operator]
    chosen = min(tied, key=lambda v: (v.size_bytes or 0, v.latency_ms))
    base_ms = baseline.latency_ms or float("nan")
    speed = base_ms / chosen.latency_ms if chosen.latency_ms else float("nan")
    if chosen is baseline:
        why = "FP32 is the fastest variant within budget: every other variant is slower here or breaks the budget"
    else:
        why = (
            f"{chosen.name} is the fastest within budget: batch-1 median {chosen.latency_ms:.3f} ms vs FP32 {base_ms:.3f} ms "
            f"({speed:.2f}x), {metric.name} drop {chosen.drop:.4g} ≤ {budget:g}"
        )
        if chosen is not fastest:
            why += f"; tied within {TIE_TOLERANCE:.0%} with {fastest.name}, and smaller ({chosen.size_bytes:,} vs {fastest.size_bytes:,} bytes)"
    return chosen, why, None


def result_json(result: OptimizeResult) -> str:
    return json.dumps(result.to_json(), indent=2, default=str)
