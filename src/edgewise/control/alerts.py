"""Alerting: rules, alert states, de-duplication, webhook notification, and the monitor loop.

An alert is **firing** when its condition starts, may be **acknowledged** by an operator (it stays
open: someone is on it), and is **resolved** when the condition stops. At most one alert is open
per (rule, subject) — or per (kind, subject) for alerts without a rule (drift, device-raised) — so a
condition that persists raises one alert, not one per check. A condition that comes back after
being resolved opens a new alert.

Rules (:class:`RuleIn`, table ``alert_rules``):

* ``threshold``: ``metric op threshold`` on each device in scope (its latest report), held for
  ``for_s`` seconds before firing (``latency_p95_ms > 50`` for 300 s);
* ``fleet_offline``: the fraction of the scope's devices that are offline ``op threshold`` held for
  ``for_s`` (more than 5 % of group ``canary`` offline for 10 min);
* ``absence``: a device in scope not heard from (state, telemetry or event) for ``for_s`` seconds.

Scope: ``device_id``, else ``group`` (``control.groups.resolve``, evaluated at each check so a
device joining the group later is covered; a tag of that name while the groups module is absent),
else ``tag``, else the whole fleet.

The "held for" clock (Prometheus' ``for``) lives in memory: a control-plane restart restarts it,
delaying a firing by at most one ``for_s``; alerts themselves are in the database.

Devices raise alerts themselves: an :class:`~edgewise.protocol.Event` whose kind starts with
``alert.`` and whose severity is warning or worse becomes an alert (subject ``device:<id>``) when
ingest stores it — once, since ingest stores a redelivered event once; the same kind with severity
info/debug, or ``detail.resolved = true``, resolves it.

Notification: every status change of every alert (rules, drift, devices) is logged and POSTed as
JSON to the configured webhooks (``alert_webhooks`` and the rule's own ``webhook_url``) by
:class:`Notifier`: one worker thread per URL, retries with exponential backoff, failures logged,
so a dead webhook delays only itself and never ingest or the monitor loop.
"""

from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ..protocol import Event
from . import series
from .errors import ConflictError, NotFoundError
from .models import AlertRow, AlertRule, Device, SummaryRow, TelemetryRow
from .timeutil import utcnow

log = logging.getLogger(__name__)

STATUSES = ("firing", "acknowledged", "resolved")
OPEN = ("firing", "acknowledged")
DEVICE_ALERT_SEVERITIES = frozenset({"warning", "error", "critical"})
RuleKind = Literal["threshold", "fleet_offline", "absence"]
OPS: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
THRESHOLD_METRICS = ("latency_p50_ms", "latency_p95_ms", "error_rate", "inference_rate", "cpu_percent", "mem_percent",
                     "rss_bytes", "temperature_c", "drift_score", "outbox_depth", "dropped", "shadow_agreement")
MAX_FOR_S = 30 * 86400.0
ROLLUP_BATCHES_PER_TICK = 20  # 100,000 raw rows per table per tick at most: a backlog never starves the rule checks


class AlertNotFoundError(NotFoundError):
    pass


class RuleNotFoundError(NotFoundError):
    pass


# -- rules ----------------------------------------------------------------------------------------


