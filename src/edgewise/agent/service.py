"""The agent: the parts wired together and kept running.

Threads (all daemons, all stopped by ``stop()``):

- **link supervisor** (``Link``): the MQTT session, reconnecting with backoff;
- **reconcile**: converges the running model to the latest desired state;
- **telemetry**: every ``telemetry_interval_s`` calls ``telemetry_tick()``, which puts a
  Telemetry sample (``bandwidth_mode = "full"``), a Summary (``"summary"``) or nothing
  (``"alerts-only"``) into the outbox;
- **flusher**: while connected, drains the outbox in ``Batch`` messages and
  acknowledges records only after the broker's PUBACK;
- **api**: the local HTTP server (one more daemon thread per connection).

The live model is one attribute, ``_model``. Swapping it is a single reference
assignment, so a request that already picked up the old model finishes on it;
the old session is freed when its last request returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..protocol import DesiredState, DeviceState, Event, HardwareInfo, Summary, Telemetry, UpdateResult, encode, topics
from . import sdnotify
from .api import LocalApi
from .config import AgentConfig
from .crash import CrashWatch
from ..fsutil import atomic_write
from .drift import DriftWatch
from .hosting import Hosting
from .adapt import Adapter, AdaptResult, AdaptWindow
from .monitor import Monitor
from .privacy import TelemetryPrivatizer
from .observers import PredictionObserver
from .outbox import Outbox, drain_once
from .runtime import LoadedModel
from .shadow import Shadow
from .slots import Slots
from .updater import HttpFetcher, Updater

log = logging.getLogger("edgewise.agent")

BATCH_RECORDS = 2000  # per drain round; split into Batch messages of <= 1 MiB msgpack
PUBLISH_TIMEOUT_S = 10.0
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
BAD_MESSAGE_EVENT_EVERY_S = 1.0  # a flood of garbage must not flood the outbox with events
QUIET_SEVERITIES = ("debug", "info")  # events alerts-only mode does not send (update results always go)


def class_output(out: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The classifier's per-class output in a prediction: the first 2-D float output whose name
    contains "prob" or "score" (case-insensitive), else the first 2-D float output, else None."""
    fallback = None
    for name, arr in out.items():
        if getattr(arr, "ndim", 0) == 2 and arr.dtype.kind == "f" and arr.shape[1] > 0:
            low = name.lower()
            if "prob" in low or "score" in low:
                return arr
            if fallback is None:
                fallback = arr
    return fallback


class AgentError(RuntimeError):
    """The agent cannot start or do what was asked; the message says why and what to do."""


class NoModelError(RuntimeError):
    """A prediction was asked for before any model was installed."""


