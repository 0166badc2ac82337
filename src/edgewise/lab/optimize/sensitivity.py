"""Accuracy-aware mixed precision: keep the fewest, most sensitive nodes in FP32.

Used when every full-INT8 static variant breaks the accuracy budget.

1. **Sensitivity.** For each quantizable compute node (Conv, Gemm, MatMul, Add, Mul,
   pooling, normalization …; pure data movement such as Reshape, MaxPool or Relu adds
   no rounding of its own and is skipped), quantize *that node alone* with the base
   recipe (``nodes_to_quantize=[node]``, the cached calibration ranges) and run it
   on a 64-sample subsample of the calibration set. Its sensitivity is the error it
   alone introduces at the model's outputs: the mean squared difference from FP32,
   divided by the variance of the FP32 output (summed over float outputs). At most
   64 nodes are scored (the ones with the most weights first); others stay INT8.
2. **Fewest exclusions.** Keep the top-k nodes in FP32 (``nodes_to_exclude``), for
   k = 1, 2, 4, … until the eval-set metric is within budget, then bisect between
   the last failing and the first passing k. That assumes more FP32 nodes never hurt,
   which holds for rounding error in practice; every trial is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import CalibrationSet, take
from .measure import make_session, run_all
from .profiles import DeviceProfile
from .recipes._static import StaticInt8

NO_OWN_ERROR = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Pad", "MaxPool",
    "Relu", "Clip", "TopK", "Gather", "GatherElements", "Where", "Resize", "CumSum", "ArgMax",
}
MAX_SCORED_NODES = 64
SENSITIVITY_SAMPLES = 64


@dataclass
class MixedSearch:
    base: str
    ranking: list[dict[str, Any]] = field(default_factory=list)  # [{node, op_type, error}], most sensitive first
    trials: list[dict[str, Any]] = field(default_factory=list)  # [{k, drop, within_budget}]
    fp32_nodes: list[str] = field(default_factory=list)
    path: Path | None = None
    within_budget: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base, "fp32_nodes": self.fp32_nodes, "within_budget": self.within_budget, "note": self.note,
            "ranking": self.ranking, "trials": self.trials,
        }


def quantizable_nodes(model_path: Path, quant_format: str) -> list[tuple[str, str, int]]:
    """``(name, op_type, weight_elements)`` of nodes the quantizer would touch and that add rounding error."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = set(QDQRegistry) if quant_format == "QDQ" else set(QLinearOpsRegistry)
    g = onnx.load(str(model_path)).graph
    sizes = {t.name: int(np.prod(t.dims)) if len(t.dims) else 1 for t in g.initializer}
    out = []
    for n in g.node:
        if n.op_type in ops and n.op_type not in NO_OWN_ERROR and n.name:
            out.append((n.name, n.op_type, sum(sizes.get(i, 0) for i in n.input)))
    return out


def _nmse(outs: list[np.ndarray], ref: list[np.ndarray]) -> float:
    err = 0.0
    for a, b in zip(outs, ref):
        if b.dtype.kind != "f":
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err += float(np.mean((a64 - b64) ** 2) / (np.var(b64) + 1e-12))
    return err


def search(
    base: StaticInt8,
    fp32_path: Path,
    calib: CalibrationSet,
    profile: DeviceProfile,
    *,
    evaluate: Callable[[Path], tuple[float, float]],
    budget: float,
    work_dir: Path,
    batch: int,
    progress: Callable[[str], None] | None = None,
) -> MixedSearch:
    """Rank nodes by sensitivity, then keep the fewest of them in FP32 so ``evaluate(path)[1]`` (the drop) ≤ ``budget``."""
    result = MixedSearch(base=base.name)
    nodes = quantizable_nodes(fp32_path, base.quant_format)
    if not nodes:
        result.note = "no quantizable compute nodes"
        return result
    scored = sorted(nodes, key=lambda n: -n[2])[:MAX_SCORED_NODES]
    sub = take(calib.inputs, SENSITIVITY_SAMPLES)
    ref = run_all(make_session(fp32_path), sub, batch)
    errors = []
    for name, op, _ in scored:
        if progress:
            progress(f"sensitivity of {name}")
        single = type(base)(per_channel=base.per_channel, nodes_to_quantize=[name])
        path = work_dir / "sensitivity.onnx"
        try:
            single.build(fp32_path, calib, profile, path)
            err = _nmse(run_all(make_session(path), sub, batch), ref)
        except Exception as exc:  # noqa: BLE001 - a node the quantizer cannot isolate ranks last
            err, op = -1.0, f"{op} (not scored: {str(exc).splitlines()[0][:120]})"
        errors.append({"node": name, "op_type": op, "error": err})
    errors.sort(key=lambda e: -e["error"])
    result.ranking = errors
    ranked = [e["node"] for e in errors]

    built: dict[int, tuple[Path, float]] = {}

    def attempt(k: int) -> bool:
        path = work_dir / f"mixed-{k}.onnx"
        if progress:
            progress(f"mixed precision: {k} node(s) in FP32")
        base.with_fp32_nodes(ranked[:k]).build(fp32_path, calib, profile, path)
        _, drop = evaluate(path)
        ok = drop <= budget
        built[k] = (path, drop)
        result.trials.append({"k": k, "fp32_nodes": ranked[:k], "drop": drop, "within_budget": ok})
        return ok

    lo, hi, k = 0, None, 1
    while k <= len(ranked):
        if attempt(k):
            hi = k
            break
        lo = k
        if k == len(ranked):
            break
        k = min(2 * k, len(ranked))
    if hi is None:
        last = max(built)
        result.fp32_nodes, result.path = ranked[:last], built[last][0]
        result.note = f"even with all {last} scored nodes in FP32 the drop is {built[last][1]:.4g} > {budget:g}"
        return result
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    result.fp32_nodes, result.path, result.within_budget = ranked[:hi], built[hi][0], True
    result.note = f"{hi} of {len(ranked)} scored nodes kept in FP32"
    return result