class RuleIn(BaseModel):
    """An alert rule as an operator writes it (POST/PUT /api/v1/alert-rules)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    kind: RuleKind
    metric: str | None = Field(default=None, description=f"threshold rules: one of {', '.join(THRESHOLD_METRICS)}")
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float | None = Field(default=None, description="threshold: the limit; fleet_offline: the offline fraction (0..1)")
    for_s: float = Field(default=0.0, ge=0.0, le=MAX_FOR_S, description="held this long before firing; absence: silence this long")
    device_id: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64)
    tag: str | None = Field(default=None, max_length=64)
    severity: Literal["info", "warning", "error", "critical"] = "warning"
    enabled: bool = True
    webhook_url: str | None = Field(default=None, max_length=1024)
    description: str = Field(default="", max_length=2000)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url {v!r}: give an http:// or https:// URL")
        return v or None

    @model_validator(mode="after")
    def _consistent(self) -> "RuleIn":
        if sum(x is not None for x in (self.device_id, self.group, self.tag)) > 1:
            raise ValueError("scope a rule by at most one of device_id, group or tag (none: the whole fleet)")
        if self.kind == "threshold":
            if self.metric not in THRESHOLD_METRICS:
                raise ValueError(f"threshold rule: metric {self.metric!r} is not one of {', '.join(THRESHOLD_METRICS)}")
            if self.threshold is None:
                raise ValueError("threshold rule: give threshold, e.g. 50 for latency_p95_ms > 50")
        elif self.kind == "fleet_offline":
            if self.threshold is None or not 0.0 <= self.threshold <= 1.0:
                raise ValueError("fleet_offline rule: give threshold as the offline fraction, 0..1 (0.05 = 5 %)")
            if self.device_id is not None:
                raise ValueError("fleet_offline rule: scope it by group or tag (or nothing: the whole fleet), not a device")
        elif self.kind == "absence":
            if self.for_s <= 0:
                raise ValueError("absence rule: give for_s, the silence in seconds that counts as absent (e.g. 600)")
        if self.kind != "threshold" and self.metric is not None:
            raise ValueError(f"{self.kind} rule: metric is for threshold rules only; leave it out")
        return self


class RuleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    kind: str
    metric: str | None
    op: str | None
    threshold: float | None
    for_s: float
    device_id: str | None
    group: str | None
    tag: str | None
    severity: str
    enabled: bool
    webhook_url: str | None
    description: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, r: AlertRule) -> "RuleOut":
        return cls(id=r.id, name=r.name, kind=r.kind, metric=r.metric, op=r.op, threshold=r.threshold, for_s=r.for_s,
                   device_id=r.device_id, group=r.group_name, tag=r.tag, severity=r.severity, enabled=r.enabled,
                   webhook_url=r.webhook_url, description=r.description, created_at=r.created_at, updated_at=r.updated_at)


def groups_module() -> Any:
    try:
        from . import groups  # part TARGET (issue 7); absent before it lands
    except ImportError:
        return None
    return groups if hasattr(groups, "resolve") else None


def _apply(row: AlertRule, spec: RuleIn, session: Session) -> None:
    if spec.group is not None and (groups := groups_module()) is not None and hasattr(groups, "get_group"):
        groups.get_group(session, spec.group)  # 404 naming the group if there is none
    row.name, row.kind, row.metric, row.op = spec.name, spec.kind, spec.metric, spec.op
    row.threshold, row.for_s, row.device_id, row.group_name, row.tag = (spec.threshold, spec.for_s, spec.device_id,
                                                                        spec.group, spec.tag)
    row.severity, row.enabled, row.webhook_url, row.description = spec.severity, spec.enabled, spec.webhook_url, spec.description
    row.updated_at = utcnow()


def create_rule(session: Session, spec: RuleIn) -> AlertRule:
    """A new rule; 409 if the name is taken. Commits."""
    if session.scalar(select(AlertRule).where(AlertRule.name == spec.name)) is not None:
        raise ConflictError(f"an alert rule named {spec.name!r} exists; change it with PUT /api/v1/alert-rules/{{id}}")
    row = AlertRule(created_at=utcnow())
    _apply(row, spec, session)
    session.add(row)
    session.commit()
    return row


def get_rule(session: Session, rule_id: int) -> AlertRule:
    row = session.get(AlertRule, rule_id)
    if row is None:
        raise RuleNotFoundError(f"no alert rule with id {rule_id}; list them: GET /api/v1/alert-rules")
    return row


def list_rules(session: Session) -> list[AlertRule]:
    return list(session.scalars(select(AlertRule).order_by(AlertRule.id)))


def update_rule(session: Session, rule_id: int, spec: RuleIn) -> AlertRule:
    """Replace a rule; its open alerts are resolved (the condition they were raised on changed). Commits."""
    row = get_rule(session, rule_id)
    clash = session.scalar(select(AlertRule).where(AlertRule.name == spec.name, AlertRule.id != rule_id))
    if clash is not None:
        raise ConflictError(f"another alert rule (id {clash.id}) is named {spec.name!r}; choose another name")
    _apply(row, spec, session)
    _resolve_rule_alerts(session, rule_id, "the rule was changed")
    session.commit()
    return row


def delete_rule(session: Session, rule_id: int) -> None:
    """Delete a rule and resolve its open alerts. Commits."""
    row = get_rule(session, rule_id)
    _resolve_rule_alerts(session, rule_id, "the rule was deleted")
    session.delete(row)
    session.commit()


def _resolve_rule_alerts(session: Session, rule_id: int, why: str) -> None:
    now = utcnow()
    for a in session.scalars(select(AlertRow).where(AlertRow.rule_id == rule_id, AlertRow.status.in_(OPEN))):
        resolve(a, now, why)


# -- alert states ---------------------------------------------------------------------------------


def find_open(session: Session, *, subject: str, rule_id: int | None = None, kind: str | None = None) -> AlertRow | None:
    """The open alert of (rule, subject), or of (kind, subject) for alerts raised without a rule."""
    q = select(AlertRow).where(AlertRow.subject == subject, AlertRow.status.in_(OPEN))
    q = q.where(AlertRow.rule_id == rule_id) if rule_id is not None else q.where(AlertRow.rule_id.is_(None), AlertRow.kind == kind)
    return session.scalars(q.order_by(AlertRow.id)).first()


def fire(session: Session, *, kind: str, subject: str, severity: str, message: str, detail: dict[str, Any], now: datetime,
         rule_id: int | None = None, device_id: str | None = None, model: str | None = None,
         version: str | None = None) -> tuple[AlertRow, bool]:
    """Open an alert, or refresh the one already open for the same (rule or kind, subject): (alert, created).
    The caller commits."""
    row = find_open(session, subject=subject, rule_id=rule_id, kind=kind)
    if row is not None:
        row.detail = {**detail, "repeats": int((row.detail or {}).get("repeats", 0)) + 1}
        row.updated_at = now
        return row, False
    row = AlertRow(kind=kind[:64], severity=severity, status="firing", model=model, version=version, device_id=device_id,
                   message=message, detail=detail, opened_at=now, updated_at=now, rule_id=rule_id, subject=subject[:160])
    session.add(row)
    session.flush()
    return row, True


def resolve(row: AlertRow, now: datetime, why: str | None = None) -> None:
    if row.status == "resolved":
        return
    row.status, row.resolved_at, row.updated_at = "resolved", now, now
    if why:
        row.detail = {**(row.detail or {}), "resolved_because": why}


def get_alert(session: Session, alert_id: int) -> AlertRow:
    row = session.get(AlertRow, alert_id)
    if row is None:
        raise AlertNotFoundError(f"no alert with id {alert_id}; list them: GET /api/v1/alerts")
    return row


def acknowledge(session: Session, alert_id: int, actor: str) -> AlertRow:
    """Firing → acknowledged (someone is on it; it stays open until the condition stops). Commits."""
    row = get_alert(session, alert_id)
    if row.status == "resolved":
        raise ConflictError(f"alert {alert_id} is already resolved; nothing to acknowledge")
    if row.status == "firing":
        now = utcnow()
        row.status, row.acknowledged_at, row.acknowledged_by, row.updated_at = "acknowledged", now, actor[:160], now
        session.commit()
    return row


def resolve_by_hand(session: Session, alert_id: int, actor: str) -> AlertRow:
    """Resolve an open alert by hand (a device-raised alert whose device never says it cleared). Commits."""
    row = get_alert(session, alert_id)
    if row.status == "resolved":
        raise ConflictError(f"alert {alert_id} is already resolved")
    resolve(row, utcnow(), f"resolved by {actor}")
    session.commit()
    return row


def list_alerts(session: Session, *, status: str | None = None, kind_prefix: str | None = None,
                device_id: str | None = None, rule_id: int | None = None, limit: int = 200) -> list[AlertRow]:
    """Newest first; ``status="open"`` means firing or acknowledged."""
    q = select(AlertRow)
    if status == "open":
        q = q.where(AlertRow.status.in_(OPEN))
    elif status:
        q = q.where(AlertRow.status == status)
    if kind_prefix:
        q = q.where(AlertRow.kind.startswith(kind_prefix))
    if device_id:
        q = q.where(AlertRow.device_id == device_id)
    if rule_id is not None:
        q = q.where(AlertRow.rule_id == rule_id)
    return list(session.scalars(q.order_by(AlertRow.opened_at.desc(), AlertRow.id.desc()).limit(limit)))


def raise_from_event(session: Session, ev: Event, now: datetime) -> AlertRow | None:
    """Ingest's hook for a newly stored event: ``alert.*`` at warning+ opens (or refreshes) the device's
    alert of that kind; at info/debug, or with ``detail.resolved``, resolves it. The caller commits."""
    if not ev.kind.startswith("alert."):
        return None
    subject, kind = f"device:{ev.device_id}", ev.kind[:64]
    if ev.severity in DEVICE_ALERT_SEVERITIES and not (ev.detail or {}).get("resolved"):
        device = session.get(Device, ev.device_id)
        row, created = fire(session, kind=kind, subject=subject, severity=ev.severity,
                            message=ev.message or f"{ev.device_id} raised {ev.kind}",
                            detail={**(ev.detail or {}), "source": "device", "event_seq": ev.seq, "device_ts": ev.ts},
                            now=now, device_id=ev.device_id, model=device.model if device else None,
                            version=device.version if device else None)
        if created:
            log.info("device %s raised alert %s (%s)", ev.device_id, kind, ev.severity)
        return row
    row = find_open(session, subject=subject, kind=kind)
    if row is not None:
        resolve(row, now, f"the device reported {ev.kind} cleared")
    return row


# -- evaluating rules -----------------------------------------------------------------------------


def scope_devices(session: Session, rule: AlertRule) -> list[Device]:
    """The devices a rule covers now (a group is resolved at every check: it is dynamic)."""
    if rule.device_id is not None:
        d = session.get(Device, rule.device_id)
        return [d] if d is not None else []
    if rule.group_name is not None:
        groups = groups_module()
        if groups is not None:
            return list(groups.resolve(session, rule.group_name))
        tag = rule.group_name  # before groups exist, a group name is read as a tag
    else:
        tag = rule.tag
    devices = list(session.scalars(select(Device).order_by(Device.id)))
    return [d for d in devices if tag in (d.tags or [])] if tag is not None else devices


def _scope_subject(rule: AlertRule) -> str:
    if rule.group_name is not None:
        return f"group:{rule.group_name}"
    if rule.tag is not None:
        return f"tag:{rule.tag}"
    return "fleet"


def _latest_rows(session: Session, model: Any, ids: list[str]) -> dict[str, Any]:
    """Each device's newest row of ``model`` (highest seq): an index seek per device, in one statement."""
    table = model.__table__
    newest = (select(table.c.id).where(table.c.device_id == Device.id).order_by(table.c.seq.desc()).limit(1)
              .correlate(Device).scalar_subquery())
    row_ids = [rid for _, rid in session.execute(select(Device.id, newest).where(Device.id.in_(ids))).all() if rid is not None]
    if not row_ids:
        return {}
    return {r.device_id: r for r in session.execute(select(table).where(table.c.id.in_(row_ids))).all()}


