"""``GET /metrics``: the fleet in Prometheus' text format, so an existing Prometheus/Grafana can scrape it.

A custom collector reads the database at each scrape (nothing is cached or double-booked in
process-global registries): devices by status, model version, hardware class and agent version;
rollouts by state (the ``rollouts`` table, when it exists); open alerts by status and severity;
the fleet's health in the last complete minute (from the per-minute rollups); and ingest counters
(messages, stored rows, duplicates, rejects) with the message rate the monitor measures.

Access: a viewer's API token (``edgewise token create --name prometheus`` as a viewer user), or
the scrape token in ``ServerSettings.metrics_token`` (``EDGEWISE_METRICS_TOKEN``) — a token that
opens ``/metrics`` and nothing else.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, inspect, select, text

from . import series
from .auth import Principal, Rule, RuleCheck
from .models import AlertRow, AlertRule, Device
from .services import ControlServices
from .timeutil import utcnow

log = logging.getLogger(__name__)

router = APIRouter(tags=["monitoring"])

DEVICE_STATUSES = ("registered", "online", "updating", "degraded", "offline")
ROLLOUT_STATES = ("pending", "running", "waiting_approval", "paused", "halted", "completed", "aborted")
SCRAPER = Principal("user", "metrics-scraper", "viewer", None, "metrics_token", "bearer")


class ScrapeRuleCheck(RuleCheck):
    """Viewer or better — or the configured scrape token, which opens this route only."""

    def __call__(self, request: Request) -> Principal:
        token = getattr(request.app.state.settings, "metrics_token", None)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if token and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            request.state.principal = SCRAPER
            return SCRAPER
        return super().__call__(request)


SCRAPE = Depends(ScrapeRuleCheck(Rule(role="viewer")))


class FleetCollector:
    """Reads the fleet's figures from the database at collect time (one short session)."""

    def __init__(self, services: ControlServices) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        with self.services.db.session() as s:
            yield from _devices(s)
            yield from _rollouts(s)
            yield from _alerts(s)
            yield from _fleet_health(s)
        yield from self._ingest()

    def _ingest(self) -> Iterator[Metric]:
        st = self.services.ingest.stats()
        yield CounterMetricFamily("edgewise_ingest_messages", "Messages handed to ingest since the process started.",
                                  value=st.messages)
        rows = CounterMetricFamily("edgewise_ingest_rows", "Records stored by ingest, by kind.", labels=["kind"])
        for kind, n in (("state", st.states), ("telemetry", st.telemetry_rows), ("summary", st.summary_rows),
                        ("event", st.event_rows), ("sample", st.sample_rows)):
            rows.add_metric([kind], n)
        yield rows
        yield CounterMetricFamily("edgewise_ingest_duplicates", "Redelivered records dropped.", value=st.duplicates)
        bad = CounterMetricFamily("edgewise_ingest_rejected", "Messages refused by the wire contract.", labels=["reason"])
        for reason, n in sorted(st.bad_by_reason.items()):
            bad.add_metric([reason], n)
        yield bad
        yield CounterMetricFamily("edgewise_ingest_errors", "Valid messages the server failed to store.", value=st.errors)
        monitor = self.services.monitor
        rate = monitor.ingest_rate() if monitor is not None else None
        if rate is not None:
            yield GaugeMetricFamily("edgewise_ingest_messages_per_second",
                                    "Messages per second handed to ingest over about the last minute.", value=rate)
        if monitor is not None:
            sent = CounterMetricFamily("edgewise_alert_notifications", "Webhook notifications, by result.",
                                       labels=["result"])
            for result, n in sorted(monitor.notifier.counts.items()):
                sent.add_metric([result], n)
            yield sent


def _devices(s: Any) -> Iterator[Metric]:
    by_status = dict.fromkeys(DEVICE_STATUSES, 0)
    for status, n in s.execute(select(Device.status, func.count()).group_by(Device.status)):
        by_status[status] = n
    g = GaugeMetricFamily("edgewise_devices", "Devices by last reported status.", labels=["status"])
    for status, n in by_status.items():
        g.add_metric([status], n)
    yield g
    g = GaugeMetricFamily("edgewise_devices_by_version", "Devices by the model version they run.", labels=["model", "version"])
    for model, version, n in s.execute(select(Device.model, Device.version, func.count())
                                       .where(Device.model.is_not(None)).group_by(Device.model, Device.version)):
        g.add_metric([model or "", version or ""], n)
    yield g
    classes: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    for hardware, agent in s.execute(select(Device.hardware, Device.agent_version)):
        classes[((hardware or {}).get("hardware_class") or "unknown") if isinstance(hardware, dict) else "unknown"] += 1
        agents[agent or "unknown"] += 1
    g = GaugeMetricFamily("edgewise_devices_by_hardware_class", "Devices by declared hardware class.", labels=["hardware_class"])
    for name, n in sorted(classes.items()):
        g.add_metric([name], n)
    yield g
    g = GaugeMetricFamily("edgewise_devices_by_agent_version", "Devices by agent version.", labels=["agent_version"])
    for name, n in sorted(agents.items()):
        g.add_metric([name], n)
    yield g


