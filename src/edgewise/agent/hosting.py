"""Several models on one device: every placed model runs in its own worker process, within its own limits.

The control plane places models beside the primary one (``DesiredState.placements``, issue 7). The agent
hosts each in a separate process so one model cannot starve another:

- **threads**: the worker's ONNX Runtime session gets ``intra_op_num_threads = threads`` and
  ``inter_op_num_threads = 1`` (and OpenMP/BLAS are held to the same count through the environment);
- **memory**: the worker sets ``RLIMIT_AS`` on itself to its baseline address space (interpreter, numpy and
  ONNX Runtime imported, measured right before the model is loaded) plus the model's footprint (the variant
  profile's ``peak_rss_mb`` figure, else the bundle size × :data:`MODEL_RAM_FACTOR`) plus ``memory_mb``,
  plus one stack per intra-op thread. ONNX Runtime's CPU arena is off, so an allocation over the limit fails
  *in that worker* (``std::bad_alloc`` → a clean error), instead of the kernel's OOM killer picking a victim;
- **trust**: a placed bundle is fetched and verified exactly like a primary update (TUF target when the
  device has a TUF root, then sha256 and the bundle signature; see :func:`fetch_placed`), stored under
  ``state/placed/<model>/``, and verified again by the worker on every start;
- **supervision**: a worker that dies is restarted with exponential backoff (a ``placement.crash`` event
  goes out each time); a model that cannot load (bad signature, over its memory limit, broken graph) is
  reported ``failed`` with the reason and not retried until its placement changes.

The status of each goes into ``DeviceState.hosted``; the local API serves them at
``POST /v1/models/{name}/predict``. Worker protocol (stdin/stdout of ``python -m edgewise.agent.hosting``):
frames of a 4-byte big-endian length and a msgpack map; arrays travel as ``{"__nd__": dtype, "shape", "data"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..fsutil import atomic_write
from ..protocol import DesiredState
from ..protocol.messages import HostedModel, ModelPlacement

if TYPE_CHECKING:
    from .updater import Updater

log = logging.getLogger("edgewise.agent.hosting")

MODEL_RAM_FACTOR = 2.0  # resident size of a model ≈ bundle size × this (file bytes + ORT's initializers); control.placements uses the same
RESTART_BASE_S = 0.5
RESTART_CAP_S = 60.0
STABLE_AFTER_S = 30.0  # a worker that served this long resets the restart backoff
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
MAX_FRAME = 64 * 2**20
PLACEMENTS_FILE = "placements.json"
VERIFIED_FILE = "verified.json"


class PlacementError(RuntimeError):
    """A placed model cannot be served; ``status`` is the HTTP status the local API answers with."""

    def __init__(self, message: str, *, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class UnknownPlacementError(PlacementError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


# -- framing (both sides) --------------------------------------------------------------------------


def _pack_value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "OUS":
            return v.tolist()
        a = np.ascontiguousarray(v)
        return {"__nd__": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _unpack_value(v: Any) -> Any:
    if isinstance(v, dict) and "__nd__" in v:
        return np.frombuffer(v["data"], dtype=np.dtype(v["__nd__"])).reshape(v["shape"])
    return v


def _write_frame(f: Any, obj: Mapping[str, Any]) -> None:
    import msgpack

    body = msgpack.packb(obj, use_bin_type=True)
    f.write(struct.pack(">I", len(body)) + body)
    f.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no answer from the worker in time")
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("the worker closed its pipe (it exited)")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, timeout: float | None = None) -> dict[str, Any]:
    import msgpack

    deadline = None if timeout is None else time.monotonic() + timeout
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if n > MAX_FRAME:
        raise EOFError(f"frame of {n} bytes exceeds {MAX_FRAME}; the stream is out of sync")
    obj = msgpack.unpackb(_read_exact(fd, n, deadline), raw=False)
    if not isinstance(obj, dict):
        raise EOFError("the worker sent something that is not a map")
    return obj


# -- footprint, shared rule with control.placements ---------------------------------------------------


def model_footprint_mb(manifest: Mapping[str, Any], size_bytes: int) -> float:
    """What a model itself takes in RAM: its variant profile's ``peak_rss_mb`` when the bundle has one (measured
    by ``edgewise optimize``), else the bundle size × MODEL_RAM_FACTOR. The control plane's fit check uses the same rule."""
    figures = ((manifest.get("variant") or {}).get("figures") or {}) if isinstance(manifest, Mapping) else {}
    peak = figures.get("peak_rss_mb")
    if isinstance(peak, (int, float)) and peak > 0:
        return float(peak)
    return size_bytes / 2**20 * MODEL_RAM_FACTOR