def latest_values(session: Session, devices: list[Device]) -> dict[str, series.Sums]:
    """Each device's newest report (telemetry or summary, whichever arrived last) as figures."""
    ids = [d.id for d in devices]
    out: dict[str, series.Sums] = {}
    for chunk in (ids[i:i + series.CHUNK] for i in range(0, len(ids), series.CHUNK)):
        tel, summ = _latest_rows(session, TelemetryRow, chunk), _latest_rows(session, SummaryRow, chunk)
        before = series.prev_errors(session, {d: t.seq for d, t in tel.items()})
        for dev in chunk:
            t, s = tel.get(dev), summ.get(dev)
            sums = series.Sums()
            if t is not None and (s is None or t.received_at >= s.received_at):
                sums.add_raw(t, telemetry=True, errors=series.error_deltas([t], before.get(dev))[0])
            elif s is not None:
                sums.add_raw(s, telemetry=False, errors=s.errors)
            else:
                continue
            out[dev] = sums
    return out


Condition = tuple[str, bool | None, float | None, str, Device | None]  # subject, active (None: unknown), value, message, device


def _conditions(session: Session, rule: AlertRule, now: datetime) -> list[Condition]:
    devices = scope_devices(session, rule)
    cmp = OPS.get(rule.op or ">", operator.gt)
    out: list[Condition] = []
    if rule.kind == "threshold":
        values = latest_values(session, devices)
        for d in devices:
            sums = values.get(d.id)
            v = sums.value(rule.metric) if sums is not None and rule.metric else None
            active = None if v is None else bool(cmp(float(v), float(rule.threshold or 0.0)))
            msg = (f"{d.id}: {rule.metric} = {v} {rule.op} {rule.threshold:g} for {rule.for_s:g} s (rule {rule.name})"
                   if v is not None else "")
            out.append((f"device:{d.id}", active, v, msg, d))
    elif rule.kind == "fleet_offline":
        frac_online = series.online_fraction_now(devices)
        known = sum(1 for d in devices if d.status != "registered")
        offline = sum(1 for d in devices if d.status == "offline")
        v = None if frac_online is None else round(1.0 - frac_online, 6)
        active = None if v is None else bool(cmp(v, float(rule.threshold or 0.0)))
        scope = _scope_subject(rule)
        msg = f"{offline} of {known} devices of {scope} offline ({(v or 0) * 100:.1f} % {rule.op} {(rule.threshold or 0) * 100:g} %) (rule {rule.name})"
        out.append((scope, active, v, msg, None))
    elif rule.kind == "absence":
        for d in devices:
            if d.last_seen is None:
                continue  # never heard from: nothing to be absent from (registered ahead of its first start)
            silent = (now - d.last_seen).total_seconds()
            msg = f"{d.id}: not heard from for {silent / 60:.1f} min (rule {rule.name}: {rule.for_s / 60:g} min)"
            out.append((f"device:{d.id}", silent > rule.for_s, round(silent, 3), msg, d))
    return out


