"""The dashboard, rendered by a real headless Chromium against a live control plane."""

from __future__ import annotations

import shutil
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import free_port
from edgewise import protocol as p
from edgewise.sim.fleet import http_json, wait_until
from test_data_fleet_drift_e2e import drift_bundle  # noqa: F401  (fixture: a digits bundle with reference statistics)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is not installed: run `make test` (it runs apt-get install chromium)")
    return exe


def render(url: str, tmp_path, wait_ms: int = 4000) -> str:
    """The page's DOM after its scripts ran, as a person's browser would show it."""
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}", f"--virtual-time-budget={wait_ms}", "--dump-dom", url,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture()
def live_server(tmp_path, keys_dir):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    cp = ControlPlane(ServerSettings(data_dir=tmp_path / "cp", port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"]))
    cp.start()
    yield cp
    cp.stop()


def _report(cp, device_id: str) -> None:
    """Play a device: publish its state and one telemetry sample over MQTT."""
    host, port = cp.settings.effective_broker_url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(device_id, cp.issue_device_token(device_id))  # the embedded broker fences devices by their token
    c.connect(host, int(port))
    c.loop_start()
    state = p.DeviceState(device_id=device_id, status="online", model="digits", version="1.0.0",
                          tags=["shelf-3"], ts=time.time())
    c.publish(p.topics.state(device_id), p.encode(state), qos=1, retain=True).wait_for_publish(5)
    tel = p.Telemetry(device_id=device_id, seq=0, ts=time.time(), model="digits", version="1.0.0",
                      inferences=120, window_inferences=60, window_s=10.0, latency_p50_ms=0.05, latency_p95_ms=0.125)
    c.publish(p.topics.telemetry(device_id), p.encode(p.Batch(device_id=device_id, items=[tel])), qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def test_dashboard_lists_every_device_with_version_status_and_latency(live_server, tmp_path):
    _report(live_server, "cam-17")
    token = live_server.admin_token
    wait_until(lambda: http_json("GET", f"{live_server.url}/api/v1/devices", token=token), 15, what="the device to register")
    wait_until(lambda: http_json("GET", f"{live_server.url}/api/v1/devices/cam-17/telemetry", token=token), 15,
               what="telemetry")
    dom = render(f"{live_server.url}/#token={token}", tmp_path)
    assert "cam-17" in dom
    assert "shelf-3" in dom
    assert "1.0.0" in dom
    assert "online" in dom


def test_dashboard_says_so_when_the_fleet_is_empty(live_server, tmp_path):
    dom = render(f"{live_server.url}/#token={live_server.admin_token}", tmp_path)
    assert "no devices" in dom.lower()


def test_dashboard_without_credentials_shows_only_the_sign_in_form(live_server, tmp_path):
    _report(live_server, "cam-secret")
    dom = render(f"{live_server.url}/", tmp_path)
    assert 'id="login" class="login">' in dom  # no longer hidden
    assert "sign in to see the fleet" in dom
    assert "cam-secret" not in dom


def test_dashboard_shows_the_audit_log_with_who_changed_what(live_server, tmp_path):
    token = live_server.admin_token
    http_json("POST", f"{live_server.url}/api/v1/devices", {"id": "cam-audit", "tags": ["dock"]}, token=token)
    dom = render(f"{live_server.url}/#/audit&token={token}", tmp_path)  # the audit log is its own page
    assert 'id="audit">' in dom  # shown to an admin
    assert "token:bootstrap (user:admin)" in dom
    assert "POST /api/v1/devices" in dom


def test_dashboard_shows_drift_scores_the_peer_outlier_the_fleet_shift_and_their_alerts(
        live_server, tmp_path, digits_models, digits_data, drift_bundle, signer):
    from test_data_fleet_drift_e2e import dead_columns, make_drift_bundle, run_fleet, upload

    live_server.services.ingest.drift.interval_s = 0.0
    shifted_bundle = make_drift_bundle(tmp_path, digits_models["mlp"], "1.1.0", digits_data, signer)
    for path, _ in (drift_bundle, shifted_bundle):
        upload(live_server, path)
    ids = run_fleet(live_server, drift_bundle, digits_models, digits_data, shift=dead_columns, shifted={3}, prefix="cam-fd")
    brighter = lambda raw: (raw * 1.6).clip(0, 16).astype("float32")  # noqa: E731
    run_fleet(live_server, shifted_bundle, digits_models, digits_data, shift=brighter, shifted=set(range(10)), prefix="cam-fs")
    token = live_server.admin_token
    wait_until(lambda: len(http_json("GET", f"{live_server.url}/api/v1/alerts?status=open", token=token)) == 2, 20,
               what="both drift alerts")
    dom = render(f"{live_server.url}/#/drift&token={token}", tmp_path)  # drift is its own page
    assert 'id="drift">' in dom  # shown once devices send sketches
    assert "digits 1.0.0: fleet ok" in dom and f"peer outliers: {ids[3]}" in dom
    assert 'class="drift-status drift-status-peer_outlier">peer outlier<' in dom
    assert "digits 1.1.0: fleet-wide shift" in dom
    assert 'class="drift-status drift-status-drifted">drifted with fleet<' in dom
    assert f"{ids[3]} is unlike its peers" in dom and "the fleet running digits 1.1.0 has shifted" in dom
