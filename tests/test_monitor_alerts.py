"""Alert rules, states and notification: real ingest into real SQLite, a fake clock for durations, and
webhooks delivered to real local HTTP servers."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from conftest import free_port
from edgewise import protocol as p
from edgewise.control import alerts as al
from edgewise.control import groups
from edgewise.control.db import init_db
from edgewise.control.devices import register_device
from edgewise.control.errors import ConflictError
from edgewise.control.ingest import Ingest
from edgewise.control.models import AlertRow, Device
from edgewise.control.timeutil import utcnow
from test_agent_support import wait_for


@pytest.fixture()
def db(tmp_path, db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


@pytest.fixture()
def ingest(db):
    return Ingest(db)


class Hook:
    """A real HTTP server that records the JSON POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hook():
    h = Hook()
    yield h
    h.close()


def online(ingest, *device_ids: str, status: str = "online") -> None:
    for d in device_ids:
        ingest.handle(p.topics.state(d), p.encode(p.DeviceState(device_id=d, status=status)))


def report(ingest, device_id: str, seq: int, **kw) -> None:
    ingest.handle(p.topics.telemetry(device_id, "telemetry"),
                  p.encode(p.Telemetry(device_id=device_id, seq=seq, ts=time.time(), window_s=10, window_inferences=50, **kw)))


def rule(db, **spec) -> int:
    with db.session() as s:
        return al.create_rule(s, al.RuleIn(**spec)).id


def check(db, evaluator: al.RuleEvaluator, now) -> list[AlertRow]:
    with db.session() as s:
        evaluator.evaluate(s, now)
        return list(s.scalars(select(AlertRow).order_by(AlertRow.id)))


def test_a_threshold_fires_only_once_held_for_its_duration_and_resolves_when_it_stops(db, ingest):
    online(ingest, "al-slow")
    rule(db, name="slow", kind="threshold", metric="latency_p95_ms", op=">", threshold=50, for_s=300)
    report(ingest, "al-slow", 1, latency_p95_ms=80.0)
    ev, t0 = al.RuleEvaluator(), utcnow()
    assert check(db, ev, t0) == []
    assert check(db, ev, t0 + timedelta(seconds=299)) == []
    [alert] = check(db, ev, t0 + timedelta(seconds=300))
    assert (alert.status, alert.subject, alert.kind, alert.device_id) == ("firing", "device:al-slow", "monitor.threshold", "al-slow")
    assert alert.detail["value"] == 80.0 and "latency_p95_ms = 80.0 > 50" in alert.message
    assert len(check(db, ev, t0 + timedelta(seconds=900))) == 1  # still slow: the same alert, not a new one
    report(ingest, "al-slow", 2, latency_p95_ms=12.0)
    [alert] = check(db, ev, t0 + timedelta(seconds=960))
    assert alert.status == "resolved" and alert.resolved_at is not None


def test_a_condition_that_stops_before_its_duration_never_fires(db, ingest):
    online(ingest, "al-blip")
    rule(db, name="blip", kind="threshold", metric="error_rate", op=">", threshold=0.05, for_s=120)
    report(ingest, "al-blip", 1, errors=10)  # 10 of 60 predictions failed
    ev, t0 = al.RuleEvaluator(), utcnow()
    check(db, ev, t0)
    report(ingest, "al-blip", 2, errors=10)  # no new failure in this window
    assert check(db, ev, t0 + timedelta(seconds=60)) == []
    report(ingest, "al-blip", 3, errors=20)
    assert check(db, ev, t0 + timedelta(seconds=130)) == []  # the clock started again at 130 s
    assert [a.status for a in check(db, ev, t0 + timedelta(seconds=250))] == ["firing"]


def test_more_than_five_percent_of_a_group_offline_for_ten_minutes_fires_one_fleet_alert(db, ingest):
    ids = [f"al-shelf-{i:02d}" for i in range(20)]
    with db.session() as s:
        for d in ids:
            register_device(s, d, ["shelf"])
        register_device(s, "al-elsewhere", [])
        s.commit()
        groups.create_group(s, groups.parse_spec({"name": "shelves", "query": {"tags_all": ["shelf"]}}))
    online(ingest, *ids[:19])
    online(ingest, ids[19], status="offline")  # 1 of 20 = 5 %: not more than 5 %
    online(ingest, "al-elsewhere", status="offline")  # not in the group
    rule(db, name="shelves-offline", kind="fleet_offline", group="shelves", threshold=0.05, for_s=600)
    ev, t0 = al.RuleEvaluator(), utcnow()
    assert check(db, ev, t0) == []
    online(ingest, ids[18], status="offline")  # 10 %
    assert check(db, ev, t0 + timedelta(seconds=60)) == []
    assert check(db, ev, t0 + timedelta(seconds=659)) == []
    [alert] = check(db, ev, t0 + timedelta(seconds=660))
    assert (alert.subject, alert.device_id, alert.detail["value"]) == ("group:shelves", None, 0.1)
    assert "2 of 20 devices" in alert.message
    online(ingest, ids[18], ids[19])
    assert [a.status for a in check(db, ev, t0 + timedelta(seconds=720))] == ["resolved"]


