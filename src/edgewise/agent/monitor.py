"""What the agent knows about its own health: counters, latency, CPU and memory.

The hot path only bumps plain integers and writes one slot of a latency ring
buffer under a lock (well under a microsecond). Everything costly is done
when someone asks: percentiles when a sample is taken, Prometheus exposition
when ``/metrics`` is scraped. The Prometheus side is a custom collector over
these counters in a per-agent ``CollectorRegistry`` (several agents can share
a process in tests and simulations); ``prometheus_client`` and ``psutil`` are
imported on first use, not at start, to keep an idle device's memory small.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

LATENCY_WINDOW = 2048  # last N calls kept for p50/p95; a power of two so the index is a mask
N_CONF_BINS = 10  # confidence histogram bins of width 0.1 on [0, 1] (protocol.CONFIDENCE_BINS)


class Monitor:
    """Counters and a latency window for one agent, exported as Telemetry fields and Prometheus metrics."""

    def __init__(self, *, window: int = LATENCY_WINDOW) -> None:
        if window & (window - 1):
            raise ValueError("the latency window must be a power of two")
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._lat_ns = [0] * window
        self._mask = window - 1
        self._lat_sum_ns = 0
        self.inferences = 0
        self.errors = 0
        self.bad_messages = 0
        self.updates: dict[str, int] = {"ok": 0, "failed": 0, "rolled_back": 0}
        self._window_start = self.started
        self._window_base = 0
        # Summary mode: per-interval class and confidence counts (reset by summary_sample()).
        self._classes: dict[int, int] = {}
        self._conf_hist = [0] * N_CONF_BINS
        self._predictions = 0
        self._sum_start = self.started
        self._sum_base = 0
        self._sum_err_base = 0
        self.bytes_sent: dict[str, int] = {}
        # Input values the bundle's preprocessing repaired, by "<step>/<feature>": cumulative, and for the summary interval.
        self.repairs: dict[str, int] = {}
        self._sum_repairs: dict[str, int] = {}
        self._process: Any = None
        self._registry: "CollectorRegistry | None" = None
        # The agent plugs in a function returning what only it knows (model, connection, outbox).
        self.status: Callable[[], dict[str, Any]] = dict

    # -- hot path -------------------------------------------------------------------------------

    def record(self, latency_ns: int) -> None:
        """Count one successful inference that took ``latency_ns``."""
        with self._lock:
            n = self.inferences
            self._lat_ns[n & self._mask] = latency_ns
            self._lat_sum_ns += latency_ns
            self.inferences = n + 1

    def record_predictions(self, top1: np.ndarray, confidence: np.ndarray) -> None:
        """Count the predicted top-1 classes and their confidences (summary mode only)."""
        bins = np.minimum((np.clip(confidence, 0.0, 1.0) * N_CONF_BINS).astype(np.int64), N_CONF_BINS - 1)
        with self._lock:
            for c, b in zip(top1.tolist(), bins.tolist()):
                self._classes[c] = self._classes.get(c, 0) + 1
                self._conf_hist[b] += 1
            self._predictions += len(bins)

    def count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def count_repairs(self, counts: dict[str, int]) -> None:
        """Add the repairs one preprocessing run made (called only when it made some)."""
        with self._lock:
            total, window = self.repairs, self._sum_repairs
            for key, n in counts.items():
                total[key] = total.get(key, 0) + n
                window[key] = window.get(key, 0) + n

    def count_bytes(self, mode: str, n: int) -> None:
        """Bytes this agent published (payloads), by bandwidth mode."""
        with self._lock:
            self.bytes_sent[mode] = self.bytes_sent.get(mode, 0) + n

    # -- rarer events ---------------------------------------------------------------------------

    def count_bad_message(self) -> None:
        with self._lock:
            self.bad_messages += 1

    def count_update(self, result: str) -> None:
        with self._lock:
            self.updates[result] = self.updates.get(result, 0) + 1

    # -- reading --------------------------------------------------------------------------------

    def latency_ms(self) -> tuple[float | None, float | None]:
        """(p50, p95) in milliseconds over the last calls, or (None, None) before the first one."""
        with self._lock:
            n = min(self.inferences, len(self._lat_ns))
            window = self._lat_ns[:n] if n < len(self._lat_ns) else list(self._lat_ns)
        if not window:
            return None, None
        p50, p95 = np.percentile(np.asarray(window, dtype=np.float64), (50, 95)) / 1e6
        return float(p50), float(p95)

    def summary_sample(self) -> dict[str, Any]:
        """Summary fields for the interval since the previous call; the interval restarts here.

        Latency percentiles are over the calls of this interval that are still in the
        latency ring (the last ``LATENCY_WINDOW`` calls).
        """
        now = time.monotonic()
        with self._lock:
            n, errors = self.inferences, self.errors
            window_n = n - self._sum_base
            k = min(window_n, len(self._lat_ns))
            lat = [self._lat_ns[(n - 1 - i) & self._mask] for i in range(k)]
            classes, self._classes = self._classes, {}
            hist, self._conf_hist = self._conf_hist, [0] * N_CONF_BINS
            predictions, self._predictions = self._predictions, 0
            repairs, self._sum_repairs = self._sum_repairs, {}
            window_s, self._sum_start = now - self._sum_start, now
            err_n = errors - self._sum_err_base
            self._sum_base, self._sum_err_base = n, errors
        p50 = p95 = p99 = None
        if lat:
            p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(lat, dtype=np.float64), (50, 95, 99)) / 1e6)
        return {
            "window_s": round(window_s, 3),
            "inferences": window_n,
            "errors": err_n,
            "predictions": predictions,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "latency_p99_ms": p99,
            "classes": {str(c): v for c, v in sorted(classes.items())},
            "confidence_hist": hist,
            "repairs": repairs,
        }

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def _proc(self) -> Any:
        if self._process is None:
            import psutil  # lazy: see module docstring

            self._process = psutil.Process(os.getpid())
            self._process.cpu_percent(None)  # primes the CPU counter; the first reading is meaningless
        return self._process

    def resources(self) -> tuple[float | None, int | None, float | None]:
        """(CPU % since the previous call, RSS bytes, % of system RAM) for this process."""
        try:
            proc = self._proc()
            with proc.oneshot():
                rss = int(proc.memory_info().rss)
                return float(proc.cpu_percent(None)), rss, round(float(proc.memory_percent()), 3)
        except Exception:  # psutil can fail in odd sandboxes; telemetry without it is still telemetry
            return None, None, None

    def sample(self) -> dict[str, Any]:
        """Telemetry fields for one sample; the window restarts here."""
        now = time.monotonic()
        with self._lock:
            inferences, errors = self.inferences, self.errors
            window_s, window_n = now - self._window_start, inferences - self._window_base
            self._window_start, self._window_base = now, inferences
            repairs = dict(self.repairs)
        p50, p95 = self.latency_ms()
        cpu, rss, mem = self.resources()
        return {
            "uptime_s": round(now - self.started, 3),
            "inferences": inferences,
            "errors": errors,
            "window_s": round(window_s, 3),
            "window_inferences": window_n,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "cpu_percent": cpu,
            "rss_bytes": rss,
            "mem_percent": mem,
            "repairs": repairs,
        }

    # -- Prometheus -----------------------------------------------------------------------------

    @property
    def registry(self) -> "CollectorRegistry":
        """This agent's own registry (created on first use) holding the ``edgewise_agent_*`` metrics."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            self._registry = registry
        return self._registry

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format for ``/metrics``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    """Reads the Monitor at scrape time: the hot path never touches prometheus_client."""

    def __init__(self, monitor: Monitor) -> None:
        self.m = monitor

    def describe(self) -> list[Any]:
        return []  # names are fixed; nothing to check for collisions in a per-agent registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, SummaryMetricFamily

        m = self.m
        status = m.status()
        with m._lock:
            inferences, errors, bad, lat_sum = m.inferences, m.errors, m.bad_messages, m._lat_sum_ns
            updates = dict(m.updates)
            bytes_sent = dict(m.bytes_sent)
            repairs = dict(m.repairs)
        yield CounterMetricFamily("edgewise_agent_inferences", "Predictions served.", value=inferences)
        yield CounterMetricFamily("edgewise_agent_errors", "Predictions that failed (bad input or runtime error).", value=errors)
        yield CounterMetricFamily("edgewise_agent_bad_messages", "MQTT messages refused as not following the protocol.", value=bad)
        upd = CounterMetricFamily("edgewise_agent_updates", "Model update attempts by result.", labels=["result"])
        for result, n in sorted(updates.items()):
            upd.add_metric([result], n)
        yield upd
        sent = CounterMetricFamily("edgewise_agent_bytes_sent", "Payload bytes published, by bandwidth mode.", labels=["mode"])
        for mode, n in sorted(bytes_sent.items()):
            sent.add_metric([mode], n)
        yield sent
        rep = CounterMetricFamily(
            "edgewise_agent_input_repairs", "Input values repaired by the bundle's preprocessing, by step and feature.",
            labels=["step", "field"],
        )
        for key, n in sorted(repairs.items()):
            step, _, field = key.partition("/")
            rep.add_metric([step, field], n)
        yield rep
        lat = SummaryMetricFamily(
            "edgewise_agent_latency_seconds", "Model latency (quantiles over the last calls).",
            count_value=inferences, sum_value=lat_sum / 1e9,
        )
        p50, p95 = m.latency_ms()
        if p50 is not None and p95 is not None:
            lat.add_sample("edgewise_agent_latency_seconds", {"quantile": "0.5"}, p50 / 1e3)
            lat.add_sample("edgewise_agent_latency_seconds", {"quantile": "0.95"}, p95 / 1e3)
        yield lat
        dropped = CounterMetricFamily("edgewise_agent_outbox_dropped", "Outbox records dropped because it was full.", labels=["priority"])
        for prio, n in sorted(status.get("outbox_dropped", {}).items()):
            dropped.add_metric([prio], n)
        yield dropped
        shadow = status.get("shadow")
        if shadow:  # shadow mode (agent.shadow): comparisons of the candidate with the committed model since start
            sh = CounterMetricFamily("edgewise_agent_shadow_inputs", "Sampled inputs in shadow mode, by outcome "
                                     "(compared, agreed, errors, skipped: queue full).", labels=["outcome"])
            for outcome in ("compared", "agreed", "errors", "skipped"):
                sh.add_metric([outcome], shadow.get(outcome, 0))
            yield sh
            if shadow.get("model"):
                yield InfoMetricFamily("edgewise_agent_shadow_candidate", "The shadow candidate loaded beside the served model.",
                                       value={"model": str(shadow["model"]), "version": str(shadow.get("version") or "")})
        yield GaugeMetricFamily("edgewise_agent_outbox_pending", "Records waiting to be sent.", value=status.get("outbox_pending", 0))
        yield GaugeMetricFamily("edgewise_agent_seq_issued", "Sequence numbers issued so far.", value=status.get("seq_issued", 0))
        yield GaugeMetricFamily("edgewise_agent_connected", "1 while the MQTT session is up.", value=1 if status.get("connected") else 0)
        yield GaugeMetricFamily("edgewise_agent_uptime_seconds", "Seconds since the agent started.", value=m.uptime_s())
        if status.get("model"):
            yield InfoMetricFamily(
                "edgewise_agent_model", "The model being served.",
                value={"model": str(status["model"]), "version": str(status.get("version") or "")},
            )
        try:
            proc = m._proc()
            with proc.oneshot():
                rss = proc.memory_info().rss
                times = proc.cpu_times()
            yield GaugeMetricFamily("edgewise_agent_resident_memory_bytes", "Resident memory of the agent process.", value=rss)
            yield CounterMetricFamily("edgewise_agent_cpu_seconds", "CPU time of the agent process.", value=times.user + times.system)
        except Exception:
            pass
