"""Pruning: structured channel pruning that really shrinks a network, and unstructured pruning for contrast.

**Structured** (:func:`structured_prune`): whole channels (conv filters, linear units)
are removed, together with everything that depends on them (the next layer's input
channels, BatchNorm statistics, a flattened classifier's columns), using torch-pruning's
dependency graph. The result is a smaller dense model: fewer parameters and MACs, a
smaller ONNX file and, on any runtime, less work per inference. Channels are ranked by
group L2 magnitude (``GroupMagnitudeImportance``). Two ways to say how much:

* ``ratio=0.5`` removes that fraction of the channels of *every* prunable layer (or of
  all layers ranked together with ``global_pruning=True``). Because a conv layer loses
  input and output channels, parameters and MACs of a conv chain fall to roughly
  ``(1 - ratio)**2`` (the first layer and the classifier, which keep their inputs or
  outputs, fall to ``1 - ratio``).
* ``target_macs=0.3`` prunes in small increments until MACs are at most 30 % of the
  original (values >= 1 are absolute MAC counts).

``steps > 1`` prunes iteratively (the ratio or MACs reached grows linearly over the
steps), fine-tuning on ``data`` after each step, which recovers accuracy better than one
big cut. The output layer is never pruned (the class count stays).

**Unstructured** (:func:`unstructured_prune`, :func:`compare_unstructured`): individual
weights of smallest magnitude are set to zero (``torch.nn.utils.prune.l1_unstructured``).
The tensors keep their shape, so the parameter count, the ONNX file size and the
latency of a dense runtime (ONNX Runtime's CPU kernels, which multiply the zeros too)
do not change; only a compressor (smaller download) or a sparse kernel could use it.
It is reported for comparison only.

Example:
    >>> import torch
    >>> from edgewise.lab.torch_models import DigitsCNN
    >>> model = DigitsCNN().eval()
    >>> result = structured_prune(model, torch.randn(2, 1, 32, 32), ratio=0.5)
    >>> result.channels_after["features.0"], result.after.params < result.before.params
    (8, True)
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import DataSplit
from .torch_models import ModelStats, accuracy, clone, count_params, model_stats, train

Progress = Callable[[str], None]


class PruneError(ValueError):
    """A pruning request that cannot be met (bad ratio, nothing prunable, target out of reach)."""


@dataclass(frozen=True)
class PruneStep:
    step: int
    target: float  # channel ratio (ratio mode) or MACs bound (target mode) of this step
    params: int
    macs: int
    accuracy_pruned: float | None  # right after the cut
    accuracy_finetuned: float | None  # after fine-tuning (None without data/epochs)


@dataclass
class PruneResult:
    """The pruned model (a copy: the input model is untouched) and what changed."""

    model: nn.Module
    before: ModelStats
    after: ModelStats
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    steps: list[PruneStep]
    mode: str  # "ratio" or "macs"
    target: float
    target_met: bool
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def params_ratio(self) -> float:
        return self.after.params / self.before.params

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "target": self.target, "target_met": self.target_met,
            "before": self.before.to_json(), "after": self.after.to_json(),
            "params_ratio": self.params_ratio, "macs_ratio": self.macs_ratio,
            "channels_before": self.channels_before, "channels_after": self.channels_after,
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "steps": [asdict(s) for s in self.steps],
        }


def _trace_example(example: torch.Tensor) -> torch.Tensor:
    # torch-pruning mis-traces some graphs from a batch of one (a (1, n) linear output is
    # ambiguous), so the dependency graph is always built from at least two samples.
    example = example.detach().float()
    return example if example.shape[0] >= 2 else torch.cat([example, example])


def prunable_channels(model: nn.Module) -> dict[str, int]:
    """Output channels/units of every conv and linear layer, by module name."""
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The conv/linear layer(s) that produce the model's output (last to run): never pruned."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def _importance(kind: str) -> Any:
    import torch_pruning as tp

    if kind not in ("l1", "l2"):
        raise PruneError(f"importance must be 'l1' or 'l2', got {kind!r}")
    return tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)


def structured_prune(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    steps: int = 1,
    data: DataSplit | None = None,
    finetune_epochs: int = 0,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    importance: str = "l2",
    global_pruning: bool = False,
    ignored_layers: Sequence[nn.Module] | None = None,
    round_to: int | None = None,
    max_ratio: float = 0.9,
    finetune_last_step: bool = True,
    progress: Progress | None = None,
) -> PruneResult:
    """Remove channels from a copy of ``model``; optionally fine-tune on ``data`` after each step.

    Give exactly one of ``ratio`` (fraction of channels removed per layer, 0 < r < 1) or
    ``target_macs`` (fraction < 1 of the original MACs to keep, or an absolute count >= 1).
    ``example`` is a real input batch (used to trace the graph and count MACs per sample).
    ``ignored_layers`` are kept whole; the output layer always is. ``finetune_last_step=False``
    leaves the final recovery to the caller (e.g. distillation in :func:`.compress.compress`).
    """
    import torch_pruning as tp

    if (ratio is None) == (target_macs is None):
        raise PruneError("give exactly one of ratio (fraction of channels to remove) or target_macs")
    if ratio is not None and not 0 < ratio < 1:
        raise PruneError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    if target_macs is not None and not target_macs > 0:
        raise PruneError(f"target_macs must be > 0 (a fraction < 1 of the original MACs, or a count), got {target_macs}")
    if steps < 1:
        raise PruneError(f"steps must be >= 1, got {steps}")
    if not 0 < max_ratio < 1:
        raise PruneError(f"max_ratio must be between 0 and 1, got {max_ratio}")
    if finetune_epochs and data is None:
        raise PruneError("fine-tuning needs data")

    say = progress or (lambda _m: None)
    model = clone(model).eval()
    example = _trace_example(example)
    one = example[:1]
    before = model_stats(model, one)
    channels_before = prunable_channels(model)
    acc_before = accuracy(model, data.x_test, data.y_test) if data is not None else None

    keep = list(ignored_layers or []) + output_layers(model, one)
    if ratio is not None:
        mode, target = "ratio", float(ratio)
        pruning_ratio, iterative = ratio, steps
    else:
        mode = "macs"
        target = float(target_macs) if target_macs >= 1 else float(target_macs) * before.macs  # type: ignore[operator]
        if target >= before.macs:
            raise PruneError(f"target of {target:,.0f} MACs is not below the model's {before.macs:,} MACs")
        pruning_ratio, iterative = max_ratio, max(50, 10 * steps)  # small increments, stop at the target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = tp.pruner.BasePruner(
            model, example, importance=_importance(importance), pruning_ratio=pruning_ratio,
            iterative_steps=iterative, ignored_layers=keep, global_pruning=global_pruning,
            round_to=round_to, max_pruning_ratio=max_ratio if global_pruning else 1.0,
        )
    if not any(True for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)):
        raise PruneError("nothing to prune: no conv or linear layer besides the output layer")

    history: list[PruneStep] = []
    stats = before
    target_met = True
    for step in range(1, steps + 1):
        model.eval()
        if mode == "ratio":
            pruner.step()
            step_target = float(pruner.per_step_pruning_ratio[pruner.current_step])
        else:
            step_target = before.macs - (before.macs - target) * step / steps
            while stats.macs > step_target and pruner.current_step < pruner.iterative_steps:
                pruner.step()
                stats = model_stats(model, one)
            target_met = stats.macs <= step_target
        stats = model_stats(model, one)
        acc_pruned = accuracy(model, data.x_test, data.y_test) if data is not None else None
        acc_tuned = None
        if data is not None and finetune_epochs > 0 and (step < steps or finetune_last_step):
            train(model, data, finetune_epochs, lr, batch_size=batch_size, seed=seed + step)
            acc_tuned = accuracy(model, data.x_test, data.y_test)
        history.append(PruneStep(step, step_target, stats.params, stats.macs, acc_pruned, acc_tuned))
        say(
            f"prune step {step}/{steps}: {stats.params:,} params, {stats.macs:,} MACs"
            + (f", accuracy {acc_pruned:.3f}" if acc_pruned is not None else "")
            + (f" -> {acc_tuned:.3f} fine-tuned" if acc_tuned is not None else "")
        )
        if mode == "macs" and not target_met:
            break
    model.eval()
    after = model_stats(model, one)
    if mode == "macs":
        target_met = after.macs <= target
    last = history[-1]
    acc_after = last.accuracy_finetuned if last.accuracy_finetuned is not None else last.accuracy_pruned
    return PruneResult(
        model=model, before=before, after=after, channels_before=channels_before,
        channels_after=prunable_channels(model), steps=history, mode=mode, target=target,
        target_met=target_met, accuracy_before=acc_before, accuracy_after=acc_after,
    )


# --------------------------------------------------------------------------- unstructured (for contrast)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def unstructured_prune(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` with the ``amount`` fraction of smallest-|w| weights of every conv/linear layer set to zero.

    Uses ``torch.nn.utils.prune.l1_unstructured`` per layer, then makes it permanent
    (``prune.remove``): same tensors, same shapes, same parameter count, just zeros.
    """
    from torch.nn.utils import prune as torch_prune

    if not 0 < amount < 1:
        raise PruneError(f"amount must be between 0 and 1 (exclusive), got {amount}")
    model = clone(model)
    for _, m in _weight_layers(model):
        torch_prune.l1_unstructured(m, name="weight", amount=amount)
        torch_prune.remove(m, "weight")
    return model