def test_a_device_not_heard_from_for_n_minutes_is_absent_until_it_speaks_again(db, ingest):
    online(ingest, "al-quiet", "al-chatty")
    with db.session() as s:
        s.get(Device, "al-quiet").last_seen = utcnow() - timedelta(minutes=11)
        s.commit()
    rule(db, name="silent", kind="absence", for_s=600)
    ev = al.RuleEvaluator()
    [alert] = check(db, ev, utcnow())
    assert (alert.status, alert.subject) == ("firing", "device:al-quiet") and "11.0 min" in alert.message
    report(ingest, "al-quiet", 1)  # any record counts as a heartbeat
    assert [a.status for a in check(db, ev, utcnow())] == ["resolved"]


def test_an_acknowledged_alert_stays_open_without_duplicates_and_resolves_with_its_condition(db, ingest):
    online(ingest, "al-hot")
    rule(db, name="hot", kind="threshold", metric="temperature_c", op=">=", threshold=80, for_s=0)
    report(ingest, "al-hot", 1, temperature_c=85.0)
    ev = al.RuleEvaluator()
    [alert] = check(db, ev, utcnow())
    with db.session() as s:
        acked = al.acknowledge(s, alert.id, "user:olga")
        assert (acked.status, acked.acknowledged_by) == ("acknowledged", "user:olga")
    report(ingest, "al-hot", 2, temperature_c=90.0)
    [alert] = check(db, ev, utcnow())
    assert alert.status == "acknowledged" and alert.detail["value"] == 90.0
    report(ingest, "al-hot", 3, temperature_c=60.0)
    [alert] = check(db, ev, utcnow())
    assert alert.status == "resolved"
    with db.session() as s, pytest.raises(ConflictError, match="already resolved"):
        al.acknowledge(s, alert.id, "user:olga")
    report(ingest, "al-hot", 4, temperature_c=99.0)  # it comes back: a new alert
    assert [a.status for a in check(db, ev, utcnow())] == ["resolved", "firing"]


def test_each_device_in_scope_gets_its_own_alert_and_rules_do_not_mix(db, ingest):
    online(ingest, "al-m1", "al-m2", "al-m3")
    for i, d in enumerate(("al-m1", "al-m2", "al-m3")):
        report(ingest, d, 1, latency_p95_ms=100.0 if i < 2 else 1.0, cpu_percent=99.0)
    rule(db, name="lat", kind="threshold", metric="latency_p95_ms", threshold=50)
    rule(db, name="cpu", kind="threshold", metric="cpu_percent", threshold=90, device_id="al-m3")
    rows = check(db, al.RuleEvaluator(), utcnow())
    assert sorted((a.detail["rule"], a.subject) for a in rows) == [
        ("cpu", "device:al-m3"), ("lat", "device:al-m1"), ("lat", "device:al-m2")]


def test_a_device_raised_alert_event_through_ingest_becomes_one_alert_and_clears(db, ingest):
    online(ingest, "al-dev")

    def event(seq: int, severity: str, **detail) -> None:
        ev = p.Event(device_id="al-dev", seq=seq, ts=time.time(), kind="alert.overheat", severity=severity,
                     message="SoC at 91 C", detail=detail)
        ingest.handle(p.topics.events("al-dev"), p.encode(p.Batch(device_id="al-dev", items=[ev])))

    event(1, "warning", temperature_c=91)
    event(1, "warning", temperature_c=91)  # redelivered by the outbox: stored once, raised once
    event(2, "error", temperature_c=95)  # still hot: the same alert
    event(3, "info")  # the same kind at info: the device says it cleared
    with db.session() as s:
        rows = list(s.scalars(select(AlertRow)))
    assert len(rows) == 1
    a = rows[0]
    assert (a.kind, a.subject, a.status, a.detail["source"]) == ("alert.overheat", "device:al-dev", "resolved", "device")
    event(4, "critical")
    with db.session() as s:
        assert [r.status for r in s.scalars(select(AlertRow).order_by(AlertRow.id))] == ["resolved", "firing"]
    ingest.handle(p.topics.events("al-dev"), p.encode(p.Event(device_id="al-dev", seq=5, ts=time.time(),
                                                              kind="model.crash", severity="error")))
    with db.session() as s:
        assert len(list(s.scalars(select(AlertRow)))) == 2  # only kinds starting with "alert." become alerts


