"""Many lightweight simulated devices in one process, speaking the real protocol to a real broker.

:class:`VirtualFleet` runs one asyncio event loop (in a background thread, so tests and the CLI stay
synchronous) and one MQTT client per device on it: paho's external-event-loop API
(``loop_read``/``loop_write`` registered as reader/writer callbacks of each client's socket,
``loop_misc`` for keepalives from one fleet-wide task). No thread per device: one socket (one file
descriptor) per device, a few kB of Python objects, and a thousand devices cost a fraction of a core.
Beyond a few thousand devices run several fleets in several processes (each a slice of the device
list): nothing is shared between them but the broker.

Each simulated device does what the real agent does on the wire (``agent/link.py``, ``agent/outbox.py``):

- connects with client id = its device id (username = device id and password = a device token when the
  broker wants one), subscribes to its retained desired state, publishes its retained
  :class:`DeviceState` (tags, :class:`HardwareInfo` with ``hardware_class``); the last will is the same
  state with ``status="offline"``;
- follows desired state: ``updating`` for ``install_s``, then the new version and an ``UpdateResult``
  ``ok``, or, for a version whose :class:`VersionBehaviour` crashes (or a ``crashing`` device), a
  ``model.crash`` event and ``rolled_back`` on the previous version; a downgrade without
  ``rollback: true`` is refused (``failed``), as the agent's rollback protection does;
- every ``telemetry_s`` puts one Telemetry (or Summary) record in its in-memory outbox (one sequence
  number per device for records of all kinds), with inference counts, errors and latency from its
  profile × the running version's behaviour, ``drift_score``, and ``shadow`` counts while the desired
  state names a shadow candidate; update results and crashes are Event records;
- drains the outbox in ``Batch`` messages (events first, then telemetry) with QoS 1, one batch in
  flight, dropping records only after the PUBACK: records queued while offline arrive after the
  reconnect, and a batch whose PUBACK was lost is sent again (the server de-duplicates on seq).

Time: every duration in a spec (``telemetry_s``, ``install_s``, the ``offline`` window) is simulated
time; ``time_scale=10`` runs it ten times faster than the wall clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import resource
import secrets
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal
from urllib.parse import urljoin, urlsplit

import msgpack
import paho.mqtt.client as mqtt
import zstandard
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import __version__
from ..bundle.manifest import semver_key
from ..protocol import topics
from ..protocol.codec import COMPRESS_ABOVE, decode_for_topic
from ..protocol.messages import (
    SCHEMA_VERSION, DesiredState, DeviceState, Event, HardwareInfo, ShadowStats, ShadowTarget, Summary, Telemetry,
    UpdateResult,
)
from .behaviour import DEFAULT_BEHAVIOUR, Profile, VersionBehaviour, parse_profile, shadow_window, window

log = logging.getLogger(__name__)

MISC_EVERY_S = 1.0  # paho's loop_misc (keepalive pings, timeouts) for every client, from one task
KEEPALIVE_S = 60
RECONNECT_BASE_S, RECONNECT_CAP_S = 0.2, 5.0
PUBACK_TIMEOUT_S = 10.0  # a batch not acknowledged by then is sent again
BATCH_MAX_RECORDS = 500
AGENT_VERSION = f"{__version__}+sim"
PEER_TIMEOUT_S, SERVER_TIMEOUT_S = 3.0, 120.0  # as the agent's peer_timeout_s: a slow peer falls back to the server
PEER_MAX_TRANSFERS = 4  # per simulated device, as the agent's peer server (503 beyond)
FETCH_ATTEMPTS, FETCH_BACKOFF_S = 5, 1.0  # a download is retried 4 times, full jitter up to 2, 4, 8, 16 s

HARDWARE_CLASSES: dict[str, dict[str, Any]] = {
    "rpi4": {"arch": "aarch64", "cores": 4, "ram_mb": 4096, "isa": ["neon", "asimd"], "disk_mb": 32_000},
    "rpi5": {"arch": "aarch64", "cores": 4, "ram_mb": 8192, "isa": ["neon", "asimd", "asimddp"], "disk_mb": 64_000},
    "jetson-nano": {"arch": "aarch64", "cores": 4, "ram_mb": 4096, "isa": ["neon", "asimd"], "disk_mb": 16_000},
    "x86-small": {"arch": "x86_64", "cores": 2, "ram_mb": 2048, "isa": ["sse4_2", "avx", "avx2"], "disk_mb": 16_000},
}
"""Presets for the hardware a simulated device reports; any other class name gets a generic aarch64 device."""


class VirtualFleetError(RuntimeError):
    pass


class VirtualDeviceSpec(BaseModel):
    """One simulated device: who it is, what hardware it reports, how it behaves."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    hardware_class: str = "rpi4"
    tags: list[str] = Field(default_factory=list)
    profile: str = Field(default="healthy", description="healthy | slow(F) | crashing | drifted(S) | offline(FROM_S,FOR_S)")
    model: str | None = Field(default=None, description="Model already installed at start (None: none yet).")
    version: str | None = None
    telemetry_s: float = Field(default=1.0, gt=0)
    install_s: float = Field(default=0.5, ge=0)
    record: Literal["telemetry", "summary"] = "telemetry"
    inference_rate: float = Field(default=20.0, ge=0, description="Inferences per (simulated) second.")
    seed: int | None = None

    @field_validator("device_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return topics.check_device_id(v)

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        parse_profile(v)  # raises naming what is wrong
        return v


def _batch_payload(device_id: str, items: list[bytes]) -> bytes:
    """The wire bytes of ``Batch(device_id, items)`` from already-packed records (as the agent's outbox splices them)."""
    p = msgpack.Packer(use_bin_type=True)
    raw = b"".join(
        (p.pack_map_header(4), p.pack("v"), p.pack(SCHEMA_VERSION), p.pack("type"), p.pack("batch"),
         p.pack("device_id"), p.pack(device_id), p.pack("items"), p.pack_array_header(len(items)), *items)
    )
    if len(raw) > COMPRESS_ABOVE:
        packed = zstandard.ZstdCompressor(level=3).compress(raw)
        if len(packed) < len(raw):
            return packed
    return raw


def _pack(record: BaseModel) -> bytes:
    return msgpack.packb(record.model_dump(mode="json", exclude_none=False), use_bin_type=True)


@dataclass
class DeviceStats:
    """What one simulated device did (read from any thread; the loop thread writes)."""

    connects: int = 0
    records: int = 0  # put in the outbox
    acked: int = 0  # records the broker acknowledged
    batches: int = 0  # Batch messages acknowledged
    resent: int = 0  # batches sent again (PUBACK lost or timed out)
    updates: dict[str, int] = field(default_factory=dict)  # result -> count
    history: list[tuple[str | None, str]] = field(default_factory=list)  # (version, result) of every update, in order
    shadowed: set[str] = field(default_factory=set)  # versions it ran in shadow mode
    first_report: dict[str, float] = field(default_factory=dict)  # version -> wall clock of its first telemetry or crash report
    seqs_acked: set[int] = field(default_factory=set)  # only with VirtualFleet(track_seqs=True): tests of exactly-once


class VirtualDevice:
    """One simulated device's state and protocol; all methods run on the fleet's event loop."""

    def __init__(self, spec: VirtualDeviceSpec, fleet: "VirtualFleet", seq_base: int) -> None:
        self.spec = spec
        self.id = spec.device_id
        self.profile: Profile = parse_profile(spec.profile)
        self.fleet = fleet
        self.rng = random.Random(spec.seed if spec.seed is not None else zlib.crc32(spec.device_id.encode()))
        self.model, self.version = spec.model, spec.version
        self.highest = spec.version
        self.generation: int | None = None
        self.failed_generation: int | None = None
        self.last_update: UpdateResult | None = None
        self.updating = False
        self.shadow: ShadowTarget | None = None
        self.password: str | None = None
        self.client: mqtt.Client | None = None
        self.connected = False
        self.outbox: deque[tuple[int, str, bytes]] = deque()  # (seq, kind, packed record)
        self.next_seq = seq_base
        self.inflight: dict[int, tuple[list[int], float]] = {}  # mid -> (seqs, sent at)
        self.stats = DeviceStats()
        self.inferences = self.errors = 0
        self.started = 0.0
        self._desired: DesiredState | None = None
        self._reconciling = False
        self._wake = asyncio.Event()
        self._attempt = 0
        self._next_connect = 0.0
        self.holds: list[str] = []  # sha256 of the bundles it downloaded (VirtualFleet(download=True))
        self.serving = 0  # peer transfers in progress

    # -- what it reports ---------------------------------------------------------------------------

    def hardware(self) -> HardwareInfo:
        preset = HARDWARE_CLASSES.get(self.spec.hardware_class, {"arch": "aarch64", "cores": 4, "ram_mb": 2048})
        return HardwareInfo(os="Linux (simulated)", runtime="onnxruntime (simulated)", providers=["CPUExecutionProvider"],
                            hardware_class=self.spec.hardware_class, **preset)

    def state(self, status: str | None = None) -> DeviceState:
        return DeviceState(
            device_id=self.id, status=status or ("updating" if self.updating else "online"),  # type: ignore[arg-type]
            model=self.model, version=self.version, generation=self.generation, last_update=self.last_update,
            agent_version=AGENT_VERSION, hardware=self.hardware(), tags=list(self.spec.tags), ts=time.time(),
            peer_url=self.fleet.peer_url(self.id), holds=self.holds[-64:] if self.fleet.peer_port else [],
        )

    def sim_elapsed(self) -> float:
        return (time.monotonic() - self.started) * self.fleet.time_scale

    # -- outbox ----------------------------------------------------------------------------------

    def enqueue(self, record: Telemetry | Summary | Event) -> int:
        seq = self.next_seq
        self.next_seq += 1
        record = record.model_copy(update={"seq": seq})
        self.outbox.append((seq, "event" if isinstance(record, Event) else "telemetry", _pack(record)))
        self.stats.records += 1
        self._wake.set()
        return seq

    def event(self, kind: str, message: str, *, severity: str = "info", detail: dict[str, Any] | None = None) -> None:
        self.enqueue(Event(device_id=self.id, seq=0, ts=time.time(), mono=time.monotonic(), kind=kind,
                           severity=severity, message=message, detail=detail or {}))  # type: ignore[arg-type]

    def telemetry_record(self, window_s: float) -> Telemetry | Summary:
        running = self.fleet.behaviour(self.version) if self.version else None
        hw = self.spec.hardware_class
        if running is None:
            fig = None
        else:
            fig = window(self.profile, running, hw, window_s, rate_per_s=self.spec.inference_rate, rng=self.rng)
            self.inferences += fig.inferences
            self.errors += fig.errors
        shadow = None
        if self.shadow is not None and running is not None and fig is not None:
            s = self.shadow
            counts = shadow_window(fig.inferences // s.sample_every, self.fleet.behaviour(s.version), running, hw,
                                   self.profile, self.rng)
            shadow = ShadowStats(model=s.model, version=s.version, **counts)  # type: ignore[arg-type]
        common: dict[str, Any] = dict(
            device_id=self.id, seq=0, ts=time.time(), mono=time.monotonic(), model=self.model, version=self.version,
            window_s=round(window_s, 3), shadow=shadow,
            drift_score=fig.drift_score if fig is not None else None,
        )
        if self.spec.record == "summary":
            return Summary(
                **common, inferences=fig.inferences if fig else 0, errors=fig.errors if fig else 0,
                predictions=(fig.inferences - fig.errors) if fig else 0,
                latency_p50_ms=fig.latency_p50_ms if fig else None, latency_p95_ms=fig.latency_p95_ms if fig else None,
                latency_p99_ms=fig.latency_p99_ms if fig else None, classes=fig.classes if fig else {},
                confidence_hist=fig.confidence_hist if fig else [],
            )
        return Telemetry(
            **common, uptime_s=round(self.sim_elapsed(), 3), inferences=self.inferences, errors=self.errors,
            window_inferences=fig.inferences if fig else 0,
            latency_p50_ms=fig.latency_p50_ms if fig else None, latency_p95_ms=fig.latency_p95_ms if fig else None,
            outbox_pending=len(self.outbox), dropped=0,
        )

    # -- MQTT session ----------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open a fresh session (TCP connect is blocking but local and short; CONNACK arrives via the loop)."""
        loop = self.fleet.loop
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv311,
                             clean_session=True, reconnect_on_failure=False)
        client.connect_timeout = 5.0
        if self.password is not None:
            client.username_pw_set(self.id, self.password)
        client.will_set(topics.state(self.id), _encode(self.state("offline")), qos=1, retain=True)
        client.on_socket_open = lambda c, u, sock: loop.add_reader(sock, c.loop_read)
        client.on_socket_close = lambda c, u, sock: _quietly(loop.remove_reader, sock)
        client.on_socket_register_write = lambda c, u, sock: loop.add_writer(sock, c.loop_write)
        client.on_socket_unregister_write = lambda c, u, sock: _quietly(loop.remove_writer, sock)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client
        try:
            client.connect(self.fleet.host, self.fleet.port, keepalive=KEEPALIVE_S)
        except Exception as exc:  # OSError mostly
            self.client = None
            self._schedule_reconnect(f"cannot connect: {exc}")

    def _schedule_reconnect(self, why: str) -> None:
        bound = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** min(self._attempt, 16))
        self._attempt += 1
        self._next_connect = time.monotonic() + self.rng.random() * bound
        log.debug("%s: %s; reconnecting", self.id, why)

    def _drop(self, *, clean: bool) -> None:
        """End the session; ``clean``: publish the offline state first (a deliberate stop)."""
        client, self.client = self.client, None
        self.connected = False
        self.inflight.clear()  # unacknowledged records stay in the outbox: sent again next session
        if client is None:
            return
        if clean:  # a deliberate stop says so; a lost link (not clean) leaves it to the broker's last will
            try:
                client.publish(topics.state(self.id), _encode(self.state("offline")), qos=0, retain=True)
                client.disconnect()
                client.loop_write()
            except Exception:
                pass
        sock = client.socket()
        client.on_socket_close = client.on_socket_unregister_write = None  # paho closes it again when collected
        client.on_disconnect = None
        if sock is not None:
            for remove in (self.fleet.loop.remove_reader, self.fleet.loop.remove_writer):
                try:
                    remove(sock)
                except (ValueError, OSError):
                    pass
            try:
                sock.close()
            except OSError:
                pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.fleet.refused += 1
            log.warning("%s: broker refused the connection: %s", self.id, reason)
            self._drop(clean=False)
            self._schedule_reconnect(str(reason))
            self._attempt = max(self._attempt, 5)  # a refusal is not fixed by hammering
            return
        self.connected = True
        self._attempt = 0
        self.stats.connects += 1
        client.subscribe(topics.desired(self.id), qos=1)
        client.publish(topics.state(self.id), _encode(self.state()), qos=1, retain=True)
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return
        self.connected = False
        self.client = None
        self.inflight.clear()
        if not self.fleet.stopping:
            self._schedule_reconnect(f"disconnected ({reason})")
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        try:
            _, desired = decode_for_topic(msg.topic, msg.payload)
        except Exception as exc:
            log.warning("%s: refused message on %s: %s", self.id, msg.topic, exc)
            return
        if not isinstance(desired, DesiredState):
            return
        if self.generation is not None and desired.generation < self.generation:
            return
        if self._desired is not None and desired.generation < self._desired.generation:
            return
        self._desired = desired
        if not self._reconciling:
            self._reconciling = True
            self.fleet.spawn(self._reconcile())

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        entry = self.inflight.pop(mid, None)
        if entry is None:
            return
        done = set(entry[0])
        self.outbox = deque(r for r in self.outbox if r[0] not in done)
        self.stats.acked += len(done)
        self.stats.batches += 1
        if self.fleet.track_seqs:
            self.stats.seqs_acked |= done
        self._wake.set()

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.client is not None and self.connected:
            self.client.publish(topic, payload, qos=1, retain=retain)

    def _flush(self) -> None:
        """Send the next batch (events first) if none is in flight."""
        if not self.connected or self.client is None or not self.outbox:
            return
        now = time.monotonic()
        if self.inflight:
            mid, (seqs, at) = next(iter(self.inflight.items()))
            if now - at < PUBACK_TIMEOUT_S:
                return
            self.inflight.pop(mid)
            self.stats.resent += 1
        kind = "event" if any(r[1] == "event" for r in self.outbox) else "telemetry"
        chunk = [r for r in self.outbox if r[1] == kind][:BATCH_MAX_RECORDS]
        topic = topics.events(self.id) if kind == "event" else topics.telemetry(self.id)
        info = self.client.publish(topic, _batch_payload(self.id, [r[2] for r in chunk]), qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.inflight[info.mid] = ([r[0] for r in chunk], now)

    # -- desired state ---------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        try:
            while self._desired is not None:
                desired, self._desired = self._desired, None
                await self._apply(desired)
        finally:
            self._reconciling = False

    async def _apply(self, d: DesiredState) -> None:
        gen = d.generation
        if self.generation is not None and gen < self.generation:
            return
        self.shadow = d.shadow
        if d.shadow is not None:
            self.stats.shadowed.add(d.shadow.version)
        if (d.model is None and d.version is None) or (self.model, self.version) == (d.model, d.version):
            self.generation = gen
            self.failed_generation = None
            self._publish(topics.state(self.id), _encode(self.state()), retain=True)
            return
        if gen == self.failed_generation:
            self._publish(topics.state(self.id), _encode(self.state()), retain=True)
            return
        if (not d.rollback and d.model == self.model and self.highest is not None and d.version is not None
                and semver_key(d.version) < semver_key(self.highest)):
            self.failed_generation = gen
            self._record(UpdateResult(generation=gen, model=d.model, version=d.version, result="failed", at=time.time(),
                                      reason=f"{d.version} is older than {self.highest}, the highest committed "
                                             "(rollback protection); deploy it with rollback: true"))
            return
        self.updating = True
        self._publish(topics.state(self.id), _encode(self.state()), retain=True)
        if self.fleet.download and d.artifact is not None and not await self.fleet.fetch(d):
            self.updating = False
            self.failed_generation = gen
            self._record(UpdateResult(generation=gen, model=d.model, version=d.version, result="failed", at=time.time(),
                                      reason="download failed from every peer and the control plane (simulated fetch)"))
            return
        await asyncio.sleep(self.spec.install_s / self.fleet.time_scale)
        self.updating = False
        if self._desired is not None and self._desired.generation > gen:
            return  # superseded while installing: the newer one is applied next
        behaviour = self.fleet.behaviour(d.version)
        if behaviour.crash or self.profile.kind == "crashing":
            self.failed_generation = gen
            self.stats.first_report.setdefault(str(d.version), time.time())
            self.event("model.crash", f"{d.model} {d.version} crashed during its trial (simulated)", severity="error",
                       detail={"model": d.model, "version": d.version, "phase": "trial"})
            self._record(UpdateResult(generation=gen, model=d.model, version=d.version, result="rolled_back",
                                      reason="the model crashed during its trial; back on the previous version",
                                      at=time.time()))
            return
        self.model, self.version, self.generation, self.failed_generation = d.model, d.version, gen, None
        if self.fleet.download and d.artifact is not None and d.artifact.sha256 not in self.holds:
            self.holds.append(d.artifact.sha256)
        if d.version is not None and (self.highest is None or semver_key(d.version) > semver_key(self.highest)):
            self.highest = d.version
        self._record(UpdateResult(generation=gen, model=d.model, version=d.version, result="ok", at=time.time()))

    def _record(self, result: UpdateResult) -> None:
        self.last_update = result
        self.stats.updates[result.result] = self.stats.updates.get(result.result, 0) + 1
        self.stats.history.append((result.version, result.result))
        self._publish(topics.state(self.id), _encode(self.state()), retain=True)
        ok = result.result == "ok"
        what = f"{result.model} {result.version}"
        self.event("update", f"now running {what}" if ok else f"update to {what} {result.result}: {result.reason}",
                   severity="info" if ok else "error", detail={**result.model_dump(mode="json"), "source": "desired"})

    # -- life ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Telemetry ticks, link up/down by profile, flushing: until the fleet stops."""
        ts = self.fleet.time_scale
        period = (self.fleet.telemetry_s or self.spec.telemetry_s) / ts
        self.started = time.monotonic()
        next_tick = self.started + period * (0.5 + self.rng.random())  # spread the fleet's ticks over a period
        last_tick_sim = 0.0
        while not self.fleet.stopping:
            now = time.monotonic()
            offline = self.profile.offline_at(self.sim_elapsed())
            if offline and self.client is not None:
                self._drop(clean=False)
            elif not offline and self.client is None and now >= self._next_connect:
                self._connect()
            if now >= next_tick:
                elapsed = self.sim_elapsed()
                self.enqueue(self.telemetry_record(elapsed - last_tick_sim))
                if self.version is not None:
                    self.stats.first_report.setdefault(self.version, time.time())
                last_tick_sim = elapsed
                period = (self.fleet.telemetry_s or self.spec.telemetry_s) / ts
                next_tick += period
                if next_tick < now:  # a stalled loop: skip the missed ticks rather than burst
                    next_tick = now + period
            self._flush()
            self._wake.clear()
            wait = next_tick - time.monotonic()
            if self.client is None and not offline:
                wait = min(wait, max(0.01, self._next_connect - time.monotonic()))
            if self.profile.kind == "offline":
                wait = min(wait, 0.2)
            if self.inflight:
                wait = min(wait, PUBACK_TIMEOUT_S)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.005, wait))
            except asyncio.TimeoutError:
                pass

    def describe(self) -> dict[str, Any]:
        return {
            "device_id": self.id, "hardware_class": self.spec.hardware_class, "profile": self.profile.describe(),
            "model": self.model, "version": self.version, "generation": self.generation, "connected": self.connected,
            "records": self.stats.records, "acked": self.stats.acked, "pending": len(self.outbox),
            "connects": self.stats.connects, "updates": dict(self.stats.updates),
        }


