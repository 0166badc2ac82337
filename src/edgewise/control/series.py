"""Health series of a device and of the fleet: per-minute rollups, retention, and the queries behind the charts.

Raw telemetry and summaries are what devices sent, one row each; they are kept ``raw_retention``
(default a day). :func:`roll_up` folds every new raw row into one :class:`~.models.SeriesMinute`
row per device and minute, kept ``rollup_retention`` (default 30 days). A rollup row holds sums,
counts and maxima (never averages), so a record that arrives late — an outbox emptied after a day
offline — merges into its minute without re-reading anything, and minutes merge into coarser
steps exactly the same way. Percentiles cannot be merged exactly: a minute's p95 latency is the mean
of the p95s reported in it (``latency_p95_max_ms`` keeps the worst).

``roll_up`` reads each raw table past a cursor (the highest row id it folded, stored in
``monitor_cursors``), so each record is counted once whatever the order it arrives in; it runs on
the monitor's thread (``alerts.MonitorEngine``), never on ingest's. :func:`prune` deletes raw rows
only once they are rolled up. The link state (online/offline, from the device's status) is sampled
by :func:`sample_link_state` once a minute, since no record arrives from a device that is offline.

Series are ``{metric: [[t, value], ...]}`` with ``t`` in epoch seconds (the start of the step for
rolled-up steps); histograms (``confidence_hist``, ``classes``) have a list or a dict as value.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import BigInteger, String, Table, column, delete, func, select, values
from sqlalchemy.orm import Session

from .errors import InvalidRequestError
from .models import Device, MonitorCursor, SeriesMinute, SummaryRow, TelemetryRow
from .timeutil import utcnow

log = logging.getLogger(__name__)

MINUTE = 60
ROLLUP_BATCH = 5000  # raw rows read per query; roll_up loops until it caught up
RAW_POINTS_MAX = 20_000
BUCKETS_MAX = 20_000

# name -> what it is (the API lists these when a name is unknown)
METRICS: dict[str, str] = {
    "inference_rate": "predictions served per second (fleet: summed over devices)",
    "latency_p50_ms": "median latency, ms (mean of the reported p50s)",
    "latency_p95_ms": "95th percentile latency, ms (mean of the reported p95s)",
    "latency_p95_max_ms": "the worst reported p95 latency, ms",
    "error_rate": "failed predictions / all predictions",
    "inferences": "predictions served in the step",
    "errors": "predictions failed in the step",
    "confidence_hist": "top-1 confidence histogram (counts on the protocol's confidence bins; summary mode)",
    "classes": "predicted top-1 class counts (summary mode)",
    "drift_score": "input drift score reported by the device (mean)",
    "drift_score_max": "input drift score reported by the device (max)",
    "cpu_percent": "agent CPU use, percent (mean)",
    "mem_percent": "device memory use, percent (mean)",
    "rss_bytes": "agent resident memory, bytes (max)",
    "temperature_c": "SoC temperature, Celsius (mean), where the device exposes one",
    "outbox_depth": "records waiting in the device outbox (max; fleet: summed over devices)",
    "dropped": "records the outbox dropped since the agent started (max; fleet: summed over devices)",
    "link_state": "1 online, 0 offline, sampled each minute from the device status (fleet: the online fraction)",
    "devices_online": "devices online (sampled each minute; fleet series)",
    "devices_reporting": "devices that sent telemetry or summaries in the step",
    "shadow_agreement": "shadow-mode agreement: agreed / compared",
}

_ADD = ("records", "inferences", "errors", "window_s", "latency_n", "latency_p50_sum", "latency_p95_sum", "cpu_n",
        "cpu_sum", "mem_n", "mem_sum", "temperature_n", "temperature_sum", "drift_n", "drift_sum", "shadow_compared",
        "shadow_agreed")
_MAX = ("latency_p95_max", "rss_max", "temperature_max", "drift_max", "outbox_max", "dropped_max")


def minute_of(ts: float) -> int:
    return int(math.floor(ts / MINUTE) * MINUTE)


def _max(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class Sums:
    """Additive health figures of one device (or the fleet) over some time: a minute, a step."""

    records: int = 0
    inferences: int = 0
    errors: int = 0
    window_s: float = 0.0
    latency_n: int = 0
    latency_p50_sum: float = 0.0
    latency_p95_sum: float = 0.0
    cpu_n: int = 0
    cpu_sum: float = 0.0
    mem_n: int = 0
    mem_sum: float = 0.0
    temperature_n: int = 0
    temperature_sum: float = 0.0
    drift_n: int = 0
    drift_sum: float = 0.0
    shadow_compared: int = 0
    shadow_agreed: int = 0
    latency_p95_max: float | None = None
    rss_max: int | None = None
    temperature_max: float | None = None
    drift_max: float | None = None
    outbox_max: int | None = None
    dropped_max: int | None = None
    online_n: int = 0
    online_sum: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    confidence_hist: list[int] = field(default_factory=list)

    # -- adding raw records and other sums -------------------------------------------------------

    def add_raw(self, row: Any, *, telemetry: bool, errors: int) -> None:
        """Add one raw telemetry or summary row; ``errors`` is the failed predictions of its window
        (a summary says so; for telemetry, the growth of its cumulative counter since the previous sample)."""
        self.records += 1
        self.errors += errors
        self.inferences += row.window_inferences if telemetry else row.inferences
        self.window_s += row.window_s or 0.0
        if row.latency_p95_ms is not None:
            self.latency_n += 1
            self.latency_p50_sum += row.latency_p50_ms if row.latency_p50_ms is not None else row.latency_p95_ms
            self.latency_p95_sum += row.latency_p95_ms
            self.latency_p95_max = _max(self.latency_p95_max, row.latency_p95_ms)
        if telemetry:
            if row.cpu_percent is not None:
                self.cpu_n, self.cpu_sum = self.cpu_n + 1, self.cpu_sum + row.cpu_percent
            if row.mem_percent is not None:
                self.mem_n, self.mem_sum = self.mem_n + 1, self.mem_sum + row.mem_percent
            self.rss_max = _max(self.rss_max, row.rss_bytes)
            self.outbox_max = _max(self.outbox_max, row.outbox_pending)
            self.dropped_max = _max(self.dropped_max, row.dropped)
        else:
            self._add_hist(row.classes or {}, row.confidence_hist or [])
        if row.temperature_c is not None:
            self.temperature_n, self.temperature_sum = self.temperature_n + 1, self.temperature_sum + row.temperature_c
            self.temperature_max = _max(self.temperature_max, row.temperature_c)
        if row.drift_score is not None:
            self.drift_n, self.drift_sum = self.drift_n + 1, self.drift_sum + row.drift_score
            self.drift_max = _max(self.drift_max, row.drift_score)
        if row.shadow_compared:
            self.shadow_compared += row.shadow_compared
            self.shadow_agreed += row.shadow_agreed or 0

    def add(self, other: Any) -> None:
        """Add another ``Sums`` or a rollup row (an ORM row or a plain result row, histograms optional)."""
        for name in _ADD:
            setattr(self, name, getattr(self, name) + (getattr(other, name) or 0))
        for name in _MAX:
            setattr(self, name, _max(getattr(self, name), getattr(other, name)))
        if isinstance(other, Sums):
            self.online_n += other.online_n
            self.online_sum += other.online_sum
        elif other.online is not None:
            self.online_n += 1
            self.online_sum += other.online
        self._add_hist(getattr(other, "classes", None) or {}, getattr(other, "confidence_hist", None) or [])

    def _add_hist(self, classes: dict[str, int], hist: list[int]) -> None:
        for k, n in classes.items():
            self.classes[str(k)] = self.classes.get(str(k), 0) + int(n)
        if hist:
            if len(self.confidence_hist) < len(hist):
                self.confidence_hist += [0] * (len(hist) - len(self.confidence_hist))
            for i, n in enumerate(hist):
                self.confidence_hist[i] += int(n)

    def store(self, row: SeriesMinute) -> None:
        """Add these sums into a rollup row (its ``online`` is the link sampler's, left alone)."""
        for name in _ADD:
            setattr(row, name, (getattr(row, name) or 0) + getattr(self, name))
        for name in _MAX:
            setattr(row, name, _max(getattr(row, name), getattr(self, name)))
        merged = Sums(classes=dict(row.classes or {}), confidence_hist=list(row.confidence_hist or []))
        merged._add_hist(self.classes, self.confidence_hist)
        row.classes, row.confidence_hist = merged.classes, merged.confidence_hist

    # -- reading figures back --------------------------------------------------------------------

    def value(self, metric: str) -> Any:
        """The figure for one device (None: nothing reported it)."""
        if metric == "inference_rate":
            return round(self.inferences / self.window_s, 6) if self.window_s > 0 else None
        if metric == "error_rate":
            total = self.inferences + self.errors
            return round(self.errors / total, 6) if total else None
        if metric in ("latency_p50_ms", "latency_p95_ms"):
            s = self.latency_p50_sum if metric == "latency_p50_ms" else self.latency_p95_sum
            return round(s / self.latency_n, 4) if self.latency_n else None
        if metric == "link_state" or metric == "devices_online":
            return round(self.online_sum / self.online_n, 4) if self.online_n else None
        if metric == "devices_reporting":
            return 1 if self.records else None
        return _simple(self, metric)


def _simple(s: Sums, metric: str) -> Any:
    def mean(total: float, n: int) -> float | None:
        return round(total / n, 4) if n else None

    match metric:
        case "latency_p95_max_ms":
            return s.latency_p95_max
        case "inferences":
            return s.inferences if s.records else None
        case "errors":
            return s.errors if s.records else None
        case "confidence_hist":
            return s.confidence_hist or None
        case "classes":
            return s.classes or None
        case "drift_score":
            return mean(s.drift_sum, s.drift_n)
        case "drift_score_max":
            return s.drift_max
        case "cpu_percent":
            return mean(s.cpu_sum, s.cpu_n)
        case "mem_percent":
            return mean(s.mem_sum, s.mem_n)
        case "rss_bytes":
            return s.rss_max
        case "temperature_c":
            return mean(s.temperature_sum, s.temperature_n)
        case "outbox_depth":
            return s.outbox_max
        case "dropped":
            return s.dropped_max
        case "shadow_agreement":
            return round(s.shadow_agreed / s.shadow_compared, 6) if s.shadow_compared else None
    raise KeyError(metric)


def fleet_value(per_device: dict[str, Sums], metric: str, total: Sums | None = None) -> Any:
    """One step's figure over several devices: rates, depths and counts add up; latencies and
    percentages are means weighted by the samples behind them; link state is the online fraction."""
    if metric == "inference_rate":
        rates = [v for s in per_device.values() if (v := s.value("inference_rate")) is not None]
        return round(sum(rates), 6) if rates else None
    if metric == "devices_reporting":
        return sum(1 for s in per_device.values() if s.records)
    if metric in ("link_state", "devices_online"):
        states = [v for s in per_device.values() if (v := s.value("link_state")) is not None]
        if not states:
            return None
        return round(sum(states) / len(states), 4) if metric == "link_state" else round(sum(states), 4)
    if metric in ("outbox_depth", "dropped"):
        vals = [v for s in per_device.values() if (v := s.value(metric)) is not None]
        return sum(vals) if vals else None
    if total is None:
        total = fleet_total(per_device)
    return total.value(metric)


def fleet_total(per_device: dict[str, Sums]) -> Sums:
    total = Sums()
    for s in per_device.values():
        total.add(s)
    return total


def check_metrics(names: Iterable[str]) -> list[str]:
    """The requested metric names, or a 422 naming the unknown one and listing the known ones."""
    out = [n.strip() for n in names if n.strip()]
    if not out:
        raise InvalidRequestError(f"name at least one metric, e.g. metrics=latency_p95_ms,error_rate; known: {', '.join(METRICS)}")
    for n in out:
        if n not in METRICS:
            raise InvalidRequestError(f"unknown metric {n!r}; known: {', '.join(METRICS)}")
    return out


# -- rolling up -----------------------------------------------------------------------------------


def _cursor(session: Session, name: str) -> MonitorCursor:
    row = session.get(MonitorCursor, name)
    if row is None:
        row = MonitorCursor(name=name, last_id=0)
        session.add(row)
    return row


CHUNK = 500  # devices per statement (bound parameters stay far below SQLite's limit)


def prev_errors(session: Session, firsts: dict[str, int]) -> dict[str, int]:
    """For each device, the cumulative error counter of its telemetry sample just before seq ``firsts[device]``
    (devices without one are left out). One statement per chunk of devices: an index seek each, inside the
    database, not one round trip per device."""
    out: dict[str, int] = {}
    items = list(firsts.items())
    for i in range(0, len(items), CHUNK):
        v = values(column("device_id", String(64)), column("first_seq", BigInteger), name="firsts").data(
            items[i:i + CHUNK]).cte("firsts")  # WITH firsts(device_id, first_seq) AS (VALUES ...): SQLite and PostgreSQL
        prev = (select(TelemetryRow.errors).where(TelemetryRow.device_id == v.c.device_id, TelemetryRow.seq < v.c.first_seq)
                .order_by(TelemetryRow.seq.desc()).limit(1).correlate(v).scalar_subquery())
        out.update({d: e for d, e in session.execute(select(v.c.device_id, prev)).all() if e is not None})
    return out


def error_deltas(rows: list[Any], prev: int | None) -> list[int]:
    """Failed predictions in each telemetry row's window: telemetry carries the agent's cumulative
    counter, so this is its growth since the device's previous sample ``prev`` (the whole counter
    after a restart reset it). ``rows`` are of one device, in seq order."""
    out: list[int] = []
    for r in rows:
        out.append(r.errors if prev is None or r.errors < prev else r.errors - prev)
        prev = r.errors
    return out


def _roll_table(session: Session, table: Table, name: str, telemetry: bool) -> int:
    cur = _cursor(session, name)
    top = session.scalar(select(func.max(table.c.id)))
    if top is None:
        return 0
    if top < cur.last_id:  # every row past the cursor was pruned and ids started again: all present rows are new
        log.info("%s ids restarted below the rollup cursor (%d < %d); rolling up from the start", name, top, cur.last_id)
        cur.last_id = 0
    rows = session.execute(select(table).where(table.c.id > cur.last_id).order_by(table.c.id).limit(ROLLUP_BATCH)).all()
    if not rows:
        return 0
    acc: dict[tuple[str, int], Sums] = defaultdict(Sums)
    by_device: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by_device[r.device_id].append(r)
    for device_rows in by_device.values():
        device_rows.sort(key=lambda r: r.seq)
    before = prev_errors(session, {d: rs[0].seq for d, rs in by_device.items()}) if telemetry else {}
    for dev, device_rows in by_device.items():
        errs = error_deltas(device_rows, before.get(dev)) if telemetry else [r.errors for r in device_rows]
        for r, e in zip(device_rows, errs):
            ts = r.corrected_ts if r.corrected_ts is not None else r.ts
            acc[(r.device_id, minute_of(ts))].add_raw(r, telemetry=telemetry, errors=e)
    _store(session, acc)
    cur.last_id = rows[-1].id
    cur.updated_at = utcnow()
    return len(rows)


def _new_minute(session: Session, device_id: str, minute: int) -> SeriesMinute:
    row = SeriesMinute(device_id=device_id, minute=minute, classes={}, confidence_hist=[], **dict.fromkeys(_ADD, 0))
    session.add(row)
    return row


def _store(session: Session, acc: dict[tuple[str, int], Sums]) -> None:
    devices = sorted({dev for dev, _ in acc})
    lo, hi = min(m for _, m in acc), max(m for _, m in acc)
    existing: dict[tuple[str, int], SeriesMinute] = {}
    for i in range(0, len(devices), CHUNK):  # one query per chunk of devices (may fetch a few rows it does not need)
        for row in session.scalars(select(SeriesMinute).where(SeriesMinute.device_id.in_(devices[i:i + CHUNK]),
                                                              SeriesMinute.minute >= lo, SeriesMinute.minute <= hi)):
            existing[(row.device_id, row.minute)] = row
    for (dev, minute), sums in acc.items():
        row = existing.get((dev, minute))
        if row is None:
            row = _new_minute(session, dev, minute)
        sums.store(row)


def roll_up(session: Session, *, max_batches: int | None = None) -> int:
    """Fold every raw telemetry and summary row not rolled up yet into the per-minute rollups.
    Returns how many raw rows it read. Commits after each batch (so a crash loses no progress);
    ``max_batches`` (per table) bounds one call, so a long backlog is caught up over several ticks."""
    total = 0
    for table, name, telemetry in ((TelemetryRow.__table__, "telemetry", True), (SummaryRow.__table__, "summaries", False)):
        batches = 0
        while True:
            n = _roll_table(session, table, name, telemetry)  # type: ignore[arg-type]
            session.commit()
            total += n
            batches += 1
            if n < ROLLUP_BATCH or (max_batches is not None and batches >= max_batches):
                break
    return total


def sample_link_state(session: Session, now: datetime) -> int:
    """Record each device's link state (1 online, 0 offline) in the rollup of the current minute.

    Online means the device's last status is not ``offline`` (the broker publishes that as its last
    will); a device never heard from is not sampled. Returns how many devices were sampled. Commits.
    """
    minute = minute_of(now.timestamp())
    devices = session.execute(select(Device.id, Device.status).where(Device.status != "registered")).all()
    existing = {r.device_id: r for r in session.scalars(select(SeriesMinute).where(SeriesMinute.minute == minute))}
    for dev, status in devices:
        row = existing.get(dev)
        if row is None:
            row = _new_minute(session, dev, minute)
        online = 0 if status == "offline" else 1
        row.online = online if row.online is None else min(row.online, online)  # offline at any sample wins
    session.commit()
    return len(devices)


PRUNE_BATCH = 5000


def _prune_raw(session: Session, table: Table, cut: datetime, upto: int) -> int:
    """Delete the oldest rows (by id, i.e. arrival) received before ``cut`` and already rolled up
    (``id <= upto``), a batch per transaction: walks the primary key from the start instead of scanning
    the table for ``received_at``, and never holds SQLite's write lock long enough to stall ingest."""
    total = 0
    while True:
        rows = session.execute(select(table.c.id, table.c.received_at).where(table.c.id <= upto)
                               .order_by(table.c.id).limit(PRUNE_BATCH)).all()
        old = [r.id for r in rows if r.received_at < cut]
        if old:
            res = session.execute(delete(table).where(table.c.id >= old[0], table.c.id <= old[-1], table.c.received_at < cut))
            session.commit()
            total += int(res.rowcount or 0)  # type: ignore[attr-defined]
        if len(old) < len(rows) or len(rows) < PRUNE_BATCH:
            return total


@dataclass(frozen=True)
class Pruned:
    telemetry: int
    summaries: int
    rollups: int


def prune(session: Session, now: datetime, *, raw_retention: timedelta, rollup_retention: timedelta) -> Pruned:
    """Delete raw rows received before ``now - raw_retention`` (only those already rolled up) and
    rollups of minutes before ``now - rollup_retention``. Commits."""
    raw_cut = now - raw_retention
    counts = []
    for table, name in ((TelemetryRow.__table__, "telemetry"), (SummaryRow.__table__, "summaries")):
        cur = session.get(MonitorCursor, name)
        counts.append(_prune_raw(session, table, raw_cut, cur.last_id if cur is not None else 0))  # type: ignore[arg-type]
    cut = minute_of((now - rollup_retention).timestamp())
    res = session.execute(delete(SeriesMinute).where(SeriesMinute.minute < cut))
    session.commit()
    return Pruned(counts[0], counts[1], int(res.rowcount or 0))  # type: ignore[attr-defined]


# -- queries --------------------------------------------------------------------------------------


def _check_step(step: int, since: float, until: float) -> None:
    if step < MINUTE or step % MINUTE:
        raise InvalidRequestError(f"step {step}: use 'raw' or a whole number of minutes in seconds (60, 300, 3600, ...)")
    if until <= since:
        raise InvalidRequestError(f"until ({until}) must be after since ({since})")
    if (until - since) / step > BUCKETS_MAX:
        raise InvalidRequestError(f"{(until - since) / step:.0f} steps asked; ask at most {BUCKETS_MAX} (a larger step or a "
                                  "shorter range)")


HIST_METRICS = frozenset({"classes", "confidence_hist"})


def step_buckets(session: Session, device_ids: list[str] | None, since: float, until: float, step: int,
                 metrics: Iterable[str] | None = None) -> dict[int, dict[str, Sums]]:
    """Rollups in [since, until) added up per step-aligned bucket and device. Plain rows, not ORM objects,
    and the JSON histograms only when ``metrics`` asks for them (None: always)."""
    t = SeriesMinute.__table__
    hist = metrics is None or bool(HIST_METRICS & set(metrics))
    cols = [c for c in t.c if hist or c.name not in HIST_METRICS]
    q = select(*cols).where(t.c.minute >= minute_of(since), t.c.minute < until)
    out: dict[int, dict[str, Sums]] = defaultdict(lambda: defaultdict(Sums))
    chunks = [None] if device_ids is None else [device_ids[i:i + CHUNK] for i in range(0, len(device_ids), CHUNK)]
    for chunk in chunks:
        qc = q if chunk is None else q.where(t.c.device_id.in_(chunk))
        for row in session.execute(qc):
            out[row.minute - row.minute % step][row.device_id].add(row)
    return out




def device_series(session: Session, device_id: str, metrics: list[str], *, since: float, until: float,
                  step: int | None) -> dict[str, list[list[Any]]]:
    """One device's series: ``step=None`` gives every raw record (kept ``raw_retention``), else
    rollups added up per ``step`` seconds."""
    if step is None:
        return _raw_series(session, device_id, metrics, since, until)
    _check_step(step, since, until)
    buckets = step_buckets(session, [device_id], since, until, step, metrics)
    out: dict[str, list[list[Any]]] = {m: [] for m in metrics}
    for t in sorted(buckets):
        sums = buckets[t].get(device_id)
        if sums is None:
            continue
        for m in metrics:
            v = sums.value(m)
            if v is not None:
                out[m].append([t, v])
    return out


def fleet_series(session: Session, device_ids: list[str] | None, metrics: list[str], *, since: float, until: float,
                 step: int) -> dict[str, list[list[Any]]]:
    """Series over several devices (None: the whole fleet) per ``step`` seconds (see :func:`fleet_value`)."""
    _check_step(step, since, until)
    buckets = step_buckets(session, device_ids, since, until, step, metrics)
    out: dict[str, list[list[Any]]] = {m: [] for m in metrics}
    for t in sorted(buckets):
        total = fleet_total(buckets[t])
        for m in metrics:
            v = fleet_value(buckets[t], m, total)
            if v is not None:
                out[m].append([t, v])
    return out


def _raw_series(session: Session, device_id: str, metrics: list[str], since: float, until: float) -> dict[str, list[list[Any]]]:
    points: list[tuple[float, Sums]] = []
    for table, telemetry in ((TelemetryRow.__table__, True), (SummaryRow.__table__, False)):
        ts = func.coalesce(table.c.corrected_ts, table.c.ts)
        rows = session.execute(select(table).where(table.c.device_id == device_id, ts >= since, ts < until)
                               .order_by(table.c.seq).limit(RAW_POINTS_MAX)).all()
        if telemetry and rows:
            errs = error_deltas(list(rows), prev_errors(session, {device_id: rows[0].seq}).get(device_id))
        else:
            errs = [r.errors for r in rows]
        for r, e in zip(rows, errs):
            s = Sums()
            s.add_raw(r, telemetry=telemetry, errors=e)
            points.append((r.corrected_ts if r.corrected_ts is not None else r.ts, s))
    for row in session.scalars(select(SeriesMinute).where(SeriesMinute.device_id == device_id,
                                                          SeriesMinute.minute >= minute_of(since),
                                                          SeriesMinute.minute < until, SeriesMinute.online.is_not(None))):
        points.append((float(row.minute), Sums(online_n=1, online_sum=row.online or 0)))
    points.sort(key=lambda p: p[0])
    out: dict[str, list[list[Any]]] = {m: [] for m in metrics}
    for t, s in points:
        for m in metrics:
            v = s.value(m)
            if v is not None:
                out[m].append([round(t, 3), v])
    return out


def online_fraction_now(devices: list[Device]) -> float | None:
    """The fraction of ``devices`` online now (ignoring those never heard from); None if none counts."""
    known = [d for d in devices if d.status != "registered"]
    if not known:
        return None
    return sum(1 for d in known if d.status != "offline") / len(known)
