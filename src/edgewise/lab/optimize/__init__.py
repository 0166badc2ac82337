"""``edgewise optimize``: the fastest variant of a model that stays within an accuracy budget on a target.

Tools that pick one quantization recipe and hope get it wrong in both directions:
on ONNX Runtime 1.32/x86 a small CNN ran ~2x faster with static QDQ INT8 at the same
accuracy, ~6x *slower* with dynamic INT8 (the ConvInteger path), and on very small
models every INT8 variant was slower than FP32. So this module builds the candidates,
measures each one, and chooses with the figures in hand.

Public API::

    optimize(model, calibration, evaluation, profile, *, max_accuracy_drop=0.01, out_dir,
             metric=None, measure_here=None, recipes=None, progress=None) -> OptimizeResult
    load_profile(name_or_path) -> DeviceProfile        list_profiles() -> list[str]
    load_npz(path) -> (inputs: dict[str, ndarray], labels: ndarray | None)

``OptimizeResult``: ``.chosen`` (a :class:`Variant`, None when no variant meets the
budget), ``.closest`` (then: the nearest miss), ``.candidates``, ``.baseline`` (FP32),
``.ok``, ``.reason``, ``.to_json()`` (= report.json). A :class:`Variant` has ``name``,
``path``, ``recipe``, ``size_bytes``, ``latency``/``latency_batch`` (median and p95 ms),
``peak_rss_mb``, ``metric_value``, ``drop``, ``runtime`` (settings; ``.to_runtime()`` is the
dict for a bundle manifest) and ``fp32_nodes`` (mixed precision).

**The accuracy budget** is in the metric's units (see :mod:`.metrics`): for accuracy and
top-1 agreement a fraction (0.01 = one point), for cosine similarity a difference of
the mean (0.01 = mean cosine ≥ 0.99), for max_abs_err the largest allowed absolute
output error. Without labels the metric is fidelity to FP32, chosen automatically.

**Which machine measured.** Latencies are always measured on the machine running
``optimize``. If the profile matches it (same arch, the profile's ISA features
present, enough cores, optional ``cpu_match`` regex: :mod:`.profiles`) or
``measure_here=True``, the figures are "measured on the target"; otherwise every
report names this machine (hostname, CPU model, ISA flags) and calls them proxies.

**Candidates** (``recipes.DEFAULT_RECIPES``): FP32 with portable graph optimizations,
FP16, dynamic INT8, static QDQ INT8 with MinMax (per-tensor and per-channel), Entropy
and Percentile (per-channel; histogram calibration on a 64-sample subsample),
QOperator MinMax. U8S8 or S8S8 follows the profile's ISA (VNNI → U8S8; ARM → S8S8).
When every full-INT8 variant breaks the budget, accuracy-aware mixed precision keeps
the fewest most-sensitive nodes in FP32 (:mod:`.sensitivity`). Each variant's runtime
settings are tuned (:mod:`.tuning`). Outputs in ``out_dir``: every variant's ``.onnx``,
``report.json``, ``report.md``, ``pareto.png``.

Example (the skl2onnx demo MLP; the whole run takes a few seconds):
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from edgewise.lab.demo_model import PREPROCESSING, load_digits_split, train_digits_onnx
    >>> d = Path(tempfile.mkdtemp()); data = load_digits_split()
    >>> _ = (d / "mlp.onnx").write_bytes(train_digits_onnx("mlp", data))
    >>> calib = {"x": PREPROCESSING.apply(data.x_train[:128])}
    >>> ev = {"x": PREPROCESSING.apply(data.x_test), "y": data.y_test}
    >>> res = optimize(d / "mlp.onnx", calib, ev, "x86-gateway", out_dir=d / "out",
    ...                recipes=["int8-qdq-minmax"], max_accuracy_drop=0.02)
    >>> res.ok, res.baseline.name, res.metric["name"], sorted(c.name for c in res.candidates)
    (True, 'fp32', 'accuracy', ['fp32', 'int8-qdq-minmax'])
    >>> res.chosen.latency_ms <= res.baseline.latency_ms
    True
"""

from __future__ import annotations

from .data import CalibrationSet, EvalSet, load_npz
from .errors import (
    DataError,
    MetricError,
    OptimizeError,
    ProfileError,
    RecipeSkipped,
    TargetOutOfReachError,
)
from .machine import MachineInfo
from .measure import Latency, RuntimeSettings
from .optimizer import OptimizeResult, Variant, optimize
from .profiles import DeviceProfile, list_profiles, load_profile
from .recipes import DEFAULT_RECIPES, RECIPES, Recipe

__all__ = [
    "CalibrationSet", "DEFAULT_RECIPES", "DataError", "DeviceProfile", "EvalSet", "Latency", "MachineInfo",
    "MetricError", "OptimizeError", "OptimizeResult", "ProfileError", "RECIPES", "Recipe", "RecipeSkipped",
    "RuntimeSettings", "TargetOutOfReachError", "Variant", "list_profiles", "load_npz", "load_profile", "optimize",
]