# -- fetch + verify (the updater's trust path) -----------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class FetchFailed(RuntimeError):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def fetch_placed(updater: "Updater", placement: ModelPlacement, folder: Path) -> Path:
    """Fetch and verify a placed bundle exactly as the updater does a primary update, into ``folder``.

    With TUF (the default trust), only the signed target ``placement.target`` is accepted, with its signed
    length and sha256; then the bundle's own signature against the device's trusted keys, and its manifest
    must name ``placement.model`` ``placement.version``. A copy verified before (``verified.json``) is reused
    without the network, so a device restarted offline serves its placements again. Raises FetchFailed.
    """
    from ..bundle import BundleError, verify_bundle
    from .updater import FetchError, TufUpdateError

    folder.mkdir(parents=True, exist_ok=True)
    record = _read_json(folder / VERIFIED_FILE)
    if record and (record.get("model"), record.get("version")) == (placement.model, placement.version):
        known = folder / f"{record.get('sha256')}.ewb"
        if known.is_file() and _sha256_file(known) == record.get("sha256"):
            return known  # the worker checks the signature again before loading it
    what = f"{placement.model} {placement.version}"
    if updater.fetcher is None:
        raise FetchFailed("the agent has no server URL to fetch placed models from; start it with --server", retryable=False)
    info = None
    artifact = placement.artifact
    try:
        if updater.require_tuf:
            desired = DesiredState(device_id="placement", generation=0, model=placement.model, version=placement.version,
                                   artifact=placement.artifact, target=placement.target)
            with updater._lock:  # one TUF refresh at a time: the primary update path uses the same client and cache
                info, artifact = updater._tuf_artifact(desired)  # the same signed-target rules as a primary update
        dest = folder / f"{artifact.sha256}.ewb"
        path = updater.fetcher.fetch(artifact, dest)
        if info is not None:
            from .tuf_client import verify_target_file

            verify_target_file(info, path)
    except TufUpdateError as exc:
        raise FetchFailed(f"TUF refused placed model {what} ({exc.kind}): {exc}", retryable=exc.retryable) from None
    except FetchError as exc:
        raise FetchFailed(f"download of placed model {what} failed: {exc}", retryable=True) from None
    except OSError as exc:
        raise FetchFailed(f"cannot store placed model {what} in {folder}: {exc.strerror or exc}", retryable=True) from None
    try:
        vb = verify_bundle(path, updater.trusted())
    except BundleError as exc:
        path.unlink(missing_ok=True)
        raise FetchFailed(f"placed model {what}: verification failed: {exc}", retryable=False) from None
    if (vb.manifest.name, vb.manifest.version) != (placement.model, placement.version):
        path.unlink(missing_ok=True)
        raise FetchFailed(f"placed bundle holds {vb.manifest.name} {vb.manifest.version}, the placement asks for {what}; refusing",
                          retryable=False)
    for old in folder.glob("*.ewb*"):
        if old != path:
            old.unlink(missing_ok=True)
    atomic_write(folder / VERIFIED_FILE, json.dumps({"model": placement.model, "version": placement.version, "sha256": vb.sha256}).encode())
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- one placed model, supervised -------------------------------------------------------------------


