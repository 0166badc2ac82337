"""Ingest: turn device messages from the broker into rows, never crashing on bad input.

``Ingest.handle_many`` stores a batch of messages in one transaction (the bus's ingest worker
calls it with whatever arrived since the last batch, and acknowledges the messages to the
broker only after it returned True: nothing is acknowledged that is not stored). Whatever the
payloads, it returns: a message that breaks the wire contract is counted (per reason) and
logged with its topic; a database failure is counted and logged with its traceback, and the
batch is retried one message per transaction so one bad row costs only itself. Telemetry and
events are de-duplicated by the database on (device_id, seq), so the at-least-once
delivery of QoS 1 and of the agent's outbox costs nothing but a counter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..protocol import Batch, DeviceState, Event, ProtocolError, Sample, Summary, Telemetry, decode_for_topic, topics
from .alerts import raise_from_event
from .db import Database, insert_ignore
from .deployments import Publisher, publish_desired
from .devices import TAG_MAX, ensure_device
from .peers import directory as peer_directory
from .drift import DriftWatch
from .samples import sample_values
from .models import Device, EventRow, SummaryRow, TelemetryRow
from .models import SampleRow
from .timeutil import utcnow

log = logging.getLogger(__name__)

LOG_FIRST_N = 10  # per reason; after that every LOG_EVERY-th, so a noisy device cannot flood the log
LOG_EVERY = 1000
CLOCK_WINDOW_S = 600.0  # the clock-offset estimate is a minimum over (about) this much server time


@dataclass(frozen=True)
class IngestStats:
    """A snapshot of the counters (since this process started)."""

    messages: int = 0  # every message handed to handle()
    states: int = 0
    telemetry_rows: int = 0  # stored
    event_rows: int = 0  # stored
    summary_rows: int = 0  # stored
    sample_rows: int = 0  # captured samples stored (control.samples)
    duplicates: int = 0  # records dropped because (device_id, seq) was already stored
    bad: int = 0  # messages refused by the wire contract
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # valid messages the server failed to store (database trouble)
    republished: int = 0  # desired states re-sent to devices that did not have them yet
    stale_states: int = 0  # device states older than one already applied (out of order across ingest workers)


def classify(exc: ProtocolError) -> str:
    """A short, stable reason for a counter (the protocol's own code)."""
    return getattr(exc, "reason", "undecodable")


class Ingest:
    """Stores what devices say. ``publisher`` (set once the bus exists) is used to re-send a
    desired state to a device that reports it does not have it yet."""

    def __init__(self, db: Database, publisher: Publisher | None = None, *, republish_interval_s: float = 30.0) -> None:
        self.db = db
        self.publisher = publisher
        self.republish_interval_s = republish_interval_s
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._bad: Counter[str] = Counter()
        self._last_republish: dict[str, float] = {}
        self.drift = DriftWatch()  # adds drift sketches per device and hour, judges the fleet now and then

    # -- counters --------------------------------------------------------------------------------

    def stats(self) -> IngestStats:
        with self._lock:
            c = self._counts
            return IngestStats(
                messages=c["messages"],
                states=c["states"],
                telemetry_rows=c["telemetry_rows"],
                event_rows=c["event_rows"],
                summary_rows=c["summary_rows"],
                sample_rows=c["sample_rows"],
                duplicates=c["duplicates"],
                bad=sum(self._bad.values()),
                bad_by_reason=dict(self._bad),
                errors=c["errors"],
                republished=c["republished"],
                stale_states=c["stale_states"],
            )

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _reject(self, topic: str, reason: str, exc: Exception) -> None:
        with self._lock:
            self._bad[reason] += 1
            n = self._bad[reason]
        level = logging.WARNING if n <= LOG_FIRST_N or n % LOG_EVERY == 0 else logging.DEBUG
        log.log(level, "rejected message on %s (%s, #%d): %s", topic, reason, n, exc)

    # -- entry point -----------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Decode, check and store one message. Never raises."""
        self.handle_many([(topic, payload)])

    def handle_many(self, messages: Sequence[tuple[str, bytes]]) -> bool:
        """Decode, check and store ``messages`` in one transaction; never raises.

        Returns False only when the database refused the batch and every message of it (the caller should not
        acknowledge them: the broker redelivers, and (device, seq) de-duplication makes that harmless)."""
        decoded: list[tuple[str, Any]] = []
        for topic, payload in messages:
            self._count(messages=1)
            try:
                topics.parse(topic)
            except ProtocolError as exc:
                self._reject(topic, "bad_topic", exc)
                continue
            try:
                _, msg = decode_for_topic(topic, payload)
            except ProtocolError as exc:
                self._reject(topic, classify(exc), exc)
                continue
            if not (isinstance(msg, (DeviceState, Batch, Telemetry, Event, Summary, Sample)) or getattr(msg, "type", None) == "fl_update"):
                # decode_for_topic only lets device->server types through on our subscriptions
                self._reject(topic, "wrong_channel", ProtocolError(f"{msg.type!r} is not for the control plane"))
                continue
            decoded.append((topic, msg))
        if not decoded:
            return True
        try:
            self._store(decoded)
            return True
        except Exception:
            if len(decoded) == 1:
                self._count(errors=1)
                log.exception("failed to store a valid message from %s; it is lost unless the device re-sends it", decoded[0][0])
                return False
            log.warning("storing a batch of %d messages failed; storing them one by one", len(decoded), exc_info=True)
        stored_any = False
        for item in decoded:  # one transaction each: a message the database refuses costs only itself
            try:
                self._store([item])
                stored_any = True
            except Exception:
                self._count(errors=1)
                log.exception("failed to store a valid message from %s; it is lost unless the device re-sends it", item[0])
        return stored_any

    def _store(self, decoded: list[tuple[str, Any]]) -> None:
        """Store decoded messages in one transaction, then run what each needs after the commit (counters,
        re-sending a desired state, scheduling a drift judgement)."""
        after: list[Callable[[], None]] = []
        with self.db.session() as session:
            # the batch's known devices in one query: each message's ensure_device() then finds its device in the
            # session's identity map instead of reading it
            ids = {msg.device_id for _t, msg in decoded}
            known = list(session.scalars(select(Device).where(Device.id.in_(ids))))  # held: the identity map is weak
            for _topic, msg in decoded:
                if isinstance(msg, DeviceState):
                    after.append(self._on_state(session, msg))
                else:
                    after.append(self._on_records(session, msg))
            session.commit()
            del known
        for fn in after:
            try:
                fn()
            except Exception:
                log.exception("after storing a message")

    # -- state -----------------------------------------------------------------------------------

    def _on_state(self, session: Session, msg: DeviceState) -> Callable[[], None]:
        now = utcnow()
        tags = [t.strip() for t in msg.tags if isinstance(t, str) and t.strip() and len(t) <= TAG_MAX]
        device, created = ensure_device(session, msg.device_id, tags)  # tags apply on first registration only
        if _older_state(device, msg, now):
            return lambda: self._count(stale_states=1)
        if msg.status != "offline" and msg.ts > 0:
            device.last_state_ts = msg.ts
        device.status = msg.status
        device.model = msg.model
        device.version = msg.version
        device.reported_generation = msg.generation
        if msg.last_update is not None:
            device.last_update = msg.last_update.model_dump(mode="json")
        if msg.agent_version:
            device.agent_version = msg.agent_version
        if msg.hardware is not None:
            device.hardware = msg.hardware.model_dump(mode="json")
        if msg.api_url is not None:
            device.api_url = msg.api_url
        device.hosted = [h.model_dump(mode="json") for h in msg.hosted] or None  # placed models (control.placements)
        device.last_state_at = now
        if msg.status != "offline":  # an offline state is the broker speaking (last will), not the device
            device.last_seen = now

        peer_tags = list(device.tags or [])

        def after() -> None:
            self._count(states=1)
            peer_directory.record(msg, tags=peer_tags)  # who serves which bundles to nearby devices (control.peers)
            if created:
                log.info("device %s registered itself (tags: %s)", device.id, ", ".join(device.tags) or "none")
            if self._lacks_desired(device, msg):
                self._republish(device, force=created)

        return after

    @staticmethod
    def _lacks_desired(device: Device, msg: DeviceState) -> bool:
        if not device.desired_generation or msg.status in ("offline", "updating"):
            return False
        return msg.generation is None or msg.generation < device.desired_generation

    def _republish(self, device: Device, *, force: bool = False) -> None:
        """Re-send a desired state, at most once per interval per device: a device stuck on an
        older generation (e.g. its update failed) must not turn every state report into a publish."""
        if self.publisher is None:
            return
        now = time.monotonic()
        last = self._last_republish.get(device.id)
        if not force and last is not None and now - last < self.republish_interval_s:
            return
        self._last_republish[device.id] = now
        if publish_desired(self.publisher, device):
            self._count(republished=1)
            log.info("re-sent desired generation %d to %s (it reports %s)", device.desired_generation, device.id,
                     device.reported_generation)

    # -- telemetry and events --------------------------------------------------------------------

    def _on_records(self, session: Session, msg: Batch | Telemetry | Event | Summary | Sample) -> Callable[[], None]:
        records = msg.items if isinstance(msg, Batch) else [msg]
        device, _ = ensure_device(session, msg.device_id)
        now = utcnow()
        offset = update_clock_offset(device, records, now)
        stored_t = stored_e = stored_s = dupes = 0
        sketched: set[tuple[str, str]] = set()
        stored_x = stored_f = 0
        for rec in records:
            if getattr(rec, "type", None) == "fl_update":  # a federated-learning update (control.fl): checked, stored once
                from .fl import receive_update

                stored_f += receive_update(session, rec, now)
                continue
            if isinstance(rec, Sample):  # captured inputs: their own table, nothing for drift sketches
                try:
                    values = sample_values(rec, now)
                except ValueError as exc:  # bytes that do not fit dtype/shape: refuse this one, keep the rest
                    self._reject(topics.telemetry(msg.device_id, "samples"), "bad_sample", exc)
                    continue
                values["corrected_ts"] = rec.ts + offset if offset is not None else None
                if insert_ignore(session, SampleRow.__table__, values):
                    stored_x += 1
                else:
                    dupes += 1
                continue
            if isinstance(rec, Telemetry):
                table, values = TelemetryRow.__table__, _telemetry_values(rec, now)
            elif isinstance(rec, Summary):
                table, values = SummaryRow.__table__, _summary_values(rec, now)
            else:
                table, values = EventRow.__table__, _event_values(rec, now)
            values["corrected_ts"] = rec.ts + offset if offset is not None else None
            if insert_ignore(session, table, values):
                sketched |= self.drift.add(session, rec, values["corrected_ts"], now)  # new records only: no double counts
                if table is TelemetryRow.__table__:
                    stored_t += 1
                elif table is SummaryRow.__table__:
                    stored_s += 1
                else:
                    stored_e += 1
                    if rec.kind.startswith("alert."):  # a device-raised alert (issue 7): opened with its event, once
                        raise_from_event(session, rec, now)
            else:
                dupes += 1
        device.last_seen = now

        def after() -> None:
            self._count(telemetry_rows=stored_t, event_rows=stored_e, summary_rows=stored_s, sample_rows=stored_x, duplicates=dupes)
            self.drift.after_commit(session, sketched, now)
            if dupes:
                log.debug("%s: %d duplicate record(s) dropped", msg.device_id, dupes)

        return after


STATE_REORDER_WINDOW_S = 120.0


def _older_state(device: Device, msg: DeviceState, now: Any) -> bool:
    """True for a state older (by the device's clock) than the one applied moments ago: with several ingest workers
    sharing the stream, a device's states can be committed out of order, and the older one must not win.

    Only within ``STATE_REORDER_WINDOW_S`` of server time (a device whose clock was set back is believed again
    after that), and never for ``offline`` (the broker's last will carries the time of the connect, not of the loss)."""
    if msg.status == "offline" or msg.ts <= 0 or device.last_state_ts is None or msg.ts >= device.last_state_ts:
        return False
    at = device.last_state_at
    return at is not None and (now - at).total_seconds() < STATE_REORDER_WINDOW_S


def update_clock_offset(device: Device, records: list[Any], now: Any) -> float | None:
    """Update and return the device's clock offset estimate (server clock − device clock, seconds).

    For every record, ``received_at − ts = offset + delay`` where the delay (outbox wait,
    transit, broker) is never negative, so each record gives an upper bound on the offset
    and the smallest one seen (the record delivered most promptly) is the best estimate.
    The estimate keeps the minimum over about ``CLOCK_WINDOW_S`` of server time: a lower
    observation replaces it at once (a device whose clock was set forward), and once the
    window has passed the next message's minimum replaces it whatever its value (a clock
    set back), so an old estimate does not stick forever.
    """
    if not records:
        return device.clock_offset_s
    received = now.timestamp()
    obs = min(received - r.ts for r in records)
    current, at = device.clock_offset_s, device.clock_offset_at
    if current is None or at is None or obs < current or (now - at).total_seconds() > CLOCK_WINDOW_S:
        device.clock_offset_s = round(obs, 3)
        device.clock_offset_at = now
    return device.clock_offset_s


def _summary_values(s: Summary, now: Any) -> dict[str, Any]:
    return {
        "device_id": s.device_id,
        "seq": s.seq,
        "ts": s.ts,
        "received_at": now,
        "model": s.model,
        "version": s.version,
        "window_s": s.window_s,
        "inferences": s.inferences,
        "errors": s.errors,
        "predictions": s.predictions,
        "latency_p50_ms": s.latency_p50_ms,
        "latency_p95_ms": s.latency_p95_ms,
        "latency_p99_ms": s.latency_p99_ms,
        "classes": s.classes,
        "confidence_bins": s.confidence_bins,
        "confidence_hist": s.confidence_hist,
        **_health_values(s),
    }


def _telemetry_values(t: Telemetry, now: Any) -> dict[str, Any]:
    return {
        "device_id": t.device_id,
        "seq": t.seq,
        "ts": t.ts,
        "received_at": now,
        "model": t.model,
        "version": t.version,
        "uptime_s": t.uptime_s,
        "inferences": t.inferences,
        "errors": t.errors,
        "window_inferences": t.window_inferences,
        "window_s": t.window_s,
        "latency_p50_ms": t.latency_p50_ms,
        "latency_p95_ms": t.latency_p95_ms,
        "cpu_percent": t.cpu_percent,
        "rss_bytes": t.rss_bytes,
        "mem_percent": t.mem_percent,
        "outbox_pending": t.outbox_pending,
        "dropped": t.dropped,
        **_health_values(t),
    }


def _health_values(m: Telemetry | Summary) -> dict[str, Any]:
    """Model-health figures both record kinds carry (issue 7: rollout gates, alerts, series)."""
    sh = m.shadow
    return {
        "drift_score": m.drift_score,
        "temperature_c": m.temperature_c,
        "shadow_version": sh.version[:128] if sh is not None else None,
        "shadow_compared": sh.compared if sh is not None else None,
        "shadow_agreed": sh.agreed if sh is not None else None,
        "shadow_errors": sh.errors if sh is not None else None,
        "shadow_latency_p95_ms": sh.latency_p95_ms if sh is not None else None,
        "shadow_committed_latency_p95_ms": sh.committed_latency_p95_ms if sh is not None else None,
    }


def _event_values(e: Event, now: Any) -> dict[str, Any]:
    return {
        "device_id": e.device_id,
        "seq": e.seq,
        "ts": e.ts,
        "received_at": now,
        "kind": e.kind[:64],
        "severity": e.severity,
        "message": e.message,
        "detail": e.detail,
    }
