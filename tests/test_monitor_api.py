"""The monitoring API on a running control plane: series endpoints, GET /metrics (parsed with
prometheus_client's own parser), alert rules and acknowledgement, and a device-raised alert that
arrives through the embedded broker and ingest and goes out to a real webhook."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import admin_headers
from edgewise import protocol as p
from edgewise.control import ServerSettings, create_app
from edgewise.control.auth import create_api_token, create_user, issue_device_token
from test_agent_support import wait_for
from test_monitor_alerts import Hook

SCRAPE_TOKEN = "scrape-me-please-0123456789"


@pytest.fixture(scope="module")
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir, hook):
    """A running app (monitor ticking every 0.1 s, webhook configured) with a viewer and an operator token."""
    data_dir = tmp_path_factory.mktemp("monitor-api") / "cp"
    settings = ServerSettings(data_dir=data_dir, port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"],
                              monitor_tick_s=0.1, alert_webhooks=[hook.url], metrics_token=SCRAPE_TOKEN)
    app = create_app(settings)
    with TestClient(app) as client:
        services = app.state.control
        with services.db.session() as s:
            tokens = {role: create_api_token(s, create_user(s, f"mon-{role}", "correct horse battery", role),
                                             name=role)[0] for role in ("viewer", "operator")}
        tokens["admin"] = admin_headers(data_dir)["Authorization"].split()[1]
        yield client, services, {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}


def feed(services, device_id: str, records, *, status: str = "online", hardware_class: str | None = None) -> None:
    ing = services.ingest
    hw = p.HardwareInfo(arch="x86_64", cores=2, ram_mb=1024, hardware_class=hardware_class)
    ing.handle(p.topics.state(device_id), p.encode(p.DeviceState(device_id=device_id, status=status, model="digits",
                                                                  version="1.0.0", hardware=hw)))
    if records:
        ing.handle(p.topics.telemetry(device_id), p.encode(p.Batch(device_id=device_id, items=records)))


def tel(device_id: str, seq: int, ts: float, **kw) -> p.Telemetry:
    base = dict(window_s=10, window_inferences=100, latency_p50_ms=4.0, latency_p95_ms=9.0)
    return p.Telemetry(device_id=device_id, seq=seq, ts=ts, **{**base, **kw})


def test_device_series_come_raw_or_per_minute_and_unknown_metrics_are_named(cp):
    client, services, h = cp
    now = time.time()
    feed(services, "mapi-1", [tel("mapi-1", i, now - 40 + 10 * i, latency_p95_ms=10.0 + i) for i in range(4)])
    r = client.get("/api/v1/devices/mapi-1/series", params={"metrics": "latency_p95_ms,cpu_percent", "step": "raw",
                                                            "since": now - 600}, headers=h["viewer"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [v for _, v in body["metrics"]["latency_p95_ms"]] == [10.0, 11.0, 12.0, 13.0]
    assert body["metrics"]["cpu_percent"] == [] and body["step"] == "raw"
    wait_for(lambda: client.get("/api/v1/devices/mapi-1/series", params={"metrics": "inferences", "since": now - 600},
                                headers=h["viewer"]).json()["metrics"]["inferences"], 10, what="the rollup")
    per_min = client.get("/api/v1/devices/mapi-1/series", params={"metrics": "inferences", "since": now - 600},
                         headers=h["viewer"]).json()
    assert sum(v for _, v in per_min["metrics"]["inferences"]) == 400 and per_min["step"] == 60
    bad = client.get("/api/v1/devices/mapi-1/series", params={"metrics": "latency_p99"}, headers=h["viewer"])
    assert bad.status_code == 422 and "unknown metric 'latency_p99'" in bad.json()["detail"]
    assert client.get("/api/v1/devices/nobody-here/series", params={"metrics": "errors"}, headers=h["viewer"]).status_code == 404
    assert client.get("/api/v1/series/metrics", headers=h["viewer"]).json()["link_state"].startswith("1 online")


def test_a_device_reads_its_own_series_but_not_the_fleets(cp):
    client, services, _h = cp
    feed(services, "mapi-own", [])
    with services.db.session() as s:
        dev = {"Authorization": f"Bearer {issue_device_token(s, 'mapi-own')}"}
    assert client.get("/api/v1/devices/mapi-own/series", params={"metrics": "errors"}, headers=dev).status_code == 200
    assert client.get("/api/v1/devices/mapi-1/series", params={"metrics": "errors"}, headers=dev).status_code == 403
    assert client.get("/api/v1/fleet/series", params={"metrics": "errors"}, headers=dev).status_code == 403


def test_fleet_series_cover_a_group_and_refuse_a_raw_step(cp):
    client, services, h = cp
    now = time.time()
    for d in ("mapi-g1", "mapi-g2"):
        feed(services, d, [tel(d, 1, now - 5)])
    r = client.post("/api/v1/groups", json={"name": "mapi-pair", "query": {"devices": ["mapi-g1", "mapi-g2"]}},
                    headers=h["operator"])
    assert r.status_code in (200, 201), r.text
    params = {"metrics": "inference_rate,devices_reporting", "group": "mapi-pair", "since": now - 300}
    wait_for(lambda: (client.get("/api/v1/fleet/series", params=params, headers=h["viewer"]).json()["metrics"]
                      ["devices_reporting"] or [[0, 0]])[-1][1] == 2, 10, what="the fleet rollup of both devices")
    body = client.get("/api/v1/fleet/series", params=params, headers=h["viewer"]).json()
    assert body["devices"] == 2 and body["metrics"]["devices_reporting"][-1][1] == 2
    assert body["metrics"]["inference_rate"][-1][1] == 20.0
    raw = client.get("/api/v1/fleet/series", params={**params, "step": "raw"}, headers=h["viewer"])
    assert raw.status_code == 422 and "step=60" in raw.json()["detail"]
    missing = client.get("/api/v1/fleet/series", params={**params, "group": "no-such-group"}, headers=h["viewer"])
    assert missing.status_code == 404


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_parse_as_prometheus_text_and_count_the_fleet(cp):
    client, services, h = cp
    feed(services, "mapi-m1", [], hardware_class="rpi4")
    feed(services, "mapi-m2", [], hardware_class="rpi4")
    feed(services, "mapi-m3", [], status="offline", hardware_class="jetson")
    r = client.get("/metrics", headers=h["viewer"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = _families(r.text)
    by_status = {s.labels["status"]: s.value for s in fam["edgewise_devices"]}
    with services.db.session() as s:
        from sqlalchemy import func, select

        from edgewise.control.models import Device

        offline = s.scalar(select(func.count()).select_from(Device).where(Device.status == "offline"))
    assert by_status["offline"] == offline >= 1 and by_status["online"] >= 2
    classes = {s.labels["hardware_class"]: s.value for s in fam["edgewise_devices_by_hardware_class"]}
    assert classes["rpi4"] == 2 and classes["jetson"] == 1
    versions = {(s.labels["model"], s.labels["version"]): s.value for s in fam["edgewise_devices_by_version"]}
    assert versions[("digits", "1.0.0")] >= 3
    assert {s.labels["state"] for s in fam["edgewise_rollouts"]} >= {"running", "halted", "completed"}
    assert next(s.value for s in fam["edgewise_ingest_messages"] if s.name == "edgewise_ingest_messages_total") >= 3
    assert {s.labels["status"] for s in fam["edgewise_alerts"]} == {"firing", "acknowledged"}


def test_metrics_need_a_viewer_or_the_scrape_token_which_opens_nothing_else(cp):
    client, _services, _h = cp
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scrape = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    assert client.get("/metrics", headers=scrape).status_code == 200
    assert client.get("/api/v1/devices", headers=scrape).status_code == 401


def test_operators_edit_rules_viewers_read_them_and_bad_rules_get_a_422_naming_the_field(cp):
    client, _services, h = cp
    spec = {"name": "mapi-slow", "kind": "threshold", "metric": "latency_p95_ms", "op": ">", "threshold": 50, "for_s": 300}
    assert client.post("/api/v1/alert-rules", json=spec, headers=h["viewer"]).status_code == 403
    r = client.post("/api/v1/alert-rules", json=spec, headers=h["operator"])
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert client.post("/api/v1/alert-rules", json=spec, headers=h["operator"]).status_code == 409
    bad = client.post("/api/v1/alert-rules", json={**spec, "name": "x", "metric": "latency"}, headers=h["operator"])
    assert bad.status_code == 422 and "latency" in bad.text
    assert [x["name"] for x in client.get("/api/v1/alert-rules", headers=h["viewer"]).json()].count("mapi-slow") == 1
    r = client.put(f"/api/v1/alert-rules/{rid}", json={**spec, "threshold": 80}, headers=h["operator"])
    assert r.status_code == 200 and r.json()["threshold"] == 80
    assert client.delete(f"/api/v1/alert-rules/{rid}", headers=h["viewer"]).status_code == 403
    assert client.delete(f"/api/v1/alert-rules/{rid}", headers=h["operator"]).status_code == 204
    assert client.get(f"/api/v1/alert-rules/{rid}", headers=h["viewer"]).status_code == 404


def test_a_device_raised_alert_over_mqtt_reaches_the_webhook_and_an_operator_acknowledges_it(cp, hook):
    client, services, h = cp
    device = "mapi-raiser"
    with services.db.session() as s:
        token = issue_device_token(s, device)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
    c.username_pw_set(device, token)
    host, port = services.broker_url.removeprefix("mqtt://").split(":")
    c.connect(host, int(port))
    c.loop_start()
    try:
        ev = p.Event(device_id=device, seq=1, ts=time.time(), kind="alert.disk_full", severity="error",
                     message="data partition 99 % full", detail={"free_mb": 3})
        c.publish(p.topics.events(device), p.encode(p.Batch(device_id=device, items=[ev])), qos=1).wait_for_publish(5)
        fired = wait_for(lambda: next((x for x in hook.received if x["kind"] == "alert.disk_full"), None), 15,
                         what="the webhook notification of the device's alert")
    finally:
        c.loop_stop()
        c.disconnect()
    assert (fired["status"], fired["subject"], fired["severity"], fired["detail"]["free_mb"]) == (
        "firing", f"device:{device}", "error", 3)
    listed = client.get("/api/v1/alerts", params={"status": "open", "kind": "alert."}, headers=h["viewer"]).json()
    assert [a["id"] for a in listed] == [fired["id"]]
    assert client.post(f"/api/v1/alerts/{fired['id']}/ack", headers=h["viewer"]).status_code == 403
    r = client.post(f"/api/v1/alerts/{fired['id']}/ack", headers=h["operator"])
    assert r.status_code == 200 and r.json()["status"] == "acknowledged" and r.json()["acknowledged_by"].endswith("user:mon-operator)")
    wait_for(lambda: any(x["id"] == fired["id"] and x["status"] == "acknowledged" for x in hook.received), 10,
             what="the acknowledgement notification")
    metrics = _families(client.get("/metrics", headers=h["viewer"]).text)
    acked = {(s.labels["status"], s.labels["severity"]): s.value for s in metrics["edgewise_alerts"]}
    assert acked[("acknowledged", "error")] == 1
    r = client.post(f"/api/v1/alerts/{fired['id']}/resolve", headers=h["operator"])
    assert r.json()["status"] == "resolved"
    assert client.post(f"/api/v1/alerts/{fired['id']}/ack", headers=h["operator"]).status_code == 409
    assert client.get("/api/v1/alerts", params={"status": "bogus"}, headers=h["viewer"]).status_code == 422


def test_the_documented_grafana_dashboard_and_scrape_config_use_what_the_server_exposes(cp):
    import json
    import re
    from pathlib import Path

    import yaml

    from edgewise.control.metrics import FLEET_GAUGES

    client, _services, h = cp
    docs = Path(__file__).resolve().parents[1] / "docs"
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    used = {re.sub(r"_total$", "", m) for panel in dashboard["panels"] for t in panel["targets"]
            for m in re.findall(r"edgewise_\w+", t["expr"])}
    exposed = set(_families(client.get("/metrics", headers=h["viewer"]).text))
    exposed |= {name for _, name, _ in FLEET_GAUGES} | {"edgewise_ingest_messages_per_second"}  # present once data flows
    assert used and used <= exposed, used - exposed
    text = (docs / "fleet-monitoring.md").read_text()
    scrape = yaml.safe_load(re.search(r"```yaml\n(# prometheus.yml\n.*?)```", text, re.S).group(1))
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"


def test_metrics_leave_out_rollouts_on_a_database_without_the_rollouts_table(tmp_path):
    from sqlalchemy.orm import Session

    from edgewise.control.db import make_engine, upgrade
    from edgewise.control.metrics import _rollouts

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0009")  # before staged rollouts existed
    with Session(engine) as s:
        assert list(_rollouts(s)) == []
    engine.dispose()


def test_the_running_monitor_fires_a_rule_notifies_and_resolves_it_on_its_own(cp, hook):
    client, services, h = cp
    rule = {"name": "mapi-hot", "kind": "threshold", "metric": "temperature_c", "op": ">", "threshold": 80,
            "device_id": "mapi-hot-dev", "severity": "critical"}
    assert client.post("/api/v1/alert-rules", json=rule, headers=h["operator"]).status_code == 201
    feed(services, "mapi-hot-dev", [tel("mapi-hot-dev", 1, time.time(), temperature_c=92.0)])
    fired = wait_for(lambda: next((x for x in hook.received if x["rule"] == "mapi-hot" and x["status"] == "firing"), None),
                     15, what="the rule's firing notification")
    assert fired["severity"] == "critical" and fired["device_id"] == "mapi-hot-dev" and fired["detail"]["value"] == 92.0
    feed(services, "mapi-hot-dev", [tel("mapi-hot-dev", 2, time.time(), temperature_c=60.0)])
    wait_for(lambda: any(x["id"] == fired["id"] and x["status"] == "resolved" for x in hook.received), 15,
             what="the rule's resolved notification")
    got = client.get(f"/api/v1/alerts/{fired['id']}", headers=h["viewer"]).json()
    assert got["status"] == "resolved" and got["rule_id"] is not None