class PlacedModel:
    """One placement: a supervisor thread that fetches, starts, watches and restarts its worker process."""

    def __init__(self, placement: ModelPlacement, folder: Path, updater: "Updater", *,
                 on_change: Callable[[], None], emit: Callable[..., Any]) -> None:
        self.placement = placement
        self.folder = folder
        self._updater = updater
        self._on_change = on_change
        self._emit = emit
        self.status = "starting"
        self.reason: str | None = None
        self.restarts = 0
        self.info: dict[str, Any] = {}  # what the worker said when ready (threads, limits, inputs)
        self._proc: subprocess.Popen[bytes] | None = None
        self._io = threading.Lock()  # one request at a time through the pipe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"edgewise-placed-{placement.model}", daemon=True)

    @property
    def name(self) -> str:
        return self.placement.model

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def start(self) -> None:
        self._thread.start()

    def hosted(self) -> HostedModel:
        pid = self.pid
        return HostedModel(
            model=self.placement.model, version=self.placement.version, status=self.status,  # type: ignore[arg-type]
            reason=self.reason, threads=self.placement.threads, memory_mb=self.placement.memory_mb,
            rss_mb=_rss_mb(pid) if pid is not None and self.status == "serving" else None,
        )

    def _set(self, status: str, reason: str | None) -> None:
        changed = (status, reason) != (self.status, self.reason)
        self.status, self.reason = status, reason
        if changed:
            try:
                self._on_change()
            except Exception:
                log.debug("on_change failed", exc_info=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and the supervisor (the placement was removed or replaced, or the agent stops)."""
        self._stop.set()
        self._kill()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.status = "stopped"

    def _kill(self) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        try:
            p.stdin.close()  # type: ignore[union-attr]  # the worker exits on EOF
        except OSError:
            pass
        try:
            p.wait(2.0)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                log.error("worker %d of %s does not die", p.pid, self.name)

    # -- supervisor thread ------------------------------------------------------------------------

    def _supervise(self) -> None:
        attempt = 0
        path: Path | None = None
        while not self._stop.is_set():
            if path is None:
                try:
                    path = fetch_placed(self._updater, self.placement, self.folder)
                except FetchFailed as exc:
                    if not exc.retryable:
                        self._fail(str(exc), kind="refused")
                        return
                    delay = backoff(attempt, base=RESTART_BASE_S, cap=RESTART_CAP_S)
                    attempt += 1
                    self._set("starting", f"{exc}; retrying in {delay:.1f}s")
                    self._stop.wait(delay)
                    continue
                except Exception as exc:  # never let the supervisor die silently
                    self._fail(f"cannot fetch {self.placement.model} {self.placement.version}: {type(exc).__name__}: {exc}", kind="refused")
                    return
                attempt = 0
            if self._stop.is_set():
                return
            outcome, detail = self._run_worker(path)
            if self._stop.is_set():
                return
            if outcome == "refused":  # deterministic: the same bundle and limits would fail the same way
                self._fail(detail, kind="refused")
                return
            self.restarts += 1
            delay = backoff(attempt, base=RESTART_BASE_S, cap=RESTART_CAP_S)
            attempt = 0 if outcome == "stable" else attempt + 1
            message = f"worker of {self.name} {self.placement.version} died ({detail}); restart {self.restarts} in {delay:.1f}s"
            log.error("%s", message)
            self._emit("placement.crash", message, severity="error",
                       detail={"model": self.name, "version": self.placement.version, "restarts": self.restarts, "cause": detail})
            self._set("starting", message)
            self._stop.wait(delay)

    def _fail(self, reason: str, *, kind: str) -> None:
        log.error("placed model %s: %s", self.name, reason)
        self._emit("placement.failed", f"placed model {self.name} {self.placement.version} failed: {reason}", severity="error",
                   detail={"model": self.name, "version": self.placement.version, "kind": kind, "reason": reason})
        self._set("failed", reason)

    def _run_worker(self, path: Path) -> tuple[str, str]:
        """Start one worker and wait until it exits: ("refused", why) when it never got ready for a reason a
        restart cannot fix, ("crashed" | "stable", how it died) otherwise."""
        p = self.placement
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(p.threads) if var == "OMP_NUM_THREADS" else "1"
        env["MALLOC_ARENA_MAX"] = "2"  # glibc reserves 64 MB of address space per thread arena otherwise
        cmd = [sys.executable, "-m", "edgewise.agent.hosting", "--bundle", str(path), "--trust", str(self._updater.trust_dir),
               "--threads", str(p.threads), "--memory-mb", str(p.memory_mb), "--model", p.model, "--version", p.version]
        with open(self.folder / "worker.log", "wb") as errlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, env=env, close_fds=True)
        self._proc = proc
        if self._stop.is_set():  # stopped while spawning: stop() may have looked before _proc was set
            self._kill()
            return "stopped", ""
        try:
            ready = _read_frame(proc.stdout.fileno(), READY_TIMEOUT_S)  # type: ignore[union-attr]
        except (EOFError, TimeoutError, ValueError) as exc:
            self._kill()
            return "crashed", f"before it was ready: {_exit_text(proc)}{_log_tail(self.folder / 'worker.log')} ({exc})"
        if not ready.get("ok"):
            self._kill()
            return "refused", str(ready.get("error") or "the worker refused the model")
        self.info = ready
        started = time.monotonic()
        self._set("serving", None)
        log.info("placed model %s %s serving in worker %d (%s intra-op thread(s), limit %s MB)", p.model, p.version, proc.pid,
                 ready.get("intra_op_threads"), ready.get("limit_mb"))
        while not self._stop.is_set():
            try:
                proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._stop.is_set():
            return "stopped", ""
        return ("stable" if time.monotonic() - started >= STABLE_AFTER_S else "crashed"), _exit_text(proc) + _log_tail(self.folder / "worker.log")

    # -- requests ---------------------------------------------------------------------------------

    def request(self, msg: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Send one request to the worker and return its answer; PlacementError when it is not serving."""
        if self.status != "serving":
            raise PlacementError(f"placed model {self.name} is {self.status}" + (f": {self.reason}" if self.reason else ""))
        with self._io:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise PlacementError(f"placed model {self.name}: its worker is not running; it restarts by itself")
            try:
                _write_frame(proc.stdin, msg)
                return _read_frame(proc.stdout.fileno(), timeout)  # type: ignore[union-attr]
            except TimeoutError:
                proc.kill()  # a stuck worker would hold every later request: the supervisor restarts it
                raise PlacementError(f"placed model {self.name} did not answer within {timeout:.0f}s; its worker was restarted") from None
            except (EOFError, OSError, ValueError) as exc:
                raise PlacementError(f"placed model {self.name}: its worker died during the request ({exc}); it restarts by itself") from None


def backoff(attempt: int, *, base: float = RESTART_BASE_S, cap: float = RESTART_CAP_S) -> float:
    """Delay before restart ``attempt`` (0-based): base × 2^attempt, at most cap. No jitter: these restarts are
    one device's own, nothing to de-synchronize (unlike a fleet reconnecting to its broker, see agent.link)."""
    return min(cap, base * 2.0 ** min(attempt, 32))


def _exit_text(proc: subprocess.Popen[bytes]) -> str:
    rc = proc.poll()
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _log_tail(path: Path, n: int = 300) -> str:
    try:
        text = path.read_bytes()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""
    return f"; log: …{text.splitlines()[-1]}" if text else ""


# -- every placed model of the agent --------------------------------------------------------------


class Hosting:
    """The agent's placed models: ``apply(placements)`` converges to a desired list (start new ones, stop
    removed ones, restart changed ones), ``predict(name, inputs)`` serves, ``hosted()`` reports."""

    def __init__(self, root: Path, updater: "Updater", *, on_change: Callable[[], None] = lambda: None,
                 emit: Callable[..., Any] = lambda *a, **k: None) -> None:
        self.root = Path(root)
        self._updater = updater
        self._on_change = on_change
        self._emit = emit
        self._lock = threading.Lock()
        self._models: dict[str, PlacedModel] = {}
        self._stopped = False

    def apply(self, placements: Sequence[ModelPlacement]) -> None:
        """Converge to ``placements`` (the desired state's list; empty stops every placed model). Fetching and
        starting happen on each model's own thread; stopping a removed or changed one waits for its worker to exit
        (a few seconds at most)."""
        wanted: dict[str, ModelPlacement] = {}
        for p in placements:
            wanted[p.model] = p  # one placement per model name; the last one wins
        changed = False
        retired: list[PlacedModel] = []
        with self._lock:
            if self._stopped:
                return
            for name in list(self._models):
                current = self._models[name]
                if name not in wanted or wanted[name].model_dump(mode="json") != current.placement.model_dump(mode="json"):
                    log.info("stopping placed model %s %s (%s)", name, current.placement.version,
                             "removed" if name not in wanted else "placement changed")
                    retired.append(self._models.pop(name))
                    changed = True
        for old in retired:  # outside the lock: a supervisor reporting its status calls hosted(), which takes it
            old.stop()
        with self._lock:
            if self._stopped:
                return
            for name, p in wanted.items():
                if name not in self._models:
                    pm = PlacedModel(p, self.root / _safe(name), self._updater, on_change=self._on_change, emit=self._emit)
                    self._models[name] = pm
                    pm.start()
                    changed = True
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write(self.root / PLACEMENTS_FILE, json.dumps([p.model_dump(mode="json") for p in wanted.values()]).encode())
            except OSError as exc:
                log.warning("cannot record the placements: %s", exc)
        for d in self.root.iterdir() if self.root.is_dir() else ():
            if d.is_dir() and d.name not in {_safe(n) for n in wanted}:
                _remove_tree(d)  # a removed placement's bundle is dead weight
        if changed:
            self._on_change()

    def restore(self) -> None:
        """Start the placements recorded by the last ``apply`` (agent start, before any desired state arrives)."""
        data = _read_json(self.root / PLACEMENTS_FILE)
        if not isinstance(data, list) or not data:
            return
        try:
            placements = [ModelPlacement.model_validate(p) for p in data]
        except ValueError as exc:
            log.warning("ignoring unreadable %s: %s", self.root / PLACEMENTS_FILE, exc)
            return
        self.apply(placements)

    def hosted(self) -> list[HostedModel]:
        with self._lock:
            models = list(self._models.values())
        return [m.hosted() for m in models]

    def get(self, name: str) -> PlacedModel | None:
        with self._lock:
            return self._models.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def predict(self, name: str, inputs: np.ndarray | Mapping[str, Any], *, json_values: bool = False) -> dict[str, Any]:
        """Run placed model ``name``; returns ``{"model", "version", "outputs": {name: ndarray}, "latency_ms"}``.

        ``json_values``: the inputs are JSON values (lists) the worker converts with the model's input specs.
        Raises UnknownPlacementError (404), PlacementError (503 not serving, 507 over its memory limit, 500 runtime
        fault) or :class:`~edgewise.agent.runtime.InputError` for the caller's input."""
        from .runtime import InputError

        pm = self.get(name)
        if pm is None:
            hosted = ", ".join(self.names()) or "none"
            raise UnknownPlacementError(f"no placed model named {name!r} on this device (placed: {hosted})")
        if isinstance(inputs, np.ndarray):
            inputs = {"__single__": inputs}
        t0 = time.perf_counter_ns()
        answer = pm.request({"op": "predict", "json": json_values, "inputs": {k: _pack_value(v) for k, v in inputs.items()}})
        if not answer.get("ok"):
            kind, error = answer.get("kind"), str(answer.get("error"))
            if kind == "input":
                raise InputError(error)
            if kind == "memory":
                pm.reason = f"last request exceeded the memory limit: {error}"
                raise PlacementError(error, status=507)
            raise PlacementError(error, status=500)
        outputs = {k: _unpack_value(v) for k, v in (answer.get("outputs") or {}).items()}
        return {"model": pm.placement.model, "version": pm.placement.version, "outputs": outputs,
                "latency_ms": round((time.perf_counter_ns() - t0) / 1e6, 4)}

    def worker_info(self, name: str) -> dict[str, Any]:
        """The worker's own view: pid, ONNX Runtime thread settings, OS threads, address-space limit."""
        pm = self.get(name)
        if pm is None:
            raise UnknownPlacementError(f"no placed model named {name!r}")
        return pm.request({"op": "info"})

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            models = list(self._models.values())
            self._models.clear()
        for m in models:
            m.stop()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _remove_tree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


# -- the worker process -----------------------------------------------------------------------------


def _vm_size_bytes() -> int:
    """The process's address-space size (Linux /proc); 0 where it cannot be read (then no limit is set)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "bad_alloc" in str(exc) or "Failed to allocate" in str(exc)


def _worker_main(argv: list[str] | None = None) -> int:
    """The worker: verify the bundle, limit itself, load the model, then answer requests until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m edgewise.agent.hosting", description="edgewise placed-model worker (started by the agent)")
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--trust", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", required=True)
    args = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the frame stream
    fd_in = sys.stdin.fileno()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the agent's terminal: the agent stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    def reply(obj: Mapping[str, Any]) -> None:
        _write_frame(out, obj)

    try:
        import resource

        import onnxruntime as ort

        from ..bundle import BundleError, verify_bundle
        from ..security import TrustedKeys
        from .api import json_to_array
        from .runtime import InferenceError, InputError, LoadedModel, ModelLoadError
    except Exception as exc:
        reply({"ok": False, "error": f"the worker cannot import its runtime: {type(exc).__name__}: {exc}"})
        return 2
    what = f"{args.model} {args.version}"
    try:
        vb = verify_bundle(args.bundle, TrustedKeys.from_paths([args.trust]))
    except (BundleError, OSError, ValueError) as exc:
        reply({"ok": False, "error": f"verification failed: {exc}"})
        return 3
    if (vb.manifest.name, vb.manifest.version) != (args.model, args.version):
        reply({"ok": False, "error": f"the stored bundle holds {vb.manifest.name} {vb.manifest.version}, not {what}"})
        return 3
    footprint = model_footprint_mb(vb.manifest.model_dump(mode="json"), args.bundle.stat().st_size)
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = 8 * 2**20 if stack in (resource.RLIM_INFINITY, -1) or stack <= 0 else stack
    baseline = _vm_size_bytes()
    limit = int(baseline + (footprint + args.memory_mb) * 2**20 + args.threads * stack)
    try:
        if not baseline:
            raise OSError("the process's address-space size is unknown (no /proc)")
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError) as exc:
        log.warning("cannot set RLIMIT_AS: %s; the model runs without a memory limit", exc)
        limit = 0
    limit_text = f"{args.memory_mb} MB (+{footprint:.1f} MB model footprint over the worker's {baseline / 2**20:.0f} MB baseline)"
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = False  # allocations are exact and freed: over the limit fails here, not in a later grow
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        tuned = vb.manifest.runtime
        if tuned is not None:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, tuned.graph_optimization_level)
        session = ort.InferenceSession(vb.read_model(), so, providers=["CPUExecutionProvider"])
        model = LoadedModel(session, vb.manifest, sha256=vb.sha256, key_id=vb.key_id)
        model.smoke_test()
    except BaseException as exc:  # MemoryError included
        if _is_memory_error(exc) or _is_memory_error(exc.__cause__ or exc):
            reply({"ok": False, "kind": "memory", "error": f"{what} exceeds its memory limit of {limit_text} while loading: {exc}"})
        else:
            reply({"ok": False, "error": f"{what} does not load: {exc}"})
        return 4
    del vb
    opts = session.get_session_options()
    reply({"ok": True, "pid": os.getpid(), "model": model.name, "version": model.version, "intra_op_threads": opts.intra_op_num_threads,
           "inter_op_threads": opts.inter_op_num_threads, "limit_mb": round(limit / 2**20, 1) if limit else None,
           "baseline_mb": round(baseline / 2**20, 1), "footprint_mb": round(footprint, 2), "inputs": list(model.input_names)})
    while True:
        try:
            msg = _read_frame(fd_in)
        except EOFError:
            return 0
        op = msg.get("op")
        try:
            if op == "info":
                reply({"ok": True, "pid": os.getpid(), "intra_op_threads": opts.intra_op_num_threads,
                       "inter_op_threads": opts.inter_op_num_threads, "os_threads": len(os.listdir("/proc/self/task")),
                       "limit_mb": round(limit / 2**20, 1) if limit else None, "rss_mb": _rss_mb(os.getpid())})
                continue
            if op != "predict":
                reply({"ok": False, "kind": "input", "error": f"unknown op {op!r}"})
                continue
            raw = msg.get("inputs") or {}
            if "__single__" in raw:
                feed: Any = _unpack_value(raw["__single__"])
            elif msg.get("json"):
                feed = {k: json_to_array(k, v, model.inputs.get(k)) for k, v in raw.items()}
            else:
                feed = {k: _unpack_value(v) for k, v in raw.items()}
            outputs = model.predict(feed)
            reply({"ok": True, "outputs": {k: _pack_value(v) for k, v in outputs.items()}})
        except InputError as exc:
            reply({"ok": False, "kind": "input", "error": str(exc)})
        except (InferenceError, MemoryError, ModelLoadError) as exc:
            kind = "memory" if _is_memory_error(exc) else "inference"
            text = f"{what} exceeded its memory limit of {limit_text}: {exc}" if kind == "memory" else str(exc)
            reply({"ok": False, "kind": kind, "error": text})
        except Exception as exc:
            reply({"ok": False, "kind": "inference", "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    sys.exit(_worker_main())
