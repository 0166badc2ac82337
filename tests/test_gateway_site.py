"""Site gateway end to end: a real control plane, a cuttable uplink, a gateway, two real agents of the site."""

from __future__ import annotations

import time
import uuid

import pytest
from test_agent_support import wait_for
from test_gateway_support import (
    Uplink,
    assert_exactly_once,
    device_known,
    drained,
    gateway_config,
    site_agent,
    start_control_plane,
    stored_seqs,
)

from edgewise.agent.gateway import Gateway
from edgewise.sim.fleet import http_json


@pytest.fixture()
def site(tmp_path, keys_dir, bundles):
    cp = start_control_plane(tmp_path, keys_dir, bundles)
    uplink = Uplink(cp)
    ids = [f"gw-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    gw = Gateway(gateway_config(tmp_path / "gateway", uplink, ids, api_token=cp.admin_token)).start()
    agents: list = []
    yield cp, uplink, gw, ids, agents
    for a in agents:
        a.stop()
    gw.stop()
    uplink.close()
    cp.stop()


def test_telemetry_of_site_devices_reaches_the_control_plane_through_the_gateway(site, tmp_path, keys_dir, bundles):
    cp, uplink, gw, ids, agents = site
    for d in ids[:2]:
        agents.append(site_agent(tmp_path, keys_dir, cp, gw.mqtt_url, gw.http_url, d, bundles["1.0.0"]))
    for d in ids[:2]:
        dev = wait_for(lambda d=d: (x := device_known(cp, d)) and x.get("version") == "1.0.0" and x, 30,
                       what=f"{d} registered with its version at the control plane")
        assert dev["status"] == "online"
        wait_for(lambda d=d: len(stored_seqs(cp, d)) >= 3, 30, what=f"telemetry of {d} stored")
    assert gw.health()["forwarded"] > 0 and gw.uplink_up


def test_with_the_uplink_cut_devices_keep_serving_the_gateway_buffers_and_afterwards_everything_arrives_once(
    site, tmp_path, keys_dir, bundles, digits_data
):
    cp, uplink, gw, ids, agents = site
    for d in ids[:2]:
        agents.append(site_agent(tmp_path, keys_dir, cp, gw.mqtt_url, gw.http_url, d, bundles["1.0.0"]))
    for a, d in zip(agents, ids):
        wait_for(lambda d=d: len(stored_seqs(cp, d)) >= 2, 30, what=f"telemetry of {d} before the cut")

    uplink.cut()
    wait_for(lambda: not gw.uplink_up, 30, what="the gateway to see the uplink down")
    pending_at_cut = gw.health()["pending"]
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # the site works: predictions, and the gateway takes every record
        for a in agents:
            assert a.predict(digits_data.x_test[:1]) and a.health()["version"] == "1.0.0"
        time.sleep(0.1)
    for a in agents:
        h = wait_for(drained(a), 20, what="each device's outbox acknowledged by the gateway during the cut")
        assert h["connected"]
    assert gw.health()["pending"] >= pending_at_cut + 10  # held at the site

    uplink.restore()
    wait_for(lambda: gw.uplink_up and gw.health()["pending"] == 0, 30, what="the gateway to forward its backlog")
    for a, d in zip(agents, ids):
        stats = assert_exactly_once(cp, a, d)
        assert stats["stored"] >= 10, stats


@pytest.mark.parametrize("trust", ["signature-only", "tuf"])
def test_a_deployment_cached_before_the_cut_installs_on_a_site_device_during_the_cut(
    site, tmp_path, keys_dir, bundles, trust
):
    cp, uplink, gw, ids, agents = site
    tuf = trust == "tuf"  # a TUF device also needs the signed metadata: the gateway mirrors it as last seen
    late = ids[2]  # a device of the site (it has logged in to the gateway once) that is off when the deployment is made
    first = site_agent(tmp_path, keys_dir, cp, gw.mqtt_url, gw.http_url, late, tuf=tuf)
    wait_for(lambda: device_known(cp, late), 30, what="the late device to register through the gateway")
    first.stop()
    http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.1.0", "device_id": late},
              token=cp.admin_token)
    wait_for(lambda: gw.health()["artifacts_fetched"] >= 1, 30, what="the gateway to prefetch the deployed bundle")
    if tuf:
        wait_for(lambda: (tmp_path / "gateway" / "tuf" / "timestamp.json").exists(), 30,
                 what="the gateway to mirror the TUF metadata naming the deployed target")

    uplink.cut()
    wait_for(lambda: not gw.uplink_up, 30, what="the gateway to see the uplink down")
    agent = site_agent(tmp_path, keys_dir, cp, gw.mqtt_url, gw.http_url, late, tuf=tuf)  # switched on; no model yet
    agents.append(agent)
    h = wait_for(lambda: (x := agent.health())["version"] == "1.1.0" and x["last_update"] and x, 60,
                 what="the late device to install 1.1.0 from the gateway's cache while the uplink is down")
    assert h["last_update"]["result"] == "ok"
    assert not gw.uplink_up

    uplink.restore()
    wait_for(lambda: (x := device_known(cp, late)) and x.get("version") == "1.1.0", 30,
             what="the control plane to learn the late device's version once the uplink is back")


def _login(mqtt_url: str, device: str, password: str) -> bool:
    """Does the site broker accept this device id + token? (a real MQTT CONNECT)"""
    import threading
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt

    answer: dict = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
    c.username_pw_set(device, password)
    c.on_connect = lambda *a: (answer.setdefault("reason", a[3]), done.set())
    c.on_disconnect = lambda *a: done.set()
    u = urlsplit(mqtt_url)
    c.connect(u.hostname, u.port)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return not getattr(answer.get("reason"), "is_failure", True)
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_site_accepts_only_its_own_devices_with_live_device_tokens(site):
    import urllib.error
    import urllib.request

    cp, uplink, gw, ids, agents = site
    stranger = f"gw-stranger-{uuid.uuid4().hex[:6]}"  # a real device of the fleet, but not of this site
    assert not _login(gw.mqtt_url, ids[0], "ewd_not-a-token")
    assert not _login(gw.mqtt_url, stranger, cp.issue_device_token(stranger))
    token = cp.issue_device_token(ids[0])
    assert _login(gw.mqtt_url, ids[0], token)
    http_json("DELETE", f"{cp.url}/api/v1/devices/{ids[0]}/token", token=cp.admin_token)  # revoked upstream
    gw.tokens.recheck_s = 0  # (default 300 s) ask the control plane again at the next login
    assert not _login(gw.mqtt_url, ids[0], token)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(gw.http_url + "/api/v1/models/digits/1.0.0/bundle", timeout=10)
    assert err.value.code == 401 and "device token" in err.value.read().decode()