def _rollouts(s: Any) -> Iterator[Metric]:
    """Rollouts by state; the table belongs to the staged-rollout part and may not exist (yet)."""
    try:
        if not inspect(s.get_bind()).has_table("rollouts"):
            return
        counts = dict.fromkeys(ROLLOUT_STATES, 0)
        for state, n in s.execute(text("SELECT state, count(*) FROM rollouts GROUP BY state")):
            counts[str(state)] = int(n)
    except Exception as exc:  # a schema we do not know: leave the figure out rather than fail the scrape
        log.debug("metrics: cannot read rollouts: %s", exc)
        s.rollback()
        return
    g = GaugeMetricFamily("edgewise_rollouts", "Staged rollouts by state.", labels=["state"])
    for state, n in counts.items():
        g.add_metric([state], n)
    yield g


def _alerts(s: Any) -> Iterator[Metric]:
    g = GaugeMetricFamily("edgewise_alerts", "Open alerts by status and severity (resolved ones are not counted).",
                          labels=["status", "severity"])
    counts = {(st, sev): 0 for st in ("firing", "acknowledged") for sev in ("warning", "error", "critical")}
    for status, severity, n in s.execute(select(AlertRow.status, AlertRow.severity, func.count())
                                         .where(AlertRow.status.in_(("firing", "acknowledged")))
                                         .group_by(AlertRow.status, AlertRow.severity)):
        counts[(status, severity)] = n
    for (status, severity), n in sorted(counts.items()):
        g.add_metric([status, severity], n)
    yield g
    yield GaugeMetricFamily("edgewise_alert_rules", "Enabled alert rules.",
                            value=s.scalar(select(func.count()).select_from(AlertRule).where(AlertRule.enabled.is_(True))) or 0)


FLEET_GAUGES = (
    ("inference_rate", "edgewise_fleet_inference_rate", "Predictions per second over the fleet (last complete minute)."),
    ("latency_p50_ms", "edgewise_fleet_latency_p50_ms", "Mean of the devices' median latency, ms (last complete minute)."),
    ("latency_p95_ms", "edgewise_fleet_latency_p95_ms", "Mean of the devices' p95 latency, ms (last complete minute)."),
    ("latency_p95_max_ms", "edgewise_fleet_latency_p95_max_ms", "Worst device p95 latency, ms (last complete minute)."),
    ("error_rate", "edgewise_fleet_error_rate", "Failed / all predictions over the fleet (last complete minute)."),
    ("drift_score", "edgewise_fleet_drift_score", "Mean reported drift score (last complete minute)."),
    ("outbox_depth", "edgewise_fleet_outbox_depth", "Records waiting in device outboxes (last complete minute)."),
    ("devices_reporting", "edgewise_fleet_devices_reporting", "Devices that reported in the last complete minute."),
)


def _fleet_health(s: Any) -> Iterator[Metric]:
    """The last complete minute of the rollups (the current one is still filling)."""
    this_minute = series.minute_of(utcnow().timestamp())
    buckets = series.step_buckets(s, None, this_minute - series.MINUTE, this_minute, series.MINUTE,
                                  [m for m, _, _ in FLEET_GAUGES])
    per_device = buckets.get(this_minute - series.MINUTE, {})
    for metric, name, doc in FLEET_GAUGES:
        v = series.fleet_value(per_device, metric) if per_device else None
        if metric == "devices_reporting" and v is None:
            v = 0
        if v is not None:
            yield GaugeMetricFamily(name, doc, value=float(v))


@router.get("/metrics", include_in_schema=True, dependencies=[SCRAPE], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """The fleet in Prometheus text format (scrape with a viewer token or the configured scrape token)."""
    services = getattr(request.app.state, "control", None)
    if services is None:
        raise RuntimeError("the control plane's services are not running")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(services))  # type: ignore[arg-type]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