def test_invalid_rules_are_refused_naming_the_problem(db):
    with pytest.raises(ValueError, match="metric 'latency' is not one of"):
        al.RuleIn(name="x", kind="threshold", metric="latency", threshold=1)
    with pytest.raises(ValueError, match="offline fraction"):
        al.RuleIn(name="x", kind="fleet_offline", threshold=5)
    with pytest.raises(ValueError, match="absence rule: give for_s"):
        al.RuleIn(name="x", kind="absence")
    with pytest.raises(ValueError, match="at most one of device_id, group or tag"):
        al.RuleIn(name="x", kind="absence", for_s=60, tag="a", group="b")
    rule(db, name="dup", kind="absence", for_s=60)
    with db.session() as s, pytest.raises(ConflictError, match="named 'dup' exists"):
        al.create_rule(s, al.RuleIn(name="dup", kind="absence", for_s=60))


def test_every_alert_change_is_posted_to_the_webhook(db, ingest, hook):
    online(ingest, "al-hook")
    rule(db, name="hooked", kind="threshold", metric="latency_p95_ms", threshold=50)
    report(ingest, "al-hook", 1, latency_p95_ms=70.0)
    notifier, ev = al.Notifier(backoff_s=0.05), al.RuleEvaluator()
    try:
        check(db, ev, utcnow())
        with db.session() as s:
            assert al.notify_due(s, notifier, [hook.url]) == 1
            assert al.notify_due(s, notifier, [hook.url]) == 0  # nothing changed since
        wait_for(lambda: hook.received, 10, what="the firing notification")
        report(ingest, "al-hook", 2, latency_p95_ms=5.0)
        check(db, ev, utcnow())
        with db.session() as s:
            al.notify_due(s, notifier, [hook.url])
        wait_for(lambda: len(hook.received) == 2, 10, what="the resolved notification")
    finally:
        notifier.stop()
    fired, resolved = hook.received
    assert (fired["status"], fired["rule"], fired["subject"], fired["detail"]["value"]) == ("firing", "hooked", "device:al-hook", 70.0)
    assert resolved["status"] == "resolved" and resolved["id"] == fired["id"]


def test_a_dead_webhook_is_retried_with_backoff_and_does_not_hold_up_the_others(db, ingest, hook):
    silent = socket.socket()  # accepts connections, never answers: the worst kind of dead
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    refused = f"http://127.0.0.1:{free_port()}/nobody"
    dead = f"http://127.0.0.1:{silent.getsockname()[1]}/hang"
    online(ingest, "al-dead")
    with db.session() as s:
        al.fire(s, kind="test.alert", subject="device:al-dead", severity="warning", message="m", detail={}, now=utcnow())
        s.commit()
    notifier = al.Notifier(attempts=3, backoff_s=0.05, timeout_s=3.0)
    try:
        with db.session() as s:
            al.notify_due(s, notifier, [dead, refused, hook.url])  # returns at once: delivery is on worker threads
        wait_for(lambda: hook.received, 10, what="delivery to the live webhook")
        assert notifier.counts["failed"] == 0  # the hanging one is still waiting on its first attempt
        wait_for(lambda: notifier.counts["failed"] == 1, 10, what="the refused webhook giving up after its retries")
    finally:
        notifier.stop(timeout=0.1)
        silent.close()
    assert notifier.counts["delivered"] == 1


def test_the_monitor_tick_rolls_up_checks_rules_and_notifies_in_one_round(db, ingest, hook):
    online(ingest, "al-tick")
    rule(db, name="tick", kind="threshold", metric="latency_p95_ms", threshold=50)
    report(ingest, "al-tick", 1, latency_p95_ms=70.0)
    engine = al.MonitorEngine(db, webhooks=[hook.url], notifier=al.Notifier(backoff_s=0.05))
    try:
        engine.tick()
        wait_for(lambda: hook.received, 10, what="the notification")
    finally:
        engine.stop()
    with db.session() as s:
        from edgewise.control.models import SeriesMinute

        assert s.scalars(select(SeriesMinute).where(SeriesMinute.device_id == "al-tick")).first().records == 1
    assert hook.received[0]["status"] == "firing"


def test_open_drift_alerts_stored_before_the_upgrade_become_firing_and_are_not_notified_again(tmp_path):
    from sqlalchemy import text

    from edgewise.control.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0010")
    with engine.begin() as conn:
        for status, device in (("open", "d1"), ("resolved", None)):
            conn.execute(text("INSERT INTO alerts (kind, severity, status, model, version, device_id, message, detail, "
                              "opened_at, updated_at) VALUES ('drift.peer_outlier', 'warning', :st, 'digits', '1.0.0', "
                              ":dev, 'm', '{}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"), {"st": status, "dev": device})
    upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, notified_status, subject FROM alerts ORDER BY id")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("firing", "firing", "device:d1"), ("resolved", "resolved", "model:digits@1.0.0")]
