"""Shadow mode: a candidate model answers the device's live inputs beside the committed one, and is never served.

Why: a staged rollout wants to know how a new version behaves on *this* fleet's
inputs before any device serves it. The control plane names a candidate in
``DesiredState.shadow``; the agent fetches and verifies it exactly as an update
(the updater's TUF target check or signature-only trust, sha256, signature,
name/version, smoke test, golden inputs) but stores it under ``state/shadow/``,
never in a slot, and loads it in a second ONNX Runtime session with one
intra-op thread and the candidate bundle's own preprocessing.

The serving path pays one attribute test when no candidate is loaded and, with
one, a counter and (on every ``sample_every``-th input) a copy of the input and
a non-blocking ``put`` on a bounded queue; a full queue skips the sample and
counts it. One background thread runs the candidate and compares its answer
with the one the committed model already served: the top-1 class for
classifiers, ``allclose`` for everything else. The window's counts go out in
``Telemetry.shadow`` / ``Summary.shadow`` (:meth:`Shadow.take_interval`).

Example (the agent builds its ``Shadow`` as ``agent.shadow``; the desired state drives it with ``want``)::

    agent.shadow.want(ShadowTarget(model="digits", version="1.1.0", artifact=ref, target="digits/1.1.0.ewb"))
    agent.predict(x)                     # served by the committed model; the candidate sees x later
    stats = agent.shadow.take_interval() # ShadowStats(compared=.., agreed=.., ...), what telemetry_tick sends
    agent.shadow.want(None)              # unload
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..protocol import DesiredState
from ..protocol.messages import ShadowStats, ShadowTarget

if TYPE_CHECKING:
    from .runtime import LoadedModel
    from .updater import Updater

log = logging.getLogger("edgewise.agent.shadow")

QUEUE_SIZE = 32  # inputs waiting for the candidate; beyond this a sample is skipped (serving never waits)
LATENCY_KEEP = 2048  # candidate/committed latencies kept per window for the p95
RTOL, ATOL = 1e-2, 1e-3  # regressors: outputs agree when numpy.allclose(committed, candidate, RTOL, ATOL) per row
NICE = 19  # the candidate's thread runs at the lowest CPU priority (Linux, per thread)
DUTY = 0.5  # the candidate's thread works at most this fraction of the time (of one core); it rests the remainder
RETRY_BASE_S, RETRY_CAP_S = 2.0, 60.0  # a candidate whose download failed is fetched again with this backoff
DISK_MARGIN = 16 * 2**20

Emit = Callable[..., Any]  # Agent._emit_event(kind, message, severity=..., detail=...)


class ShadowRefused(RuntimeError):
    """The candidate was not loaded; the message says why. ``retryable`` when a later fetch may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def _rows(out: Mapping[str, np.ndarray]) -> int:
    for arr in out.values():
        shape = getattr(arr, "shape", ())
        return int(shape[0]) if shape else 1
    return 0


def _top1(out: Mapping[str, np.ndarray], classifier: bool) -> np.ndarray | None:
    """Top-1 class per row when the outputs hold class scores, else None (compare as a regressor).

    Class scores are the agent's classifier output (``service.class_output``) with two or more columns; for a
    model not known to be a classifier (its manifest names no labels) only an output named like "prob"/"score" counts.
    """
    from .service import class_output  # the agent's one definition of "the classifier output"

    scores = class_output(out)
    if scores is None or scores.shape[1] < 2:
        return None
    if not classifier and not any(scores is v and ("prob" in k.lower() or "score" in k.lower()) for k, v in out.items()):
        return None
    return scores.argmax(axis=1)


def agreement(
    committed: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *, classifier: bool = False,
    rtol: float = RTOL, atol: float = ATOL,
) -> tuple[int, int]:
    """(rows compared, rows on which the two answers agree).

    Classifiers (``classifier``: the committed bundle names labels; or an output named like "prob"/"score")
    agree on a row when the top-1 class is the same.
    Anything else agrees when every output is ``allclose`` (numbers) or equal (other dtypes) row by row;
    outputs are matched by name, or by position when the two models name them differently.

    >>> import numpy as np
    >>> agreement({"probabilities": np.array([[0.9, 0.1], [0.2, 0.8]])}, {"probabilities": np.array([[0.6, 0.4], [0.7, 0.3]])})
    (2, 1)
    >>> agreement({"y": np.array([[1.0], [2.0]])}, {"y": np.array([[1.001], [2.5]])})
    (2, 1)
    """
    n = _rows(committed)
    if n == 0:
        return 0, 0
    top = _top1(committed, classifier)
    if top is not None:
        other = _top1(candidate, True)
        if other is None or other.shape != top.shape:
            return n, 0
        return n, int(np.count_nonzero(top == other))
    pairs: list[tuple[Any, Any]]
    if set(committed) == set(candidate):
        pairs = [(committed[k], candidate[k]) for k in committed]
    elif len(committed) == len(candidate):
        pairs = list(zip(committed.values(), candidate.values()))
    else:
        return n, 0
    ok = np.ones(n, dtype=bool)
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim == 0 or a.shape[0] != n:
            return n, 0
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            same = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        else:
            same = a == b
        ok &= np.asarray(same).reshape(n, -1).all(axis=1)
    return n, int(np.count_nonzero(ok))