def _quietly(remove: Callable[[Any], Any], sock: Any) -> None:
    """Unregister a socket from the loop; a socket already closed is no error."""
    try:
        remove(sock)
    except (ValueError, OSError):
        pass


def _encode(msg: BaseModel) -> bytes:
    from ..protocol import encode

    return encode(msg)


class VirtualFleet:
    """Simulated devices against a real broker and control plane (see the module docstring).

    ``control_url`` and ``admin_token`` are used only to get device tokens (``POST
    /api/v1/devices/{id}/token``) when the broker refuses anonymous devices (``device_auth=None``
    probes the broker; True/False decide). ``behaviours`` maps a model version to how it behaves;
    a version not in it is healthy (:data:`DEFAULT_BEHAVIOUR`).

    >>> with VirtualFleet("mqtt://127.0.0.1:1883", "http://127.0.0.1:8000", token,  # doctest: +SKIP
    ...                   [VirtualDeviceSpec(device_id=f"sim-{i}") for i in range(100)],
    ...                   {"1.1.0": VersionBehaviour(latency_ms={"*": 12})}) as fleet:
    ...     fleet.wait_versions({f"sim-{i}": "1.1.0" for i in range(100)}, timeout=60)
    """

    def __init__(
        self,
        broker_url: str,
        control_url: str | None,
        admin_token: str | None,
        devices: Iterable[VirtualDeviceSpec],
        behaviours: dict[str, VersionBehaviour] | None = None,
        *,
        time_scale: float = 1.0,
        device_auth: bool | None = None,
        seq_base: int | None = None,
        track_seqs: bool = False,
        download: bool = False,
        serve_peers: bool = False,
    ) -> None:
        u = urlsplit(broker_url)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise VirtualFleetError(f"broker URL {broker_url!r}: use mqtt://HOST:PORT (TLS brokers are not simulated yet)")
        if time_scale <= 0:
            raise VirtualFleetError(f"time_scale must be > 0, got {time_scale}")
        self.host, self.port = u.hostname, u.port or 1883
        self.broker_url, self.control_url, self.admin_token = broker_url, control_url, admin_token
        self.specs = list(devices)
        ids = [s.device_id for s in self.specs]
        if len(set(ids)) != len(ids):
            raise VirtualFleetError("device ids must be unique within a fleet")
        self.behaviours = dict(behaviours or {})
        self.time_scale = time_scale
        self.device_auth = device_auth
        self.track_seqs = track_seqs  # remember every acknowledged seq (memory grows with the run: tests only)
        self.seq_base = seq_base if seq_base is not None else int(time.time()) * 1_000_000
        self.devices: dict[str, VirtualDevice] = {}
        self.loop: asyncio.AbstractEventLoop | Any = None  # created by start(): one loop per run
        self.stopping = False
        self.refused = 0
        self.telemetry_s: float | None = None  # overrides every spec's telemetry_s (set_telemetry_interval)
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # download-cost model: fetch each desired artifact (peers named in DesiredState.peers first, then the control
        # plane with the operator token) and check its sha256; serve_peers: serve what a device holds to the others
        self.download, self.serve_peers = download or serve_peers, serve_peers
        if self.download and not control_url:
            raise VirtualFleetError("download=True needs the control plane URL (edgewise sim --server URL --token TOKEN)")
        self.held: dict[str, bytes] = {}  # sha256 -> bundle bytes: one copy per process, whichever device holds it
        self.peer_port: int | None = None
        self.downloads: dict[str, int] = {"from_peer": 0, "from_server": 0, "peer_errors": 0, "server_errors": 0, "retries": 0,
                                          "failed": 0, "bytes": 0}
        self.http: Any = None

    # -- public API (any thread) -----------------------------------------------------------------

    def behaviour(self, version: str | None) -> VersionBehaviour:
        return self.behaviours.get(version or "", DEFAULT_BEHAVIOUR)

    def set_behaviour(self, version: str, behaviour: VersionBehaviour) -> None:
        """Describe (or change) how ``version`` behaves; takes effect from the next telemetry window."""
        self.behaviours[version] = behaviour

    def set_telemetry_interval(self, seconds: float | None) -> None:
        """Every device sends telemetry every ``seconds`` (simulated) from its next tick on; None: each its spec's."""
        if seconds is not None and seconds <= 0:
            raise VirtualFleetError(f"telemetry interval must be > 0, got {seconds}")
        self.telemetry_s = seconds

    def start(self, timeout: float = 60.0) -> "VirtualFleet":
        if self._thread is not None:
            return self
        _raise_fd_limit(len(self.specs) + 256)
        passwords = self._device_passwords()
        self.loop = asyncio.new_event_loop()
        self.stopping = False
        self._thread = threading.Thread(target=self._main, args=(passwords,), name="edgewise-virtual-fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise VirtualFleetError("the virtual fleet's event loop did not start")
        if self._error is not None:
            raise VirtualFleetError(f"the virtual fleet did not start: {self._error}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Disconnect every device (publishing its offline state) and end the loop. Idempotent."""
        if self._thread is None:
            return
        self.stopping = True
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        try:
            fut.result(timeout)
        except Exception as exc:
            log.warning("virtual fleet shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self._thread = None
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> "VirtualFleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the fleet's loop (where device state lives) and return its result."""
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def versions(self) -> dict[str, str | None]:
        return self.call(lambda: {d.id: d.version for d in self.devices.values()})

    def connected(self) -> int:
        return self.call(lambda: sum(d.connected for d in self.devices.values()))

    def wait_versions(self, expected: dict[str, str | None], timeout: float = 60.0, *, settled: bool = True) -> dict[str, str | None]:
        """Block until every device in ``expected`` runs its version (and, with ``settled``, has no update
        in progress); return the versions then. :class:`TimeoutError` names the devices that are not there."""
        unknown = set(expected) - set(self.devices) if self.devices else set(expected) - {s.device_id for s in self.specs}
        if unknown:
            raise VirtualFleetError(f"not devices of this fleet: {sorted(unknown)[:5]}")
        deadline = time.monotonic() + timeout
        while True:
            now = self.call(lambda: {d.id: (d.version, d.updating or d._reconciling) for d in self.devices.values()})
            wrong = {k: now[k][0] for k, v in expected.items() if now[k][0] != v or (settled and now[k][1])}
            if not wrong:
                return {k: now[k][0] for k in expected}
            if time.monotonic() > deadline:
                sample = dict(list(wrong.items())[:5])
                raise TimeoutError(f"{len(wrong)} of {len(expected)} device(s) not on the expected version after {timeout:.0f} s, "
                                   f"e.g. {sample}")
            time.sleep(0.05)

    def wait_connected(self, timeout: float = 60.0) -> None:
        """Block until every device whose profile is online right now is connected."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.call(lambda: [d.id for d in self.devices.values()
                                         if not d.connected and not d.profile.offline_at(d.sim_elapsed())])
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} device(s) not connected after {timeout:.0f} s, e.g. {missing[:5]}"
                                   + (f"; the broker refused {self.refused} connection(s)" if self.refused else ""))
            time.sleep(0.05)

    def wait_flushed(self, timeout: float = 30.0) -> None:
        """Block until every connected device's outbox is empty (everything it queued acknowledged)."""
        deadline = time.monotonic() + timeout
        while self.call(lambda: sum(len(d.outbox) for d in self.devices.values())) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("outboxes not drained in time")
            time.sleep(0.05)

    def summary(self) -> dict[str, Any]:
        """Fleet-wide counters: devices, connected, versions, records, acked, pending, updates by result."""
        def collect() -> dict[str, Any]:
            versions: dict[str, int] = {}
            updates: dict[str, int] = {}
            for d in self.devices.values():
                versions[str(d.version)] = versions.get(str(d.version), 0) + 1
                for k, v in d.stats.updates.items():
                    updates[k] = updates.get(k, 0) + v
            ds = list(self.devices.values())
            return {
                "devices": len(ds), "connected": sum(d.connected for d in ds), "versions": versions,
                "records": sum(d.stats.records for d in ds), "acked": sum(d.stats.acked for d in ds),
                "pending": sum(len(d.outbox) for d in ds), "batches": sum(d.stats.batches for d in ds),
                "resent": sum(d.stats.resent for d in ds), "connects": sum(d.stats.connects for d in ds),
                "updates": updates, "refused_connections": self.refused, "downloads": dict(self.downloads),
            }
        return self.call(collect)

    # -- the loop thread -------------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _main(self, passwords: dict[str, str]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            for spec in self.specs:
                dev = VirtualDevice(spec, self, self.seq_base)
                dev.password = passwords.get(spec.device_id)
                self.devices[spec.device_id] = dev
            if self.download:
                import httpx

                self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=32), follow_redirects=True)  # per process
            if self.serve_peers:
                server = self.loop.run_until_complete(asyncio.start_server(self._serve_peer, "127.0.0.1", 0))
                self.peer_port = server.sockets[0].getsockname()[1]
            for dev in self.devices.values():
                self.spawn(dev.run())
            self.spawn(self._misc())
        except BaseException as exc:  # report it to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _misc(self) -> None:
        while not self.stopping:
            for dev in list(self.devices.values()):
                c = dev.client
                if c is not None:
                    try:
                        c.loop_misc()
                    except Exception:
                        log.debug("loop_misc failed for %s", dev.id, exc_info=True)
            await asyncio.sleep(MISC_EVERY_S)

    async def _shutdown(self) -> None:
        self.stopping = True
        for dev in self.devices.values():
            dev._wake.set()
            if dev.connected:
                dev._drop(clean=True)
            elif dev.client is not None:
                dev._drop(clean=False)
        await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        if self.http is not None:
            await self.http.aclose()

    # -- download-cost model and peer serving (issue 9) ------------------------------------------

    def peer_url(self, device_id: str) -> str | None:
        """Where ``device_id`` serves bundles: this process's peer server, under the device's id."""
        return f"http://127.0.0.1:{self.peer_port}/{device_id}" if self.peer_port else None

    async def fetch(self, d: DesiredState) -> bool:
        """Download ``d.artifact`` as the agent's PeerFetcher orders it (the peers the desired state names, then the
        control plane) and check its sha256; the bytes are kept once per process for serving. False: no source had it."""
        art = d.artifact
        assert art is not None and self.http is not None
        sources = [(f"{p.rstrip('/')}/v1/peer/bundles/{art.sha256}", None, PEER_TIMEOUT_S) for p in d.peers]
        auth = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else None
        sources.append((urljoin(str(self.control_url).rstrip("/") + "/", art.url), auth, SERVER_TIMEOUT_S))
        for attempt in range(FETCH_ATTEMPTS):
            if attempt:  # a busy control plane (a whole wave asking at once): back off with full jitter, as agents do
                self.downloads["retries"] = self.downloads.get("retries", 0) + 1
                await asyncio.sleep(random.random() * FETCH_BACKOFF_S * 2 ** attempt)
            for k, (url, headers, timeout) in enumerate(sources):
                peer = k < len(d.peers)
                try:
                    r = await self.http.get(url, headers=headers, timeout=timeout)
                    ok = r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == art.sha256
                except Exception as exc:  # httpx errors, timeouts
                    log.debug("fetch %s: %s", url, exc)
                    ok = False
                if ok:
                    self.held.setdefault(art.sha256, r.content)
                    self.downloads["from_peer" if peer else "from_server"] += 1
                    self.downloads["bytes"] += len(r.content)
                    return True
                self.downloads["peer_errors" if peer else "server_errors"] = self.downloads.get("peer_errors" if peer else "server_errors", 0) + 1
        self.downloads["failed"] += 1
        return False

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``GET /{device_id}/v1/peer/bundles/{sha256}``: the bundle if that device holds it (200), 404 otherwise, 503
        beyond PEER_MAX_TRANSFERS at once per device. One request per connection, no Range (the agent's server has it)."""
        dev = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b" ", 2)[1].decode("ascii", "replace").strip("/").split("/")
            body, status = b"", "404 Not Found"
            if len(parts) == 5 and parts[1:4] == ["v1", "peer", "bundles"]:
                dev = self.devices.get(parts[0])
                sha = parts[4]
                if dev is not None and sha in dev.holds and sha in self.held:
                    if dev.serving >= PEER_MAX_TRANSFERS:
                        status, dev = "503 Service Unavailable", None
                    else:
                        dev.serving += 1
                        status, body = "200 OK", self.held[sha]
                else:
                    dev = None
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except Exception as exc:
            log.debug("peer request: %s", exc)
        finally:
            if dev is not None:
                dev.serving -= 1
            writer.close()

    # -- device tokens ---------------------------------------------------------------------------

    def _device_passwords(self) -> dict[str, str]:
        need = self.device_auth if self.device_auth is not None else _broker_refuses_anonymous(self.host, self.port)
        if not need:
            return {}
        if not self.control_url or not self.admin_token:
            raise VirtualFleetError(
                f"the broker {self.broker_url} refuses anonymous devices: give the control plane URL and an operator "
                "token (edgewise sim --server URL --token TOKEN) so each device gets a device token"
            )
        import httpx

        out: dict[str, str] = {}
        with httpx.Client(base_url=self.control_url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30) as http:
            for spec in self.specs:
                r = http.post(f"/api/v1/devices/{spec.device_id}/token")
                if r.status_code != 201:
                    raise VirtualFleetError(f"cannot get a device token for {spec.device_id}: HTTP {r.status_code} {r.text[:200]}")
                out[spec.device_id] = r.json()["token"]
        return out


def _broker_refuses_anonymous(host: str, port: int, timeout: float = 5.0) -> bool:
    """Connect once without credentials: does the broker say "not authorized"?"""
    result: list[bool] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgewise-sim-probe-{secrets.token_hex(4)}",
                    protocol=mqtt.MQTTv311, reconnect_on_failure=False)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result.append(bool(getattr(reason, "is_failure", False)))
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = lambda *a: done.set()
    try:
        c.connect(host, port, keepalive=10)
    except OSError as exc:
        raise VirtualFleetError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    return bool(result and result[0]) or not result


def _raise_fd_limit(want: int) -> None:
    """One socket per device: lift the soft limit on open files toward the hard one when the fleet needs it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit to %d (hard limit %s): large fleets may fail to connect", want, hard)


def specs_for(
    n: int, *, prefix: str = "sim", profiles: list[Profile] | None = None, hardware_classes: Iterable[str] = ("rpi4",),
    tags: Iterable[str] = ("sim",), start: int = 0, total: int | None = None, **common: Any,
) -> list[VirtualDeviceSpec]:
    """``n`` device specs: ids ``{prefix}-00001``…, hardware classes round-robin, profiles as given (healthy otherwise).

    ``start``/``total``: this is the slice ``[start, start + n)`` of a fleet of ``total`` devices split over several
    processes; ids, hardware classes, seeds and ``profiles`` (a list for the whole fleet) are those of the whole fleet."""
    classes = list(hardware_classes)
    total = max(total or 0, start + n)
    width = max(5, len(str(total)))
    return [
        VirtualDeviceSpec(
            device_id=f"{prefix}-{i + 1:0{width}d}", hardware_class=classes[i % len(classes)], tags=list(tags),
            profile=profiles[i].describe() if profiles else "healthy", seed=i, **common,
        )
        for i in range(start, start + n)
    ]
