"""torch -> ONNX export that checks itself, and the ONNX Runtime figures the lab reports.

:func:`export_onnx` writes an opset-17 graph with one named input (``x`` by default)
and a dynamic batch dimension, then runs it in ONNX Runtime and compares with torch:
an export that does not reproduce the model raises :class:`ExportMismatchError`.

torch 2.13's default exporter (``dynamo=True``) needs ``onnxscript``, which the lab
does not install; the TorchScript-based exporter (``dynamo=False``) handles every model
here (conv, BN, pooling, linear) and is what this module uses.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import tempfile, pathlib
    >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"
    >>> result = export_onnx(model, torch.randn(2, 4), path)
    >>> result.input_name, result.max_abs_diff < 1e-4
    ('x', True)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch
    from torch import nn

OPSET = 17


class ExportMismatchError(RuntimeError):
    """The exported ONNX graph does not reproduce the torch model's outputs."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    input_name: str
    output_name: str
    opset: int
    max_abs_diff: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    input_name: str = "x",
    dynamic_batch: bool = True,
    *,
    output_name: str = "logits",
    opset: int = OPSET,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ``path`` and check ONNX Runtime agrees with torch on ``example``.

    ``example`` is a real input batch; with ``dynamic_batch`` the graph accepts any batch
    size. Raises :class:`ExportMismatchError` if outputs differ beyond ``atol + rtol*|y|``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                output_names=[output_name], dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        with torch.no_grad():
            expected = model(example).detach().cpu().numpy()
    finally:
        model.train(was_training)
    diff = 0.0
    if verify:
        got = session(path).run(None, {input_name: example.detach().cpu().numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatchError(f"{path}: ONNX output shape {got.shape} != torch {expected.shape}")
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if not np.allclose(got, expected, rtol=rtol, atol=atol):
            raise ExportMismatchError(
                f"{path}: ONNX Runtime output differs from torch by up to {diff:.3g} (atol {atol}, rtol {rtol})"
            )
    return ExportResult(path, path.stat().st_size, input_name, output_name, opset, diff)


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (1: as on a small device, and stable to time)."""
    from .optimize.measure import RuntimeSettings, make_session

    return make_session(path, RuntimeSettings(intra_op_threads=threads))


def onnx_predict(path: str | Path, x: np.ndarray, batch_size: int = 256, sess: ort.InferenceSession | None = None) -> np.ndarray:
    """The first output of the ONNX model for every row of ``x`` (fed to its first input)."""
    sess = sess or session(path)
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model's first output (logits or probabilities) on ``(x, y)``."""
    return float((onnx_predict(path, x).argmax(1) == np.asarray(y)).mean())


@dataclass(frozen=True)
class Latency:
    """ONNX Runtime latency of one call, in milliseconds."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    batch: int
    threads: int
    runs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    path: str | Path, example: np.ndarray, *, runs: int = 200, warmup: int = 20, threads: int = 1
) -> Latency:
    """Latency of the ONNX model on ``example`` (its batch size is the batch measured).

    The same timing code as `edgewise optimize` (:func:`edgewise.lab.optimize.measure.time_interleaved`),
    so a stage of `compress` and a variant of `optimize` are measured alike; ``warmup`` is kept for
    callers, the timer warms up by itself.
    """
    from .optimize.measure import time_interleaved

    sess = session(path, threads=threads)
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(example, dtype=np.float32)}
    rounds = max(1, min(10, runs // 5))
    lat = time_interleaved({"m": (sess, feed)}, rounds=rounds, min_runs_per_round=max(1, runs // rounds),
                           max_runs_per_round=max(1, runs // rounds))["m"]
    return Latency(
        p50_ms=lat.median_ms, p95_ms=lat.p95_ms, mean_ms=lat.mean_ms,
        batch=int(example.shape[0]), threads=threads, runs=lat.runs,
    )