class RuleEvaluator:
    """Checks every enabled rule against the database; remembers since when each condition holds."""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, str], datetime] = {}

    def evaluate(self, session: Session, now: datetime | None = None) -> list[AlertRow]:
        """One check of every rule at ``now``; returns the alerts opened or resolved. Commits."""
        now = now or utcnow()
        changed: list[AlertRow] = []
        live: set[tuple[int, str]] = set()
        for rule in list_rules(session):
            if not rule.enabled:
                _resolve_rule_alerts(session, rule.id, "the rule was disabled")
                continue
            try:
                conditions = _conditions(session, rule, now)
            except NotFoundError as exc:  # e.g. its group was deleted
                log.warning("alert rule %s cannot be checked: %s", rule.name, exc.message)
                continue
            open_now = {a.subject: a for a in session.scalars(
                select(AlertRow).where(AlertRow.rule_id == rule.id, AlertRow.status.in_(OPEN)).order_by(AlertRow.id.desc()))}
            subjects = set()
            for subject, active, value, message, device in conditions:
                key = (rule.id, subject)
                subjects.add(subject)
                if active is None:  # no figure to judge: leave things as they are
                    if key in self.pending:
                        live.add(key)
                    continue
                row = open_now.get(subject)
                if active:
                    since = self.pending.setdefault(key, now)
                    live.add(key)
                    hold = 0.0 if rule.kind == "absence" else rule.for_s
                    if (now - since).total_seconds() < hold:
                        continue
                    detail = {"rule": rule.name, "value": value, "threshold": rule.threshold, "op": rule.op,
                              "for_s": rule.for_s, "since": since.isoformat()}
                    if row is not None:  # de-duplicated: the open alert is refreshed, not repeated
                        row.detail = {**detail, "repeats": int((row.detail or {}).get("repeats", 0)) + 1}
                        row.updated_at = now
                        continue
                    row, _ = fire(session, kind=f"monitor.{rule.kind}", subject=subject, severity=rule.severity,
                                  message=message, detail=detail, now=now, rule_id=rule.id,
                                  device_id=device.id if device else None, model=device.model if device else None,
                                  version=device.version if device else None)
                    changed.append(row)
                else:
                    self.pending.pop(key, None)
                    if row is not None:
                        resolve(row, now, f"{rule.metric or rule.kind} back to {value}")
                        changed.append(row)
            for subject, row in open_now.items():
                if subject not in subjects:
                    resolve(row, now, "no longer in the rule's scope")
                    changed.append(row)
        self.pending = {k: v for k, v in self.pending.items() if k in live}
        session.commit()
        return changed


