"""Shared bits for benchmarks: fixtures built on the fly, machine facts, timing."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def machine() -> dict[str, str]:
    import onnxruntime

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def build_demo_bundles(root: Path) -> tuple[dict[str, Path], Path]:
    """digits 1.0.0/1.1.0 bundles signed by a fresh key; returns (bundles, public key)."""
    from edgewise.bundle import build_bundle
    from edgewise.lab.demo_model import LABELS, PREPROCESSING, load_digits_split, train_digits_onnx
    from edgewise.security import generate_keypair, load_signer

    data = load_digits_split()
    generate_keypair(root / "signing.key", root / "signing.pub", overwrite=True)
    signer = load_signer(root / "signing.key")
    out = {}
    for version, kind in (("1.0.0", "logreg"), ("1.1.0", "mlp")):
        out[version] = root / f"digits-{version}.ewb"
        build_bundle(train_digits_onnx(kind, data), name="digits", version=version, signer=signer,
                     out=out[version], labels=LABELS, preprocessing=PREPROCESSING)
    return out, root / "signing.pub"


def interleaved(fns: dict[str, Callable[[], object]], calls: int = 2000, rounds: int = 15) -> dict[str, list[float]]:
    """Per-call microseconds of each function, in interleaved rounds so drift hits all alike."""
    for fn in fns.values():  # warm up
        for _ in range(200):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter_ns() - t) / calls / 1000)
    return samples


def per_call_latencies(fn: Callable[[], object], calls: int = 3000) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def med(values: list[float]) -> float:
    return statistics.median(values)


def tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
