"""Measuring a variant: latency, peak memory, outputs for the metric.

**Latency.** Every session is created with its runtime settings and warmed up
(at least 5 runs and 50 ms). Then all sessions are timed in interleaved rounds
(round-robin over the variants, the order rotating each round), so a slow drift of
the machine (thermal, a neighbour process) hits every variant alike. Each run is
timed alone with ``perf_counter_ns``; a round is ~20 ms of runs per variant, and
there are 10 rounds (at least 3 runs per round): the median and 95th percentile are
over all those runs.

**Peak memory.** A fresh child Python process imports numpy and onnxruntime,
creates the session with the variant's settings and runs the profile's batch 20
times; it reports its own peak resident set. A baseline child that
only imports numpy and onnxruntime gives the runtime's own footprint. The report
holds both: ``peak_rss_mb`` (whole process: what the device's RAM budget is checked
against) and ``model_rss_mb`` (= peak minus baseline: what the model and its session
add). On Linux the peak is ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux
carries the parent's high-water mark into a forked child's ``ru_maxrss`` (also across
exec), so a child of a 400 MB optimizer would report at least 400 MB; ``VmHWM`` belongs
to the child's own address space. Elsewhere ``ru_maxrss`` is used (KB on Linux, bytes on macOS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .data import batches, repeat_to

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


@dataclass(frozen=True)
class RuntimeSettings:
    """Session settings the device should use with a variant (also the manifest's ``runtime`` dict)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "ORT_ENABLE_ALL"
    execution_provider: str = "CPUExecutionProvider"
    execution_mode: str = "ORT_SEQUENTIAL"

    def to_runtime(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short form for tables: ``CPU 2t all`` (provider, intra-op threads, [parallel xN,] optimization level)."""
        mode = "" if self.execution_mode == "ORT_SEQUENTIAL" else f" par{self.inter_op_threads}"
        ep = self.execution_provider.removesuffix("ExecutionProvider")
        level = self.graph_optimization_level.removeprefix("ORT_").removeprefix("ENABLE_").lower()
        return f"{ep} {self.intra_op_threads}t{mode} {level}"


def session_options(settings: RuntimeSettings) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings.graph_optimization_level)
    so.execution_mode = getattr(ort.ExecutionMode, settings.execution_mode)
    so.log_severity_level = 3
    return so


def make_session(path: Path | str, settings: RuntimeSettings = RuntimeSettings()) -> Any:
    import onnxruntime as ort

    providers = [settings.execution_provider]
    if settings.execution_provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")  # unsupported nodes fall back, as on the device
    return ort.InferenceSession(str(path), session_options(settings), providers=providers)


def run_all(sess: Any, inputs: Mapping[str, np.ndarray], batch: int, fixed: bool = False) -> list[np.ndarray]:
    """Outputs over all rows, in chunks of ``batch``, concatenated per output.

    ``fixed``: the model only takes exactly ``batch`` rows, so a short last chunk is padded
    (repeating its rows) and the padding's outputs dropped.
    """
    parts: list[list[np.ndarray]] = []
    for feed in batches(inputs, batch):
        n = len(next(iter(feed.values())))
        if fixed and n < batch:
            outs = [o[:n] for o in sess.run(None, repeat_to(feed, batch))]
        else:
            outs = sess.run(None, feed)
        if not parts:
            parts = [[] for _ in outs]
        for i, o in enumerate(outs):
            parts[i].append(np.asarray(o))
    return [np.concatenate(p, axis=0) if p[0].ndim else np.asarray(p) for p in parts]


@dataclass(frozen=True)
class Latency:
    batch: int
    median_ms: float
    p95_ms: float
    mean_ms: float
    runs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _warm(sess: Any, feed: Mapping[str, np.ndarray], min_runs: int = 5, min_s: float = 0.05) -> float:
    t0 = time.perf_counter()
    n = 0
    while n < min_runs or time.perf_counter() - t0 < min_s:
        sess.run(None, feed)
        n += 1
        if n >= 1000:
            break
    return (time.perf_counter() - t0) / n


def time_interleaved(
    sessions: Mapping[str, tuple[Any, Mapping[str, np.ndarray]]],
    *,
    rounds: int = 10,
    round_s: float = 0.02,
    min_runs_per_round: int = 3,
    max_runs_per_round: int = 500,
) -> dict[str, Latency]:
    """Median/p95 latency of each ``name -> (session, feed)``, measured in interleaved rounds."""
    per_run = {name: _warm(s, feed) for name, (s, feed) in sessions.items()}
    k = {name: int(min(max_runs_per_round, max(min_runs_per_round, round(round_s / max(t, 1e-7))))) for name, t in per_run.items()}
    times: dict[str, list[int]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            s, feed = sessions[name]
            run = s.run
            acc = times[name]
            for _ in range(k[name]):
                t0 = time.perf_counter_ns()
                run(None, feed)
                acc.append(time.perf_counter_ns() - t0)
    out = {}
    for name, ts in times.items():
        ms = np.asarray(ts, dtype=np.float64) / 1e6
        batch = len(next(iter(sessions[name][1].values())))
        out[name] = Latency(batch, float(np.median(ms)), float(np.percentile(ms, 95)), float(ms.mean()), len(ms))
    return out


# --- peak memory in a child process ---------------------------------------------------------
_PROBE = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort
def peak_mb():
    try:  # VmHWM belongs to this process's own address space, which exec gave it fresh
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024
args = json.loads(sys.argv[1])
if args.get("model"):
    so = ort.SessionOptions()
    so.intra_op_num_threads = args["intra"]; so.inter_op_num_threads = args["inter"]
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, args["level"])
    so.execution_mode = getattr(ort.ExecutionMode, args["mode"]); so.log_severity_level = 3
    providers = [args["ep"]] + (["CPUExecutionProvider"] if args["ep"] != "CPUExecutionProvider" else [])
    sess = ort.InferenceSession(args["model"], so, providers=providers)
    with np.load(args["feed"]) as f:
        feed = {k: f[k] for k in f.files}
    for _ in range(args["runs"]):
        sess.run(None, feed)
print(json.dumps({"peak_mb": peak_mb()}))
"""


def probe_peak_mb(model: Path | None, feed_npz: Path | None, settings: RuntimeSettings | None, runs: int = 20, timeout: float = 300) -> float:
    """Peak RSS (MB) of a child that imports onnxruntime and, given a model, creates a session and runs it."""
    args: dict[str, Any] = {"model": None}
    if model is not None and settings is not None:
        args = {
            "model": str(model), "feed": str(feed_npz), "runs": runs,
            "intra": settings.intra_op_threads, "inter": settings.inter_op_threads,
            "level": settings.graph_optimization_level, "mode": settings.execution_mode, "ep": settings.execution_provider,
        }
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def baseline_peak_mb(repeats: int = 2) -> float:
    """Peak RSS of a child that only imports numpy and onnxruntime (the smallest of ``repeats``)."""
    return min(probe_peak_mb(None, None, None) for _ in range(repeats))


def save_feed(feed: Mapping[str, np.ndarray], path: Path) -> Path:
    np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
    return path


def candidate_thread_counts(threads: int) -> Sequence[int]:
    if threads <= 4:
        return list(range(1, threads + 1))
    return sorted({1, threads // 2, threads})