class Agent:
    """One device's agent. ``start()`` brings it up, ``stop()`` takes it down; ``predict`` works in between.

    ``install(bundle)`` also works before ``start()`` (seeding a device offline).
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_state_dir(self.state_dir)
        try:
            if not config.trust_path.is_file():  # a single key file is fine too
                config.trust_path.mkdir(parents=True, exist_ok=True)
            self.keystore, slot_sealer, row_sealer, self._outbox_key_moved = _open_at_rest(config)
            self.outbox = Outbox(self.state_dir / "outbox.db", max_bytes=config.outbox_max_bytes, sealer=row_sealer)
            self.slots = Slots(self.state_dir / "slots", sealer=slot_sealer)
            # Sample capture (agent.capture; None when the config leaves it off). The drift detector calls
            # ``self.capture.mark_drift()`` when it fires; the desired state's ``capture`` can switch it off per group.
            self.capture = _open_capture(self, config) if config.capture else None
        except BaseException:
            _unlock(self._lock_fd)
            raise
        self.monitor = Monitor()
        self.monitor.status = self._metrics_status
        # Telemetry privacy (issue 8 FL2, agent.privacy): histograms privatized before they enter the outbox, as the
        # desired state's ``privacy`` says (kept in STATE/privacy.json across restarts, with the day's ε spent).
        self.privacy = TelemetryPrivatizer(self.state_dir)
        self.bandwidth_mode: str = config.bandwidth_mode
        self._summarize = config.bandwidth_mode == "summary"
        self._model: LoadedModel | None = None
        # Watchers of every served prediction (drift, sample capture): ``observe(model, feed, outputs)`` with the
        # feed exactly as ONNX Runtime got it; see ``agent.observers.PredictionObserver``.
        self.observers: list[PredictionObserver] = []
        if self.capture is not None:
            self.observers.append(self.capture)
        # Drift detection (agent.drift): follows the live model, active when its bundle has reference statistics.
        self.drift = DriftWatch(on_change=self._on_drift, **_drift_settings(config))
        if config.drift:
            self.observers.append(self.drift)
        # Label-free adaptation (agent.adapt): a window of recent inputs, and the adapter that turns it into a
        # sealed, device-local delta on the signed base model (``adapt()``, ``request_adaptation()``).
        self.adapter = Adapter(self.state_dir / "adapt", self.keystore, config.device_id, STORAGE_KEY, threads=config.threads,
                               settings=_adapt_settings(config))
        self.adapt_on_drift = config.adapt_on_drift
        self.adapt_window = AdaptWindow(self.adapter.settings.window)
        if self.adapter.settings.window:
            self.observers.append(self.adapt_window)
        self._adapt_thread: threading.Thread | None = None
        self._last_auto_adapt = float("-inf")
        fetcher = HttpFetcher(config.server_url, timeout=config.download_timeout_s, token_file=config.device_token_path)
        # Peer distribution (agent.peers, issue 9): bundles from peers first, the control plane last; trust unchanged.
        self.peers: Any = None
        if config.peer_fetch or config.peer_port is not None:
            from .peers import Peers

            self.peers = Peers.for_agent(config, self.slots, lambda: self.updater.trusted(), fetcher)
        self.updater = Updater(
            self.slots,
            config.trust_path,
            downloads=self.state_dir / "downloads",
            activate=self._activate,
            current=lambda: self._model,
            fetcher=self.peers.fetcher if self.peers is not None else fetcher,
            threads=config.threads,
            trial_starts=config.trial_starts,
            disk_margin=config.disk_margin_bytes,
            tuf=_tuf_client(config, fetcher),
            require_tuf=config.update_trust == "tuf",
        )
        # Shadow mode (agent.shadow): a candidate from DesiredState.shadow answers sampled live inputs beside the
        # committed model, on its own thread; never served. Idle (no thread) until a candidate is named.
        self.shadow = Shadow(self.updater, self.state_dir / "shadow", emit=self._emit_event)
        self.crashes = CrashWatch(self.state_dir)  # agent.crash: evidence a crashed run leaves for the next start
        # Placed models (agent.hosting): each in its own worker process with its own threads and memory limit,
        # converged from DesiredState.placements; reported in DeviceState.hosted.
        self.hosting = Hosting(self.state_dir / "placed", self.updater, on_change=self._publish_state, emit=self._emit_event)
        self._link: Any = None
        self._api: LocalApi | None = None
        self._stop = threading.Event()
        self._flush_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._desired_cv = threading.Condition()
        self._desired: DesiredState | None = None
        self._converged_generation: int | None = None
        self._failed_generation: int | None = self._load_failed_generation()
        self._retrying_generation: int | None = None
        self._last_update: UpdateResult | None = None
        self._updating = False
        self._last_bad_event = 0.0
        self._hardware: HardwareInfo | None = None
        self._started = False
        self._stopped = False
        if self._outbox_key_moved is not None:  # the storage key changed: rows sealed before cannot be read
            self._emit_event(
                "outbox_key_replaced", f"the outbox key no longer unwraps with the storage key (was the key replaced?); moved it to "
                f"{self._outbox_key_moved.name}; records sealed with it are dropped", severity="critical",
            )
        if self.outbox.recovered_from is not None:  # a corrupt outbox was moved aside: say so, loudly
            self._emit_event(
                "outbox_recovered", f"the outbox was corrupt and was moved aside to {self.outbox.recovered_from.name}; "
                "records it held were not sent", severity="critical", detail={"moved_to": str(self.outbox.recovered_from)},
            )

    # -- properties -----------------------------------------------------------------------------

    @property
    def current_model(self) -> LoadedModel | None:
        """The model serving right now (None before the first install)."""
        return self._model

    @property
    def model_name(self) -> str | None:
        m = self._model
        return m.name if m is not None else None

    @property
    def model_version(self) -> str | None:
        m = self._model
        return m.version if m is not None else None

    @property
    def api_port(self) -> int | None:
        """The local API's bound port (also in ``state_dir/api.port``), None before ``start()``."""
        return self._api.port if self._api is not None else None

    @property
    def connected(self) -> bool:
        return bool(self._link is not None and self._link.connected)

    @property
    def link(self) -> Any:
        """The MQTT :class:`~edgewise.agent.link.Link`, or None when the agent runs without a broker."""
        return self._link

    # -- predictions (the hot path) -------------------------------------------------------------

    def predict(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the live model; see :meth:`LoadedModel.predict` for what it accepts and raises."""
        model = self._model
        if model is None:
            self.monitor.count_error()
            raise NoModelError("no model installed yet; wait for the desired state or install a bundle")
        return self.predict_on(model, inputs)

    def predict_on(self, model: LoadedModel, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Like :meth:`predict` on a model the caller already picked (the HTTP API reports which one served)."""
        t0 = time.perf_counter_ns()
        try:
            out, feed = model.run(inputs)
        except Exception:
            self.monitor.count_error()
            raise
        took = time.perf_counter_ns() - t0
        self.monitor.record(took)
        if self.shadow.active:  # shadow mode: a bounded, non-blocking hand-off to the candidate's thread
            self.shadow.offer(model, inputs, out, took)
        if self._summarize:
            self._observe(out)
        for observer in self.observers:
            try:
                observer.observe(model, feed, out)
            except Exception:  # watching the data must never fail a prediction
                log.debug("prediction observer %r failed", observer, exc_info=True)
        return out

    def _observe(self, out: Mapping[str, np.ndarray]) -> None:
        """Summary mode: count the top-1 class and confidence of each row of the classifier output."""
        try:
            scores = class_output(out)
            if scores is not None:
                self.monitor.record_predictions(scores.argmax(axis=1), scores.max(axis=1))
        except Exception:  # statistics must never fail a prediction
            log.debug("cannot read the class output of a prediction", exc_info=True)

    def _activate(self, model: LoadedModel) -> None:
        model.repair_sink = self.monitor.count_repairs  # input repairs made by its preprocessing reach telemetry
        self._model = model  # one reference rebind: requests in flight keep the old one
        if self._started and not self._stopped:
            self._mark_running(model)

    def _mark_running(self, model: LoadedModel | None) -> None:
        """Crash evidence: which model this run serves, and whether it is still on trial (see agent.crash)."""
        self.crashes.running(model.name if model else None, model.version if model else None,
                             "trial" if self.slots.trial() is not None else "serving")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the committed model, open the local API, connect (in the background) and start reporting."""
        if self._started:
            return
        if self._stopped:
            raise AgentError("this agent was stopped; create a new Agent to start again")
        self._started = True
        cfg = self.config
        self._check_own_code()  # first: nothing below runs on code that is not the signed release
        # Crash accounting: read how the previous run ended (before the trial record changes), then mark this one.
        crashed = self.crashes.previous_run(self.slots.trial())
        loading = self.slots.trial() or self.slots.record()
        self.crashes.running(loading.model if loading else None, loading.version if loading else None, "load")
        if self._model is None:
            model, problem = self.updater.load_committed()
            if model is not None:
                self._activate(self._restore_adaptation(model))
            if problem:
                self._emit_event("slot_fallback" if model else "load_failed", problem, severity="error")
            if self.updater.startup_result is not None:  # a trial committed or rolled back on this start
                res = self.updater.startup_result
                self._record_update(res, source="trial")
                if res.result == "rolled_back" and res.generation is not None:
                    # A model that crashed the agent on trial would crash it again: do not retry this
                    # generation; the control plane must issue a new one (a fix, or an explicit retry).
                    self._set_failed_generation(res.generation)
        self._mark_running(self._model)
        for report in crashed:  # model.crash / agent.crash / agent.unclean_exit: the control plane counts them
            (log.error if report.severity == "error" else log.warning)("%s", report.message)
            self._emit_event(report.kind, report.message, severity=report.severity, detail=report.detail)
        if len(self.updater.trusted()) == 0:
            log.warning("no trusted keys in %s: every bundle will be refused; copy the fleet's signing .pub there", cfg.trust_path)
        try:
            self._api = LocalApi(self, cfg.api_host, cfg.api_port)
        except OSError as exc:
            self.stop()
            raise AgentError(f"cannot open the local API on {cfg.api_host}:{cfg.api_port}: {exc.strerror or exc}; pass another --api-port (0 picks a free one)") from None
        self._api.start()
        if self.peers is not None:
            self.peers.start()  # serve verified bundles to peers (peer_port), find them by mDNS (peer_mdns)
        atomic_write(self.state_dir / "api.port", f"{self._api.port}\n".encode())
        log.info("%s serving %s on %s", self.device_id, self._describe_model(), self._api.url)
        self._emit_event("start", f"agent {__version__} started with {self._describe_model()}", detail={"api_port": self._api.port})
        self._spawn("telemetry", self._telemetry_loop)
        self.hosting.restore()  # the placed models of the last desired state, also offline
        addr = cfg.broker_address()
        if addr is not None:
            from .enroll import LinkSecurityError, link_security
            from .link import Link  # lazy: a device without a broker never loads paho

            host, port, tls = addr
            try:
                tls_files, credentials = link_security(cfg)
            except LinkSecurityError as exc:
                self.stop()
                raise AgentError(str(exc)) from None
            self._link = Link(
                self.device_id, host, port, tls=tls, tls_files=tls_files, credentials=credentials,
                protocol={"5": 5, "3.1.1": 4}.get(cfg.mqtt_protocol),
                on_desired=self._on_desired, on_bad_message=self._on_bad_message, on_command=self._on_command,
                state=self.device_state, on_connect=self._flush_wake.set,
                backoff_base=cfg.reconnect_base_s, backoff_cap=cfg.reconnect_cap_s,
            )
            self._spawn("flusher", self._flush_loop)
            self._spawn("reconcile", self._reconcile_loop)
            self._link.start()
        self._notify_systemd_ready()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, stop every thread, close the API and the outbox. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._flush_wake.set()
        self.shadow.stop(timeout)
        self.hosting.stop()
        sdnotify.notify("STOPPING=1")
        with self._desired_cv:
            self._desired_cv.notify_all()
        if self._link is not None:
            self._link.stop(offline_state=self.device_state(status="offline"), timeout=timeout)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._api is not None:
            self._api.stop()
            (self.state_dir / "api.port").unlink(missing_ok=True)
        if self.peers is not None:
            self.peers.stop()
        if self._started:
            self.crashes.clean_exit()  # stopped on purpose: the next start reports no crash
        self.outbox.close()
        if self.capture is not None and hasattr(self.capture.sink, "close"):
            self.capture.sink.close()  # the local sample store
        _unlock(self._lock_fd)
        self._lock_fd = None
        log.info("%s stopped", self.device_id)

    close = stop

    def __enter__(self) -> "Agent":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=self._guard(name, target), name=f"edgewise-{name}-{self.device_id}", daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, name: str, target: Any) -> Any:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    target()
                    return
                except Exception:
                    log.exception("%s thread failed; restarting it in 1s", name)
                    self._stop.wait(1.0)

        return run

    # -- own code: integrity, self-update, systemd (see selfupdate.py, integrity.py, launcher.py) --

    restart_requested = False  # set when a new agent release is installed: run_agent exits 75 for the launcher

    def _check_own_code(self) -> None:
        """Refuse to run modified agent code: a critical ``integrity`` alert goes into the outbox (sent by
        whichever env runs next, sharing this outbox), then :class:`IntegrityError` (exit 3: the launcher falls back)."""
        from ..security import TrustedKeys
        from .integrity import IntegrityError, check_running

        try:
            report = check_running(TrustedKeys.from_paths([self.config.trust_path]), self.config.integrity_check)
        except IntegrityError as exc:
            log.critical("%s", exc)
            self._emit_event("integrity", str(exc), severity="critical", detail={"problems": exc.problems[:50], "agent_version": __version__})
            self.stop()
            raise
        if report is None:
            log.info("agent code integrity not checked (integrity_check=%s; not running from a signed release env)", self.config.integrity_check)
        else:
            log.info("agent code integrity: %d files match signed release %s (key %s)", report.files, report.version, report.key_id)
        releases = self._releases()
        if releases is not None:  # what the launcher decided while we were not running (rollbacks, fall backs)
            for ev in releases.take_unreported():
                bad = ev.get("event") in ("rolled_back", "fell_back")
                self._emit_event(
                    "agent_release", f"agent release {ev.get('version')} {ev.get('event')}" + (f": {ev.get('reason')}" if ev.get("reason") else ""),
                    severity=("critical" if "integrity" in str(ev.get("reason", "")) else "error") if bad else "info", detail=ev,
                )

    def _releases(self) -> Any:
        """The launcher's release store when a launcher supervises this agent (``$EDGEWISE_LAUNCHER``), else None."""
        root = os.environ.get("EDGEWISE_LAUNCHER")
        if not root:
            return None
        from .selfupdate import AgentReleases

        return AgentReleases(root)

    def _notify_systemd_ready(self) -> None:
        """READY=1 once started (the launcher's trial health signal), then WATCHDOG=1 at half the watchdog period."""
        sdnotify.notify(f"READY=1\nSTATUS=agent {__version__} serving {self._describe_model()}")
        interval = sdnotify.watchdog_interval()
        if interval:
            def ping() -> None:
                while True:
                    sdnotify.notify("WATCHDOG=1")
                    if self._stop.wait(interval):
                        return

            self._spawn("watchdog", ping)

    def install_agent_release(self, path: Path | str) -> str:
        """Install a signed agent release beside the running one and ask the launcher to start it (exit 75).

        Raises :class:`~edgewise.bundle.release.ReleaseError` / :class:`~edgewise.agent.selfupdate.SelfUpdateError`
        with nothing changed when it is refused; returns the installed version.
        """
        releases = self._releases()
        if releases is None:
            raise AgentError("this agent runs without its launcher (edgewise-agent-launcher), which must start a new release; nothing installed")
        from ..security import TrustedKeys

        release = releases.install(path, TrustedKeys.from_paths([self.config.trust_path]), running_version=__version__)
        self._emit_event("agent_release", f"agent release {release.version} installed; restarting into it", detail={"version": release.version, "sha256": release.sha256})
        self.restart_requested = True
        self._stop.set()  # run_agent notices, stops cleanly and exits 75
        return release.version

    def _reconcile_agent(self, desired: DesiredState) -> bool:
        """Desired-state hook: fetch, verify and install the agent release it names; True when installed.

        Only under the launcher (it starts the new env and rolls it back if unhealthy). A refused release
        is reported once per version and not fetched again (selfupdate remembers rolled-back versions).
        TUF (``updater.require_tuf``, the default): the signed target ``ref.target`` must exist with
        ``custom.kind == "agent-release"`` and ``custom.version == ref.version``, and the download must have
        the target's signed length and sha256 (never the desired state's); then the release signature and
        version rules (``install_agent_release``). Without a TUF root nothing is installed.
        """
        ref = desired.agent
        assert ref is not None
        refused: set[str] = self.__dict__.setdefault("_agent_refused", set())  # versions already reported as refused
        if ref.version == __version__ or self._releases() is None or ref.version in refused:
            return False
        st = self._releases().state()
        if ref.version in (st.current, st.trial.version if st.trial else None) or ref.version in st.failed:
            return False
        dest = self.state_dir / "downloads" / f"agent-{ref.version}.ewr"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.updater.require_tuf:
                self._fetch_agent_release_through_tuf(ref, dest)
            else:
                self.updater.fetcher.fetch(ref.artifact, dest)
            self.install_agent_release(dest)
            return True
        except Exception as exc:  # refused or not fetched: keep running this agent, say why once
            refused.add(ref.version)
            self._emit_event("agent_release", f"agent release {ref.version} not installed: {exc}", severity="error",
                             detail={"version": ref.version, "generation": desired.generation})
            return False
        finally:
            dest.unlink(missing_ok=True)

    def _fetch_agent_release_through_tuf(self, ref: Any, dest: Path) -> None:
        """Download the agent release ``ref`` only as the signed TUF target it names; raise TufUpdateError/FetchError.

        Length and sha256 come from the signed target info; the URL from the desired state (a mirror
        or peer may serve it) or else the control plane's TUF target URL."""
        from ..protocol import ArtifactRef
        from .updater import FetchError, TufUpdateError

        tuf = self.updater.tuf
        try:
            if tuf is None:
                raise TufUpdateError(
                    "no-root", f"this device has no trusted TUF root ({self.updater.trust_dir / 'root.json'}), so it installs no update; "
                    "install the control plane's root.json there (edgewise agent --tuf-root FILE) or, for setups without TUF, "
                    'set update_trust = "signature-only"', retryable=False,
                )
            if not ref.target:
                raise TufUpdateError("no-target", "the desired state names no TUF target for the agent release (a control plane "
                                     'older than TUF?); upgrade the control plane, or set update_trust = "signature-only"', retryable=False)
            info = tuf.target_info(ref.target)
            custom = info.custom or {}
            if custom.get("kind") != "agent-release" or custom.get("version") != ref.version:
                raise TufUpdateError(
                    "target-mismatch", f"signed TUF target {ref.target} is {custom.get('kind') or 'not an agent release'} "
                    f"{custom.get('version')}, the desired state asks for agent release {ref.version}; refusing", retryable=False,
                )
            url = ref.artifact.url if ref.artifact is not None else tuf.target_url(info)
            signed = ArtifactRef(url=url, sha256=info.hashes["sha256"], size=info.length)
            try:
                self.updater.fetcher.fetch(signed, dest)
            except FetchError as exc:
                raise TufUpdateError("target-mismatch", f"download of TUF target {ref.target} failed: {exc}") from None
            from .tuf_client import verify_target_file

            verify_target_file(info, dest)
        except TufUpdateError as exc:
            raise AgentError(f"TUF refused the agent release ({exc.kind}): {exc}") from None

    # -- installing -----------------------------------------------------------------------------

    def install(self, bundle_path: Path | str, *, rollback: bool = False) -> UpdateResult:
        """Install a local bundle through the same verify/stage/trial/commit path as an update.

        A version below the highest ever committed is refused unless ``rollback`` is true.
        """
        result = self.updater.install(bundle_path, rollback=rollback)
        self._record_update(result, source="local", path=str(bundle_path))
        return result

    # -- label-free adaptation (agent.adapt, docs/data-adaptation.md) ----------------------------

    def adapt(self, *, method: str | None = None, trigger: str = "command", adaptation: Any = None) -> AdaptResult:
        """Adapt the live model to the window of recent inputs (AdaBN with BatchNorm, else CORAL), try it on the
        golden inputs, then commit it as a sealed device-local delta and serve it, or keep the running model.
        Reports an ``adaptation`` event either way; ``adaptation`` (an ``edgewise.data.adapt.Adaptation``) skips computing one."""
        from .adapt import adapt_agent

        return adapt_agent(self, method=method or self.adapter.settings.method, trigger=trigger, adaptation=adaptation)

    def request_adaptation(self, trigger: str = "drift") -> bool:
        """``adapt()`` in a background thread (the drift detector calls this from the prediction path); False when one
        is running or the last requested one is younger than ``adapter.settings.drift_cooldown_s``."""
        now = time.monotonic()
        running = self._adapt_thread is not None and self._adapt_thread.is_alive()
        if running or now - self._last_auto_adapt < self.adapter.settings.drift_cooldown_s:
            return False
        self._last_auto_adapt = now
        self._adapt_thread = threading.Thread(target=lambda: self.adapt(trigger=trigger), name=f"edgewise-adapt-{self.device_id}", daemon=True)
        self._adapt_thread.start()
        return True

    def _restore_adaptation(self, model: LoadedModel) -> LoadedModel:
        from .adapt import restore_agent

        return restore_agent(self, model)

    def _record_update(self, result: UpdateResult, *, event: bool = True, **detail: Any) -> None:
        """Count and log an update result, report it in the state right away, then as an event."""
        self.monitor.count_update(result.result)
        self._last_update = result
        self._publish_state()  # first: the retained state is what the control plane acts on
        if not event:
            return
        ok = result.result == "ok"
        what = f"{result.model} {result.version}" if result.model else "bundle"
        message = f"now running {what}" if ok else f"update to {what} {result.result}: {result.reason}"
        if ok and result.reason:
            message += f" ({result.reason})"
        (log.info if ok else log.error)("%s", message)
        self._emit_event("update", message, severity="info" if ok else "error", detail={**result.model_dump(mode="json"), **detail})

    # -- state and events -----------------------------------------------------------------------

    def _describe_model(self) -> str:
        m = self._model
        return f"{m.name} {m.version}" if m is not None else "no model"

    def device_state(self, status: str | None = None) -> DeviceState:
        """The actual state this device reports (retained on its state topic)."""
        m = self._model
        if status is None:
            status = "updating" if self._updating else ("online" if m is not None else "degraded")
        return DeviceState(
            device_id=self.device_id,
            status=status,  # type: ignore[arg-type]
            model=m.name if m else None,
            version=m.version if m else None,
            generation=self._converged_generation,
            last_update=self._last_update,
            agent_version=__version__,
            hardware=self._hardware_info(),
            hosted=self.hosting.hosted(),
            tags=list(self.config.tags),
            api_url=f"http://{self.config.api_host}:{self._api.port}" if self._api is not None else None,
            peer_url=self.peers.peer_url if self.peers is not None else None,
            holds=self.peers.holds()[:64] if self.peers is not None else [],
            ts=time.time(),
        )

    def _hardware_info(self) -> HardwareInfo:
        if self._hardware is None:  # capabilities are read once at start (issue 7: agent/capabilities.py)
            from .capabilities import detect_for

            self._hardware = detect_for(self.config)
        return self._hardware

    def _publish_state(self) -> bool:
        link = self._link
        if link is None or not link.connected:
            return False  # the next connect publishes the state anyway
        state = self.device_state()
        payload = encode(state)
        ok = link.publish(topics.state(self.device_id), payload, retain=True, timeout=PUBLISH_TIMEOUT_S)
        if ok:
            self.monitor.count_bytes(self.bandwidth_mode, len(payload))
        log.debug("state %s (generation %s) %s", state.status, state.generation, "published" if ok else "NOT acknowledged")
        return ok

    def _emit(self, record: Telemetry | Summary | Event) -> int | None:
        try:
            seq = self.outbox.enqueue(record)
        except Exception as exc:  # a full disk must not stop predictions
            log.error("cannot store a %s record in the outbox: %s", record.type, exc)
            return None
        self._flush_wake.set()
        return seq

    def raise_alert(self, name: str, message: str, *, severity: str = "warning", detail: dict[str, Any] | None = None) -> int | None:
        """Raise an alert from the device (an application's own check: a sensor out of range, a full disk): an Event of
        kind ``alert.<name>`` through the outbox at alert priority; the control plane opens one alert per name and
        device, notifies its webhooks, and resolves it when the device sends the same name with severity ``info``."""
        if severity not in ("info", "warning", "error", "critical"):
            raise ValueError(f"severity must be info (clears the alert), warning, error or critical, got {severity!r}")
        return self._emit_event(f"alert.{name}", message, severity=severity, detail=detail)

    def _emit_event(self, kind: str, message: str, *, severity: str = "info", detail: dict[str, Any] | None = None) -> int | None:
        if self.bandwidth_mode == "alerts-only" and severity in QUIET_SEVERITIES and kind != "update" and not kind.startswith("alert."):
            return None  # alerts-only: warning+ and state changes (update results) only
        return self._emit(
            Event(
                device_id=self.device_id, seq=0, ts=time.time(), mono=time.monotonic(),
                kind=kind, severity=severity, message=message, detail=detail or {},  # type: ignore[arg-type]
            )
        )

    def telemetry_sample(self) -> Telemetry:
        """One Telemetry record from the monitor and the outbox (seq is assigned when it is enqueued)."""
        m = self._model
        dropped = self.outbox.dropped()
        return Telemetry(
            device_id=self.device_id, seq=0, ts=time.time(), mono=time.monotonic(),
            model=m.name if m else None, version=m.version if m else None,
            outbox_pending=self.outbox.pending(), dropped=sum(dropped.values()),
            **self.monitor.sample(),
        )

    def summary_sample(self) -> Summary:
        """One Summary record for the interval since the previous one (seq is assigned when it is enqueued)."""
        m = self._model
        return Summary(
            device_id=self.device_id, seq=0, ts=time.time(), mono=time.monotonic(),
            model=m.name if m else None, version=m.version if m else None,
            **self.monitor.summary_sample(),
        )

    def telemetry_tick(self) -> Telemetry | Summary | None:
        """What the telemetry thread does every interval, by bandwidth mode; returns the record stored (if any)."""
        if self.bandwidth_mode == "full":
            record: Telemetry | Summary = self.telemetry_sample()
        elif self.bandwidth_mode == "summary":
            record = self.summary_sample()
        else:
            return None  # alerts-only: no periodic telemetry
        drift = self.drift.take_interval()  # drift_score and sketch since the previous tick ({} without reference stats)
        if drift:
            record = record.model_copy(update=drift)
        shadow = self.shadow.take_interval()  # comparison counts since the previous tick (None: no candidate loaded)
        if shadow is not None:
            record = record.model_copy(update={"shadow": shadow})
        m = self._model  # FL2: class/confidence histograms privatized (or left out) before they are stored
        record = self.privacy.privatize(record, num_classes=len(m.manifest.labels or []) if m is not None else None)
        self._emit(record)
        return record

    def _on_command(self, command: Any) -> None:
        """A one-off command from the control plane (``cmd/{name}``): run it off the MQTT thread, answer with a
        ``command.result`` event. Known: ``adapt`` (args: method) and ``drift.reset`` (detectors start afresh)."""
        threading.Thread(target=self._run_command, args=(command,), name=f"edgewise-cmd-{command.name}", daemon=True).start()

    def _run_command(self, command: Any) -> None:
        from ..protocol.messages import COMMANDS

        detail: dict[str, Any] = {"id": command.id, "name": command.name}
        try:
            if command.expires_at is not None and time.time() > command.expires_at:
                detail.update(result="expired", reason=f"arrived after it expired at {command.expires_at:.0f}")
            elif command.name == "adapt":
                method = command.args.get("method")
                if method not in (None, "auto", "adabn", "coral"):
                    detail.update(result="refused", reason=f"adapt: method must be auto, adabn or coral, got {method!r}")
                else:
                    r = self.adapt(method=method, trigger="command")
                    detail.update(result=r.result, reason=r.reason, adaptation=r.to_json())
            elif command.name == "drift.reset":
                self.drift.reset()
                detail.update(result="ok", reason="drift detectors restarted on the live model's reference")
            elif command.name == "fl.train":  # a federated round's task (agent.fl): train the head, queue the signed delta
                from .fl import run_task

                detail.update(run_task(self, command.args))
            else:
                detail.update(result="refused", reason=f"unknown command {command.name!r}; this agent knows {', '.join(COMMANDS)}")
        except Exception as exc:  # a command must never take the agent down
            log.exception("command %s failed", command.name)
            detail.update(result="failed", reason=f"{type(exc).__name__}: {exc}")
        ok = detail["result"] == "ok"
        self._emit_event("command.result", f"command {command.name} ({command.id}): {detail['result']}: {detail.get('reason', '')}",
                         severity="info" if ok else "warning", detail=detail)

    def _on_drift(self, active: bool, detail: dict[str, Any]) -> None:
        """Drift started or ended on the live model (called on the prediction path, only on changes)."""
        what = f"{detail.get('model')} {detail.get('version')}"
        if active:
            fired = ", ".join(detail.get("fired", [])) or "detectors"
            message = f"data drift on {what}: {fired} over threshold (score {detail.get('score', 0):.2f})"
            if self.capture is not None:
                try:
                    self.capture.mark_drift()  # keep the drifted window for retraining
                except Exception:
                    log.debug("capture.mark_drift failed", exc_info=True)
            request = getattr(self, "request_adaptation", None) if self.adapt_on_drift else None
            if request is not None:  # label-free adaptation (agent.adapt): at most once per cooldown, in the background
                try:
                    request("drift")
                except Exception:
                    log.debug("request_adaptation failed", exc_info=True)
        else:
            message = f"data drift on {what} ended (score {detail.get('score', 0):.2f})"
        log.warning("%s", message) if active else log.info("%s", message)
        self._emit_event("drift", message, severity="warning" if active else "info", detail=detail)

    def health(self) -> dict[str, Any]:
        """What ``GET /v1/health`` returns."""
        m = self._model
        mon = self.monitor
        return {
            "status": self.device_state().status,
            "device_id": self.device_id,
            "model": m.name if m else None,
            "version": m.version if m else None,
            "connected": self.connected,
            "outbox_pending": self.outbox.pending(),
            "seq_issued": self.outbox.issued(),
            "inferences": mon.inferences,
            "errors": mon.errors,
            "bad_messages": mon.bad_messages,
            "publish_denied": self._link.publish_denied if self._link is not None else 0,
            "generation": self._converged_generation,
            "last_update": self._last_update.model_dump(mode="json") if self._last_update else None,
            "uptime_s": round(mon.uptime_s(), 3),
            "bandwidth_mode": self.bandwidth_mode,
            "bytes_sent": dict(mon.bytes_sent),
            "agent_version": __version__,
            "capture": self.capture.stats() if self.capture is not None else None,
            "privacy": self.privacy.status(),  # issue 8 FL2: telemetry privacy and today's ε
            "drift": {"score": self.drift.drift_score, "active": self.drift.active} if self.drift.observer is not None else None,
            "adaptation": self.adapter.describe(m, len(self.adapt_window)),
            "shadow": self.shadow.describe(),
            "peers": self.peers.describe() if self.peers is not None else None,
        }

    def _metrics_status(self) -> dict[str, Any]:
        m = self._model
        return {
            "model": m.name if m else None,
            "version": m.version if m else None,
            "connected": self.connected,
            "outbox_pending": self.outbox.pending(),
            "seq_issued": self.outbox.issued(),
            "outbox_dropped": self.outbox.dropped(),
            "shadow": self.shadow.metrics(),
        }

    # -- MQTT callbacks (paho's thread: quick, never raise) -------------------------------------

    def _on_desired(self, desired: DesiredState) -> None:
        with self._desired_cv:
            if self._converged_generation is not None and desired.generation < self._converged_generation:
                log.info("ignoring desired generation %d: already converged to %d", desired.generation, self._converged_generation)
                return
            pending = self._desired
            if pending is not None and desired.generation < pending.generation:
                return
            if self.capture is not None:
                self.capture.set_group_enabled(desired.capture)
            self.privacy.set(desired.privacy)  # issue 8 FL2: telemetry privacy for this device's group
            self.shadow.want(desired.shadow)  # quick: the shadow's own thread fetches, verifies and loads
            if self.peers is not None:
                self.peers.hint(desired.peers)  # where nearby devices hold the artifact (tried before the control plane)
            self._desired = desired
            self._desired_cv.notify_all()

    def _on_bad_message(self, topic: str, reason: str) -> None:
        self.monitor.count_bad_message()
        now = time.monotonic()
        if now - self._last_bad_event >= BAD_MESSAGE_EVENT_EVERY_S:
            self._last_bad_event = now
            self._emit_event(
                "bad_message", f"refused a message on {topic}: {reason}", severity="warning",
                detail={"topic": topic, "reason": reason, "total": self.monitor.bad_messages},
            )

    # -- refused generation (survives restarts) ----------------------------------------------------

    def _failed_path(self) -> Path:
        return Path(self.config.state_dir) / "failed_generation"

    def _load_failed_generation(self) -> int | None:
        try:
            return int(self._failed_path().read_text().strip())
        except (OSError, ValueError):
            return None

    def _set_failed_generation(self, gen: int | None) -> None:
        """Remember a refused desired generation across restarts, so a bad update is not retried in a loop."""
        if gen == self._failed_generation:
            return
        self._failed_generation = gen
        try:
            if gen is None:
                self._failed_path().unlink(missing_ok=True)
            else:
                atomic_write(self._failed_path(), f"{gen}\n".encode())
        except OSError as exc:
            log.warning("cannot record the refused generation: %s", exc)

    # -- threads --------------------------------------------------------------------------------

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            self.telemetry_tick()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._flush_wake.clear()
            sent = 0
            if self.connected:
                sent = self.flush_once()
            if sent == 0 or not self.connected:
                self._flush_wake.wait(self.config.flush_interval_s)

    def flush_once(self) -> int:
        """Send up to ``BATCH_RECORDS`` records in Batch messages (events first); return how many the broker acknowledged."""
        link = self._link
        if link is None or not link.connected:
            return 0
        mode = self.bandwidth_mode

        def publish(topic: str, payload: bytes) -> bool:
            ok = link.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
            if ok:
                self.monitor.count_bytes(mode, len(payload))
            return ok

        return drain_once(self.outbox, self.device_id, publish, max_records=BATCH_RECORDS)

    def _reconcile_loop(self) -> None:
        from .link import backoff  # this thread only runs with a broker, so paho is loaded already

        attempt = 0
        while not self._stop.is_set():
            with self._desired_cv:
                while self._desired is None and not self._stop.is_set():
                    self._desired_cv.wait(0.5)
                desired, self._desired = self._desired, None
            if desired is None or self._stop.is_set():
                return
            retry = self._reconcile(desired)
            if not retry:
                attempt = 0
                continue
            delay = backoff(attempt, base=RETRY_BASE_S, cap=RETRY_CAP_S)
            attempt += 1
            log.info("retrying generation %d in %.1fs", desired.generation, delay)
            with self._desired_cv:
                self._desired_cv.wait_for(lambda: self._desired is not None or self._stop.is_set(), timeout=delay)
                if self._desired is None:
                    self._desired = desired  # nothing newer arrived: try this one again

    def _reconcile(self, desired: DesiredState) -> bool:
        """Converge to ``desired``; True when it failed in a way a retry may fix."""
        gen = desired.generation
        if self._converged_generation is not None and gen < self._converged_generation:
            return False
        if desired.agent is not None and self._reconcile_agent(desired):
            return False  # a new agent release is installed: we are stopping to restart into it
        self.hosting.apply(desired.placements)  # returns at once: each placed model starts on its own thread
        m = self._model
        if desired.model is None and desired.version is None:
            self._converged_generation = gen  # nothing asked of the model: converged as we are
            self._publish_state()
            return False
        if m is not None and (m.name, m.version) == (desired.model, desired.version):
            self._converged_generation = gen
            self._set_failed_generation(None)
            self._publish_state()
            return False
        if gen == self._failed_generation:
            self._publish_state()  # already refused this generation; wait for a new one
            return False
        self._updating = True
        self._publish_state()
        try:
            result, retryable = self.updater.attempt(desired)
        finally:
            self._updating = False
        if result.result == "ok":
            self._converged_generation = gen
            self._set_failed_generation(None)
            self._retrying_generation = None
            self._record_update(result, source="desired")
        elif retryable:
            first = self._retrying_generation != gen  # one event per generation, not one per retry
            self._retrying_generation = gen
            self._record_update(result, event=first, source="desired", retrying=True)
        else:
            self._set_failed_generation(gen)
            self._retrying_generation = None
            self._record_update(result, source="desired")
        return retryable


def _tuf_client(config: AgentConfig, fetcher: HttpFetcher) -> Any:
    """The TUF client when the device has a trusted root and a server (imported only then: lean agents stay lean)."""
    if config.update_trust != "tuf" or config.server_url is None or not config.tuf_root_path.is_file():
        if config.update_trust == "tuf" and not config.tuf_root_path.is_file():
            log.warning(
                "no TUF root at %s: updates from the control plane will be refused until it is installed "
                '(edgewise agent --tuf-root FILE), or set update_trust = "signature-only"', config.tuf_root_path,
            )
        return None
    server_url = config.server_url

    def build() -> Any:
        from .tuf_client import TufClient

        return TufClient(config.tuf_root_path, config.tuf_cache_dir, server_url, headers=fetcher.headers,
                         timeout=config.download_timeout_s)

    return _OnFirstUse(build)


class _OnFirstUse:
    """Builds the real object at its first use: python-tuf and securesystemslib cost ~5 MB of resident memory,
    and an agent needs them only when an update arrives, not to serve."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self._obj: Any = None

    def _target(self) -> Any:
        if self._obj is None:
            self._obj = self._build()
        return self._obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._target(), name, value)


STORAGE_KEY = "storage"


def _open_at_rest(config: AgentConfig) -> tuple[Any, Any, Any, Path | None]:
    """Open the keystore, create the ``storage`` key on first start, and build the slot and outbox sealers.

    Returns (keystore, SlotSealer, RowSealer, where an unreadable old outbox key was moved or None).
    """
    from ..security.encryption import RowSealer, load_or_replace_data_key
    from ..security.keystore import KeystoreError, open_keystore
    from .slots import SlotSealer

    try:
        keystore = open_keystore(config.keystore_location)
        if not keystore.has_key(STORAGE_KEY):
            keystore.create_key(STORAGE_KEY, "aes-256")
            log.info("created the storage key %r in %s", STORAGE_KEY, keystore.url)
        key, moved = load_or_replace_data_key(
            keystore, STORAGE_KEY, config.state_dir / "outbox.key", f"edgewise-outbox/1;device={config.device_id}"
        )
    except KeystoreError as exc:
        raise AgentError(f"cannot use the keystore {config.keystore_location}: {exc}") from None
    slot_sealer = SlotSealer(keystore, config.device_id, STORAGE_KEY, encrypt=config.encrypt_at_rest)
    return keystore, slot_sealer, RowSealer(key, config.device_id, encrypt=config.encrypt_at_rest), moved


def _drift_settings(config: AgentConfig) -> dict[str, Any]:
    """The config's drift fields as :class:`~edgewise.agent.drift.DriftObserver` arguments."""
    return {"window": config.drift_window, "alpha": config.drift_alpha, "input_test": config.drift_input_test,
            "scalar_detector": config.drift_scalar_detector, "block": config.drift_block, "check_every": config.drift_block,
            "ph_threshold": config.drift_ph_threshold}


def _adapt_settings(config: AgentConfig) -> Any:
    from .adapt import AdaptSettings

    return AdaptSettings(window=config.adapt_window, min_samples=config.adapt_min_samples, method=config.adapt_method,
                         max_golden_drop=config.adapt_max_golden_drop, drift_cooldown_s=config.adapt_drift_cooldown_s)


def _open_capture(agent: "Agent", config: AgentConfig) -> Any:
    """The sample-capture observer with its sink: the outbox (``upload``) or a local store sealed with its own data key."""
    from .capture import CapturePolicy, SampleCapture

    policy = CapturePolicy(
        enabled=True, low_confidence=config.capture_low_confidence, random_fraction=config.capture_random_fraction,
        drift_window=config.capture_drift_window, budget_bytes=config.capture_budget_bytes,
        destination=config.capture_destination, seed=config.capture_seed,
    )
    try:
        return SampleCapture(policy, _capture_sink(agent, config, policy), config.device_id, scores_of=class_output)
    except Exception as exc:  # capture is optional: the agent serves without it rather than not at all
        log.error("sample capture is configured but cannot start (%s); serving without it", exc)
        return None


def _capture_sink(agent: "Agent", config: AgentConfig, policy: Any) -> Any:
    from .capture import OutboxSink, SampleStore

    sink: Any
    if policy.destination == "local":
        from ..security.encryption import RowSealer, load_or_replace_data_key

        key, moved = load_or_replace_data_key(
            agent.keystore, STORAGE_KEY, config.state_dir / "samples.key", f"edgewise-samples/1;device={config.device_id}"
        )
        if moved is not None:
            log.critical("the sample store key no longer unwraps (moved to %s): samples sealed with it are skipped", moved.name)
        sink = SampleStore(config.state_dir / "samples.db", policy.budget_bytes,
                           sealer=RowSealer(key, config.device_id, encrypt=config.encrypt_at_rest))
    else:
        sink = OutboxSink(agent.outbox, policy.budget_bytes, wake=lambda: agent._flush_wake.set())
    log.info("sample capture on: %s, budget %d bytes", policy.destination, policy.budget_bytes)
    return sink


def _lock_state_dir(state_dir: Path) -> Any:
    """Hold an exclusive lock on the state directory: two agents on one directory would corrupt its slots."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, rely on the operator
        return None
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise AgentError(f"another agent is running with state directory {state_dir}; stop it first or use another --state-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(fd: Any) -> None:
    if fd is not None:
        try:
            os.close(fd)  # closing the descriptor releases the flock
        except OSError:
            pass


def run_agent(config: AgentConfig, *, stop: threading.Event | None = None) -> int:
    """Run an agent until SIGINT/SIGTERM (or ``stop`` is set), then shut it down cleanly; return the exit code."""
    done = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def handle(signum: int, frame: Any) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            done.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
    agent: Agent | None = None
    from .integrity import IntegrityError
    from .selfupdate import EXIT_INTEGRITY, EXIT_RESTART

    try:
        agent = Agent(config)
        from .crash import enable_fault_log

        enable_fault_log(config.state_dir)  # a native crash (SIGSEGV in a model) leaves its stack for the next start
        agent.start()
        while not done.wait(0.5) and not agent.restart_requested:
            pass
    except IntegrityError:
        return EXIT_INTEGRITY  # already logged and queued as a critical alert
    finally:
        if agent is not None:
            agent.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_RESTART if agent is not None and agent.restart_requested else 0