# -- notification ---------------------------------------------------------------------------------


def alert_payload(row: AlertRow, rule_name: str | None = None) -> dict[str, Any]:
    """The JSON a webhook receives (one alert, its new status)."""
    iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
    return {"id": row.id, "status": row.status, "kind": row.kind, "severity": row.severity, "subject": row.subject,
            "rule_id": row.rule_id, "rule": rule_name, "device_id": row.device_id, "model": row.model,
            "version": row.version, "message": row.message, "detail": row.detail, "opened_at": iso(row.opened_at),
            "updated_at": iso(row.updated_at), "acknowledged_by": row.acknowledged_by, "resolved_at": iso(row.resolved_at)}


class _Sender:
    def __init__(self, url: str, notifier: "Notifier") -> None:
        self.url = url
        self.n = notifier
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=notifier.queue_size)
        self.thread = threading.Thread(target=self._run, name=f"edgewise-webhook {url[:40]}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.n.timeout_s) as client:
            while not self.n.stopping.is_set():
                try:
                    payload = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._deliver(client, payload)

    def _deliver(self, client: httpx.Client, payload: dict[str, Any]) -> None:
        delay = self.n.backoff_s
        for attempt in range(1, self.n.attempts + 1):
            try:
                r = client.post(self.url, json=payload)
                if r.status_code < 300:
                    self.n.count("delivered")
                    return
                why = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt == self.n.attempts or self.n.stopping.wait(delay):
                break
            log.info("webhook %s: attempt %d for alert %s failed (%s); retrying in %.1f s", self.url, attempt,
                     payload.get("id"), why, delay)
            delay = min(delay * 2, self.n.max_backoff_s)
        self.n.count("failed")
        log.warning("webhook %s: gave up on alert %s (%s) after %d attempts: %s", self.url, payload.get("id"),
                    payload.get("status"), attempt, why)


class Notifier:
    """Posts alert changes to webhooks, one worker thread (and bounded queue) per URL: a dead or slow
    endpoint delays only its own queue. ``send`` never blocks; a full queue drops and logs."""

    def __init__(self, *, attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0, timeout_s: float = 5.0,
                 queue_size: int = 1000) -> None:
        self.attempts, self.backoff_s, self.max_backoff_s, self.timeout_s = attempts, backoff_s, max_backoff_s, timeout_s
        self.queue_size = queue_size
        self.stopping = threading.Event()
        self._senders: dict[str, _Sender] = {}
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"delivered": 0, "failed": 0, "dropped": 0}

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def send(self, url: str, payload: dict[str, Any]) -> None:
        with self._lock:
            sender = self._senders.get(url)
            if sender is None and not self.stopping.is_set():
                sender = self._senders[url] = _Sender(url, self)
        if sender is None:
            return
        try:
            sender.queue.put_nowait(payload)
        except queue.Full:
            self.count("dropped")
            log.warning("webhook %s is %d notifications behind; dropping alert %s (%s)", url, self.queue_size,
                        payload.get("id"), payload.get("status"))

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping.set()
        for s in list(self._senders.values()):
            s.thread.join(timeout)


