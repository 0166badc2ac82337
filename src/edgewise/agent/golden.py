"""The golden check: a new model must reproduce, on this device, the outputs it gave when it was built.

The bundle's ``golden.npz`` holds raw inputs (``inputs/NAME``, samples along axis 0) and the
outputs the model gave on them at build time (``outputs/NAME``, one entry per sample). Each
sample goes through the agent's own inference path, :meth:`LoadedModel.predict` (input checks,
the bundle's preprocessing, the ONNX Runtime session the device will serve with), as a batch
of one. Outputs must match within ``atol + rtol * |expected|``; the median per-sample latency
must stay within the manifest's ``latency_budget_ms`` when one is set.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from .runtime import InferenceError, InputError, ModelLoadError

if TYPE_CHECKING:
    from ..bundle import VerifiedBundle
    from .runtime import LoadedModel


class GoldenCheckError(ModelLoadError):
    """The model's outputs (or latency) on its golden inputs are not what the bundle promises."""


def check_golden(model: "LoadedModel", bundle: "VerifiedBundle") -> str | None:
    """Run the golden check; return a one-line summary (None without golden inputs) or raise GoldenCheckError."""
    golden = bundle.manifest.golden
    if golden is None:
        return None
    what = f"{model.name} {model.version}"
    try:
        raw = bundle.read_member(golden.member)
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ModelLoadError:
        raise
    except Exception as exc:  # BundleError for a changed member, ValueError/OSError for a bad npz
        raise GoldenCheckError(f"{what}: golden inputs cannot be read: {exc}") from None
    inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
    expected = {k[len("outputs/"):]: v for k, v in arrays.items() if k.startswith("outputs/")}
    counts = {len(v) for v in inputs.values()} | {len(v) for v in expected.values()}
    if not inputs or not expected or len(counts) != 1:
        raise GoldenCheckError(f"{what}: golden.npz is malformed (inputs {sorted(inputs)}, outputs {sorted(expected)}, sample counts {sorted(counts)})")
    n = counts.pop()
    worst: dict[str, tuple[float, int]] = {}  # output -> (max excess error, sample)
    latencies: list[float] = []
    for i in range(n):
        feed = {name: x[i : i + 1] for name, x in inputs.items()}
        t0 = time.perf_counter()
        try:
            out = model.predict(feed)
        except (InputError, InferenceError) as exc:
            raise GoldenCheckError(f"{what}: golden sample {i} does not run: {exc}") from None
        latencies.append((time.perf_counter() - t0) * 1000.0)
        for name, want in expected.items():
            got = out.get(name)
            want_i = want[i]
            if not isinstance(got, np.ndarray) or got.shape != want_i.shape:
                shape = list(got.shape) if isinstance(got, np.ndarray) else type(got).__name__
                raise GoldenCheckError(f"{what}: golden check: output {name!r} of sample {i} has shape {shape}, expected {list(want_i.shape)}")
            err = np.abs(got.astype(np.float64) - want_i.astype(np.float64))
            bound = golden.atol + golden.rtol * np.abs(want_i.astype(np.float64))
            bad = ~(err <= bound)  # NaN counts as a mismatch
            if bad.any():
                e = float(np.nanmax(np.where(np.isnan(err), np.inf, err)))
                if name not in worst or e > worst[name][0]:
                    worst[name] = (e, i)
    if worst:
        name, (err, sample) = max(worst.items(), key=lambda kv: kv[1][0])
        raise GoldenCheckError(
            f"{what}: golden check failed: output {name!r} differs from the build-time result by up to {err:.6g} "
            f"(sample {sample}; atol {golden.atol:g}, rtol {golden.rtol:g})"
            + (f"; also {sorted(set(worst) - {name})}" if len(worst) > 1 else "")
        )
    median = statistics.median(latencies)
    if golden.latency_budget_ms is not None and median > golden.latency_budget_ms:
        raise GoldenCheckError(
            f"{what}: golden check failed: median latency {median:.3f} ms over {n} samples exceeds the budget of {golden.latency_budget_ms:g} ms"
        )
    return f"golden check passed: {n} samples, median {median:.3f} ms"