def weight_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per conv/linear layer, and ``"total"`` over all of them."""
    out: dict[str, float] = {}
    zeros = total = 0
    for name, m in _weight_layers(model):
        w = m.weight.detach()
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros += z
        total += w.numel()
    out["total"] = zeros / total if total else 0.0
    return out


@dataclass
class UnstructuredComparison:
    """Dense vs magnitude-sparsified model: what changes (zeros, compressed size) and what does not."""

    amount: float
    sparsity: float
    params_before: int
    params_after: int
    onnx_bytes_before: int
    onnx_bytes_after: int
    zlib_bytes_before: int
    zlib_bytes_after: int
    latency_ms_before: float
    latency_ms_after: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare_unstructured(
    model: nn.Module,
    example: torch.Tensor,
    amount: float,
    out_dir: str | Path,
    *,
    data: DataSplit | None = None,
    latency_runs: int = 200,
    input_name: str = "x",
) -> UnstructuredComparison:
    """Zero ``amount`` of the weights and measure: sparsity, parameter count, ONNX size (raw and
    zlib-compressed) and ONNX Runtime batch-1 latency, before and after.

    The dense runtime does the same arithmetic on zeros, so latency stays where it was;
    the honest gain is a smaller *compressed* download.
    """
    from .export import export_onnx, measure_latency

    out_dir = Path(out_dir)
    sparse = unstructured_prune(model, amount)
    one = example[:1].detach().float()
    paths: dict[str, Path] = {}
    raw_bytes: dict[str, int] = {}
    zlib_bytes: dict[str, int] = {}
    for tag, m in (("dense", model), ("sparse", sparse)):
        res = export_onnx(m, _trace_example(one), out_dir / f"unstructured-{tag}.onnx", input_name=input_name)
        raw = res.path.read_bytes()
        paths[tag], raw_bytes[tag], zlib_bytes[tag] = res.path, len(raw), len(zlib.compress(raw, 6))
    # Interleave the two timings so drift on a busy machine affects both alike; report the median.
    lat: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(3):
        for tag in ("dense", "sparse"):
            lat[tag].append(measure_latency(paths[tag], one.numpy(), runs=max(1, latency_runs // 3), warmup=5).p50_ms)
    sp = weight_sparsity(sparse)
    return UnstructuredComparison(
        amount=amount, sparsity=sp["total"], params_before=count_params(model), params_after=count_params(sparse),
        onnx_bytes_before=raw_bytes["dense"], onnx_bytes_after=raw_bytes["sparse"],
        zlib_bytes_before=zlib_bytes["dense"], zlib_bytes_after=zlib_bytes["sparse"],
        latency_ms_before=float(np.median(lat["dense"])), latency_ms_after=float(np.median(lat["sparse"])),
        accuracy_before=accuracy(model, data.x_test, data.y_test) if data is not None else None,
        accuracy_after=accuracy(sparse, data.x_test, data.y_test) if data is not None else None,
        layer_sparsity={k: v for k, v in sp.items() if k != "total"},
    )