def notify_due(session: Session, notifier: Notifier, webhooks: list[str], *, limit: int = 500) -> int:
    """Log and send every alert whose status changed since it was last notified. Commits."""
    rows = list(session.scalars(select(AlertRow).where(or_(AlertRow.notified_status.is_(None),
                                                           AlertRow.notified_status != AlertRow.status))
                                .order_by(AlertRow.updated_at, AlertRow.id).limit(limit)))
    rules = {r.id: r for r in list_rules(session)} if rows else {}
    for row in rows:
        rule = rules.get(row.rule_id) if row.rule_id is not None else None
        level = logging.INFO if row.status != "firing" else logging.WARNING
        log.log(level, "alert %d %s [%s %s] %s: %s", row.id, row.status, row.severity, row.kind, row.subject, row.message)
        payload = alert_payload(row, rule.name if rule else None)
        for url in [*webhooks, *([rule.webhook_url] if rule is not None and rule.webhook_url else [])]:
            notifier.send(url, payload)
        row.notified_status = row.status
    session.commit()
    return len(rows)


# -- the monitor loop -----------------------------------------------------------------------------


class MonitorEngine:
    """One background thread: roll up series, sample link state, prune, check rules, notify.

    Every step runs in its own session and its own try: a failing step is logged and retried at the
    next tick; nothing here runs on ingest's thread. ``tick(now)`` runs one round (tests drive it
    with a fake clock and no thread).
    """

    def __init__(self, db: Any, *, tick_s: float = 5.0, raw_retention: timedelta = timedelta(days=1),
                 rollup_retention: timedelta = timedelta(days=30), webhooks: list[str] | None = None,
                 ingest_messages: Callable[[], int] | None = None, prune_interval_s: float = 600.0,
                 notifier: Notifier | None = None) -> None:
        self.db = db
        self.tick_s = tick_s
        self.raw_retention, self.rollup_retention = raw_retention, rollup_retention
        self.webhooks = list(webhooks or [])
        self.ingest_messages = ingest_messages
        self.prune_interval_s = prune_interval_s
        self.notifier = notifier or Notifier()
        self.evaluator = RuleEvaluator()
        self.ticks = 0
        self._last_link_minute: int | None = None
        self._last_prune: float | None = None
        self._rates: deque[tuple[float, int]] = deque(maxlen=64)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()  # one round at a time: two concurrent roll_ups would count rows twice
        self.lease: Any = None  # issue 9 SCALE: a control.lease.Lease; the loop ticks only while it is held

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgewise-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.notifier.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.lease is None or self.lease.held():  # else another process monitors (docs/scale-out.md)
                self.tick()
            self._stop.wait(self.tick_s)

    def _step(self, what: str, fn: Callable[[Session], Any]) -> Any:
        with self.db.session() as session:
            try:
                return fn(session)
            except Exception:
                session.rollback()
                log.exception("monitor: %s failed; retrying at the next tick", what)
                return None

    def tick(self, now: datetime | None = None) -> None:
        """One round: roll up, sample link state (once a minute), prune (every ``prune_interval_s``),
        check rules, notify. ``now`` defaults to the clock (tests pass a fake one)."""
        with self._tick_lock:
            self._tick(now or utcnow())

    def _tick(self, now: datetime) -> None:
        mono = time.monotonic()
        if self.ingest_messages is not None:
            self._rates.append((mono, self.ingest_messages()))
        self._step("rolling up series", lambda s: series.roll_up(s, max_batches=ROLLUP_BATCHES_PER_TICK))
        minute = series.minute_of(now.timestamp())
        if minute != self._last_link_minute:
            if self._step("sampling link state", lambda s: series.sample_link_state(s, now)) is not None:
                self._last_link_minute = minute
        if self._last_prune is None or mono - self._last_prune >= self.prune_interval_s:
            self._last_prune = mono
            pruned = self._step("pruning", lambda s: series.prune(s, now, raw_retention=self.raw_retention,
                                                                 rollup_retention=self.rollup_retention))
            if pruned is not None and (pruned.telemetry or pruned.summaries or pruned.rollups):
                log.info("retention: deleted %d telemetry, %d summary and %d rollup rows", pruned.telemetry,
                         pruned.summaries, pruned.rollups)
        self._step("checking alert rules", lambda s: self.evaluator.evaluate(s, now))
        self._step("notifying", lambda s: notify_due(s, self.notifier, self.webhooks))
        self.ticks += 1

    def ingest_rate(self, window_s: float = 60.0) -> float | None:
        """Messages per second handed to ingest over about the last ``window_s`` (None until two ticks)."""
        if len(self._rates) < 2:
            return None
        t1, n1 = self._rates[-1]
        t0, n0 = next(((t, n) for t, n in self._rates if t1 - t <= window_s), self._rates[0])
        if t1 <= t0:
            t0, n0 = self._rates[0]
        return round((n1 - n0) / (t1 - t0), 3) if t1 > t0 else None