def _copy(inputs: Any) -> Any:
    """The caller may reuse its input buffer after predict returns (a camera loop does): the candidate gets a copy."""
    if isinstance(inputs, np.ndarray):
        return inputs.copy()
    if isinstance(inputs, Mapping):
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    return inputs


def _p95_ms(values: "deque[int]") -> float | None:
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, dtype=np.float64, count=len(values)), 95) / 1e6)


def _lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: nice 19 applies per thread), so the scheduler gives
    the serving threads the CPU first; elsewhere, or when refused, the thread keeps the process's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError) as exc:
        log.debug("shadow: cannot lower the candidate thread's priority: %s", exc)


class Shadow:
    """The shadow candidate of one agent: what it is, its worker thread, and the window's comparison counts.

    ``want(target)`` (from the desired state) is quick and returns at once; loading, replacing and unloading
    happen on the worker thread, which is started on the first candidate. ``offer`` is the serving-path hook.
    """

    def __init__(
        self, updater: "Updater | None", root: Path, *, emit: Emit | None = None, queue_size: int = QUEUE_SIZE,
        rtol: float = RTOL, atol: float = ATOL, duty: float = DUTY,
    ) -> None:
        self.updater = updater
        self.duty = min(1.0, max(0.01, float(duty)))
        self.root = Path(root)
        self.rtol, self.atol = rtol, atol
        self._emit = emit
        # A SimpleQueue (C, lock-free put) bounded by checking its size first: ~0.3 µs on the serving path instead of
        # ~2 µs for queue.Queue's lock and condition. The bound can be overshot by one item per concurrent serving thread.
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.queue_size = max(1, int(queue_size))
        self.active = False  # read on the serving path: True while a candidate is loaded
        self.candidate: "LoadedModel | None" = None
        self.target: ShadowTarget | None = None  # what the desired state asks for (None: no shadow)
        self.problem: str | None = None  # why the wanted candidate is not loaded (refused, still fetching, ...)
        self._every = 1
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = False
        self._retry_at = 0.0
        self._attempts = 0
        self.totals: dict[str, int] = {"compared": 0, "agreed": 0, "errors": 0, "skipped": 0}  # since start, for /metrics
        self._reset_window()

    # -- control (desired state; any thread, quick) ----------------------------------------------

    def want(self, target: ShadowTarget | None) -> None:
        """Follow ``DesiredState.shadow``: load this candidate (replacing another), or unload with None."""
        with self._lock:
            if target == self.target:
                return
            self.target = target
            self._changed = True
            self._attempts = 0
            self._retry_at = 0.0
        if target is not None:
            self.start()
        self._queue.put(None)  # wake the worker if it waits for a sample (a sentinel, not a sample: never refused)

    def start(self) -> None:
        """Start the comparison thread (``want`` does on the first candidate; idle agents have none)."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="edgewise-shadow", daemon=True)
            self._thread.start()

    def use(self, model: "LoadedModel | None", *, sample_every: int = 1) -> None:
        """Compare against ``model`` now (already verified and loaded by the caller), or unload with None."""
        with self._lock:
            old = self.candidate
            self.active = False
            self.candidate = model
            self._every = max(1, int(sample_every))
            self._counter = itertools.count()
            self._add_totals(self._compared, self._agreed, self._errors, self._skipped)  # the old window's counts stay in /metrics
            self._reset_window()
            self.problem = None
            self.active = model is not None
        if old is not None and old is not model:
            self._drain()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and unload (the agent stops)."""
        self._stop.set()
        self.active = False
        self._queue.put(None)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self.candidate = None

    # -- the serving path ----------------------------------------------------------------------

    def offer(self, model: "LoadedModel", inputs: Any, outputs: Mapping[str, np.ndarray], latency_ns: int) -> None:
        """A prediction was served: queue every ``sample_every``-th one for the candidate, or skip it when the queue is full."""
        if next(self._counter) % self._every:
            return
        q = self._queue
        if q.qsize() >= self.queue_size:
            self._skipped += 1  # serving threads race on this increment: a rare lost count is tolerable here
        else:
            q.put((model, _copy(inputs), outputs, latency_ns))

    # -- reading -------------------------------------------------------------------------------

    def take_interval(self) -> ShadowStats | None:
        """The counts since the previous call (the window restarts here); None while no candidate is loaded."""
        with self._lock:
            cand = self.candidate
            if cand is None:
                return None
            compared, agreed, errors, skipped = self._compared, self._agreed, self._errors, self._skipped
            lat_cand, lat_comm = self._lat_cand, self._lat_comm
            self._reset_window()
            self._add_totals(compared, agreed, errors, skipped)
        return ShadowStats(
            model=cand.name, version=cand.version, compared=compared, agreed=agreed, errors=errors, skipped=skipped,
            latency_p95_ms=_p95_ms(lat_cand), committed_latency_p95_ms=_p95_ms(lat_comm),
        )

    def describe(self) -> dict[str, Any] | None:
        """For ``GET /v1/health``: the wanted candidate, whether it is loaded, and why not."""
        target, cand = self.target, self.candidate
        if target is None and cand is None:
            return None
        return {
            "model": target.model if target else cand.name if cand else None,
            "version": target.version if target else cand.version if cand else None,
            "loaded": self.active,
            "sample_every": self._every,
            "queued": self._queue.qsize(),
            "problem": self.problem,
        }

    def metrics(self) -> dict[str, Any] | None:
        """Counters since the agent started (windows already taken plus the current one) for ``/metrics``."""
        with self._lock:
            cand = self.candidate
            totals = dict(self.totals)
            for key, n in (("compared", self._compared), ("agreed", self._agreed), ("errors", self._errors), ("skipped", self._skipped)):
                totals[key] += n
        if cand is None and not any(totals.values()):
            return None
        return {"model": cand.name if cand else None, "version": cand.version if cand else None, **totals}

    def _add_totals(self, compared: int, agreed: int, errors: int, skipped: int) -> None:
        t = self.totals
        t["compared"] += compared
        t["agreed"] += agreed
        t["errors"] += errors
        t["skipped"] += skipped

    def _reset_window(self) -> None:
        self._compared = self._agreed = self._errors = self._skipped = 0
        self._lat_cand: deque[int] = deque(maxlen=LATENCY_KEEP)
        self._lat_comm: deque[int] = deque(maxlen=LATENCY_KEEP)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            if self._changed or (self.target is not None and self.candidate is None and self._retry_at and time.monotonic() >= self._retry_at):
                try:
                    self._follow()
                except Exception as exc:  # the shadow must never take the agent down
                    log.exception("shadow: cannot follow the desired candidate")
                    self.problem = f"internal error: {exc}"
                continue
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is not None:
                t0 = time.perf_counter()
                self._compare(*job)
                rest = (time.perf_counter() - t0) * (1.0 / self.duty - 1.0)
                if rest > 0:  # leave the serving threads the CPU (and the GIL): a busy candidate skips samples instead
                    self._stop.wait(rest)

    def _compare(self, committed: "LoadedModel", inputs: Any, served: Mapping[str, np.ndarray], served_ns: int) -> None:
        cand = self.candidate
        if cand is None:
            return
        t0 = time.perf_counter_ns()
        try:
            out, _ = cand.run(inputs)
        except Exception as exc:
            with self._lock:
                if self.candidate is cand:
                    self._errors += _rows(served) or 1  # counted per input row, like ``compared``
            log.debug("shadow candidate %s %s failed on a served input: %s", cand.name, cand.version, exc)
            return
        took = time.perf_counter_ns() - t0
        try:
            n, same = agreement(served, out, classifier=committed.manifest.labels is not None, rtol=self.rtol, atol=self.atol)
        except Exception as exc:  # outputs that cannot be compared count as disagreement
            log.debug("shadow: cannot compare outputs: %s", exc)
            n, same = _rows(served) or 1, 0
        with self._lock:
            if self.candidate is not cand:
                return  # replaced while it ran: this answer belongs to no window
            self._compared += n
            self._agreed += same
            self._lat_cand.append(took)
            self._lat_comm.append(served_ns)

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _follow(self) -> None:
        """Converge to ``self.target``: unload, load or replace (worker thread)."""
        with self._lock:
            target, self._changed = self.target, False
        cand = self.candidate
        if cand is not None and (target is None or (cand.name, cand.version, cand.sha256) != (target.model, target.version, target.artifact.sha256)):
            self.use(None)
            self._event("shadow.stopped", f"shadow candidate {cand.name} {cand.version} unloaded", detail={"model": cand.name, "version": cand.version})
        if target is None:
            self.problem = None
            self._forget_files(keep=None)
            return
        if self.candidate is not None:  # same candidate, other sample rate
            with self._lock:
                self._every = target.sample_every
            return
        what = {"model": target.model, "version": target.version, "sample_every": target.sample_every}
        if self._attempts == 0:
            self.problem = "fetching and verifying the candidate"
        try:
            model = self.load(target)
        except ShadowRefused as exc:
            self.problem = str(exc)
            first = self._attempts == 0
            self._attempts += 1
            if exc.retryable:
                self._retry_at = time.monotonic() + min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (self._attempts - 1))
            else:
                self._retry_at = 0.0
            if first:  # one event per candidate, not one per retry
                self._event("shadow.refused", f"shadow candidate {target.model} {target.version} not loaded: {exc}", severity="error",
                            detail={**what, "reason": str(exc), "retrying": exc.retryable})
            log.error("shadow candidate %s %s not loaded: %s", target.model, target.version, exc)
            return
        with self._lock:
            stale = self._changed or self.target != target
        if stale:  # the desired state moved on while we fetched
            return
        self._retry_at = 0.0
        self.use(model, sample_every=target.sample_every)
        log.info("shadow candidate %s %s loaded (every %d-th input)", model.name, model.version, target.sample_every)
        self._event("shadow.started", f"shadow candidate {model.name} {model.version} loaded beside the committed model",
                    detail={**what, "sha256": model.sha256, "key_id": model.key_id})

    def load(self, target: ShadowTarget) -> "LoadedModel":
        """Fetch and verify ``target`` exactly as an update would be (TUF target or signature, sha256, name and
        version, smoke test, golden inputs), store it under ``root`` and load it with one intra-op thread.
        Raise :class:`ShadowRefused` naming what was wrong."""
        from ..bundle import BundleError, verify_bundle
        from .golden import check_golden
        from .runtime import LoadedModel, ModelLoadError
        from .updater import FetchError, TufUpdateError

        up = self.updater
        what = f"{target.model} {target.version}"
        if up is None or up.fetcher is None:
            raise ShadowRefused("the agent has no server URL to fetch the candidate from; start it with --server")
        desired = DesiredState(device_id="shadow", generation=0, model=target.model, version=target.version,
                               artifact=target.artifact, target=target.target)
        info = None
        if up.require_tuf:
            try:
                # The updater's own TUF gate (signed length, sha256, model, version), under its lock: python-tuf's
                # metadata cache is not safe for two refreshes at once, and an update may be refreshing it now.
                with up._lock:
                    info, artifact = up._tuf_artifact(desired)
            except TufUpdateError as exc:
                raise ShadowRefused(f"TUF refused the candidate ({exc.kind}): {exc}", retryable=exc.retryable) from None
        else:
            artifact = target.artifact
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / f"{artifact.sha256}.ewb"
        self._forget_files(keep=dest)
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if free is not None and free < artifact.size + DISK_MARGIN:
            raise ShadowRefused(f"not enough disk space for the candidate {what}: needs {artifact.size + DISK_MARGIN:,} bytes, "
                                f"{free:,} free on {self.root}; free some space", retryable=True)
        try:
            path = up.fetcher.fetch(artifact, dest)
            if info is not None:
                from .tuf_client import verify_target_file

                verify_target_file(info, path)
        except TufUpdateError as exc:
            dest.unlink(missing_ok=True)
            raise ShadowRefused(f"TUF refused the download ({exc.kind}): {exc}", retryable=True) from None
        except FetchError as exc:
            raise ShadowRefused(f"download failed: {exc}", retryable=True) from None
        except OSError as exc:
            raise ShadowRefused(f"download failed: cannot write {dest}: {exc.strerror or exc}", retryable=True) from None
        try:
            vb = verify_bundle(path, up.trusted())
        except BundleError as exc:
            dest.unlink(missing_ok=True)
            raise ShadowRefused(f"verification failed: {exc}") from None
        if (vb.manifest.name, vb.manifest.version) != (target.model, target.version):
            dest.unlink(missing_ok=True)
            raise ShadowRefused(f"bundle holds {vb.manifest.name} {vb.manifest.version} but the desired state names {what}; refusing")
        try:
            model = LoadedModel.from_bundle(vb, threads=1)  # one thread: the candidate must not compete with serving
            model.smoke_test()
            check_golden(model, vb)
        except (BundleError, ModelLoadError, OSError) as exc:
            raise ShadowRefused(f"the candidate does not load: {exc}") from None
        return model

    def _forget_files(self, keep: Path | None) -> None:
        """Only the wanted candidate's bundle is kept under ``root`` (a restart finds it and does not download again)."""
        if not self.root.is_dir():
            return
        names = {keep.name, keep.name + ".part"} if keep is not None else set()
        for p in self.root.iterdir():
            if p.name not in names:
                p.unlink(missing_ok=True)

    def _event(self, kind: str, message: str, *, severity: str = "info", detail: dict[str, Any] | None = None) -> None:
        if self._emit is None:
            return
        try:
            self._emit(kind, message, severity=severity, detail=detail or {})
        except Exception:
            log.debug("shadow: cannot emit %s", kind, exc_info=True)
