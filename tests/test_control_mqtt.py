"""The control plane on real brokers: embedded amqtt and Mosquitto, real paho clients as devices."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgewise import protocol as p
from edgewise.control import ControlPlane, ServerSettings
from edgewise.control.broker import EmbeddedBroker, MqttBus


def _hostport(url):
    u = urlsplit(url)
    return u.hostname, u.port


def _client(url, name="test"):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(3)}", protocol=mqtt.MQTTv311)
    c.connect(*_hostport(url))
    c.loop_start()
    return c


def publish(url, topic, payload, *, retain=False):
    c = _client(url, "device")
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()  # first: it wakes paho's network loop, so loop_stop() returns at once
        c.loop_stop()


def fresh_subscriber_receives(url, topic, timeout=5.0):
    """What a device connecting right now would get on ``topic``: (payload, retain flag) or None."""
    got: list[mqtt.MQTTMessage] = []
    ev = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(3)}", protocol=mqtt.MQTTv311)
    c.on_connect = lambda cl, *_: cl.subscribe(topic, 1)
    c.on_message = lambda _c, _u, m: (got.append(m), ev.set())
    c.connect(*_hostport(url))
    c.loop_start()
    try:
        ev.wait(timeout)
    finally:
        c.disconnect()  # first: it wakes paho's network loop, so loop_stop() returns at once
        c.loop_stop()
    return (got[0].payload, got[0].retain) if got else None


def retained_on_broker(url, topic, timeout=5.0):
    """The retained payload on ``topic``. A probe that subscribes while the publish is in flight
    gets it live (retain flag unset); the next probe then sees the retained copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fresh_subscriber_receives(url, topic, timeout=max(0.1, deadline - time.monotonic()))
        if got is not None and got[1]:
            return got[0]
    return None


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _auth(cp):
    return {"Authorization": f"Bearer {cp.admin_token}"}


def api(cp, method, path, json=None):
    r = httpx.request(method, cp.url + path, json=json, timeout=10, headers=_auth(cp))
    assert r.status_code < 400, r.text
    return r.json()


def get_or_none(cp, path):
    r = httpx.get(cp.url + path, timeout=10, headers=_auth(cp))
    return r.json() if r.status_code == 200 else None


def upload(cp, path):
    r = httpx.post(cp.url + "/api/v1/models", content=path.read_bytes(),
                   headers={"Content-Type": "application/octet-stream", **_auth(cp)}, timeout=30)
    assert r.status_code in (200, 201), r.text


@pytest.fixture(params=["embedded", "mosquitto"])
def cp(request, tmp_path, keys_dir, bundles):
    """A running control plane on the embedded broker or on Mosquitto, digits 1.0.0 and 1.1.0 uploaded."""
    broker_url = request.getfixturevalue("mosquitto") if request.param == "mosquitto" else None
    # raw paho clients play devices here without logging in: the bus is under test, not broker access control
    # (that is tests/test_security_identity*.py), so the embedded broker runs in its laptop mode
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, broker_url=broker_url,
                              trust=[keys_dir / "signing.pub"], embedded_broker_auth="open")
    with ControlPlane(settings) as plane:
        for path in bundles.values():
            upload(plane, path)
        yield plane


@pytest.fixture()
def embedded_cp(tmp_path, keys_dir, bundles):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"],
                              embedded_broker_auth="open")  # raw paho clients play devices (see ``cp``)
    with ControlPlane(settings) as plane:
        upload(plane, bundles["1.0.0"])
        yield plane


def uid(prefix):
    # The Mosquitto fixture is shared by the session: unique ids keep retained messages apart.
    return f"{prefix}-{secrets.token_hex(4)}"


# -- brokers ---------------------------------------------------------------------------------------


def test_embedded_broker_keeps_retained_messages_for_later_subscribers():
    with EmbeddedBroker(port=0) as broker:
        publish(broker.url, "edgewise/devices/d1/desired", b"hello", retain=True)
        assert fresh_subscriber_receives(broker.url, "edgewise/devices/d1/desired") == (b"hello", True)


def test_embedded_broker_on_a_taken_port_fails_saying_what_to_do():
    with EmbeddedBroker(port=0) as first:
        with pytest.raises(RuntimeError, match="broker_url=mqtt://127.0.0.1:.*embedded_broker_port"):
            EmbeddedBroker(port=first.port).start()


def test_bus_reconnects_and_resubscribes_after_the_broker_restarts():
    broker = EmbeddedBroker(port=0)
    broker.start()
    port = broker.port
    received: list[str] = []
    bus = MqttBus(broker.url, lambda topic, _payload: received.append(topic))
    bus.start()
    try:
        assert bus.wait_connected(5)
        broker.stop()
        wait_for(lambda: not bus.connected, 5, "the bus to notice")
        broker = EmbeddedBroker(port=port)
        broker.start()
        assert bus.wait_connected(15)
        publish(broker.url, p.topics.state("d1"), b"x")
        wait_for(lambda: received, 5, "a message after the reconnect")
    finally:
        bus.stop()
        broker.stop()


# -- desired state ---------------------------------------------------------------------------------


def test_deploying_to_a_device_publishes_a_retained_desired_state(cp, bundles):
    dev = uid("cam")
    api(cp, "POST", "/api/v1/devices", {"id": dev})
    api(cp, "POST", "/api/v1/deployments", {"model": "digits", "version": "1.1.0", "device_id": dev})
    payload = retained_on_broker(cp.broker_url, p.topics.desired(dev))
    assert payload is not None, "no retained desired state on the broker"
    state = p.decode(payload)
    assert isinstance(state, p.DesiredState)
    assert (state.device_id, state.model, state.version, state.generation) == (dev, "digits", "1.1.0", 1)
    assert state.artifact.url == "/api/v1/models/digits/1.1.0/bundle"
    assert state.artifact.size == bundles["1.1.0"].stat().st_size


def test_deploying_to_a_tag_publishes_to_every_tagged_device(cp):
    tag, devs = uid("ring"), [uid("cam"), uid("cam")]
    for d in devs:
        api(cp, "POST", "/api/v1/devices", {"id": d, "tags": [tag]})
    api(cp, "POST", "/api/v1/deployments", {"model": "digits", "version": "1.0.0", "tag": tag})
    for d in devs:
        payload = retained_on_broker(cp.broker_url, p.topics.desired(d))
        assert payload is not None, f"no retained desired state for {d}"
        assert p.decode(payload).version == "1.0.0"


def test_a_device_reporting_an_older_generation_gets_its_desired_state_again(embedded_cp):
    cp = embedded_cp
    api(cp, "POST", "/api/v1/devices", {"id": "cam-1"})
    api(cp, "POST", "/api/v1/deployments", {"model": "digits", "version": "1.0.0", "device_id": "cam-1"})
    publish(cp.broker_url, p.topics.desired("cam-1"), b"", retain=True)  # the broker lost it
    wait_for(lambda: fresh_subscriber_receives(cp.broker_url, p.topics.desired("cam-1"), timeout=0.3) is None, 5,
             "the retained desired state to be cleared")
    publish(cp.broker_url, p.topics.state("cam-1"), p.encode(p.DeviceState(device_id="cam-1", generation=0)))
    payload = retained_on_broker(cp.broker_url, p.topics.desired("cam-1"), 10)
    assert payload is not None and p.decode(payload).generation == 1


def test_restarted_control_plane_republishes_desired_states_to_its_new_embedded_broker(tmp_path, keys_dir, bundles):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"],
                              embedded_broker_auth="open")  # raw paho clients play devices (see ``cp``)
    with ControlPlane(settings) as cp:
        upload(cp, bundles["1.0.0"])
        api(cp, "POST", "/api/v1/devices", {"id": "cam-1"})
        api(cp, "POST", "/api/v1/deployments", {"model": "digits", "version": "1.0.0", "device_id": "cam-1"})
    with ControlPlane(settings) as cp:  # amqtt keeps retained messages in memory only
        payload = retained_on_broker(cp.broker_url, p.topics.desired("cam-1"))
        assert payload is not None and p.decode(payload).generation == 1


def test_control_plane_settings_name_the_resolved_ports_after_start(embedded_cp):
    s = embedded_cp.settings
    assert s.port != 0 and s.embedded_broker_port != 0
    assert s.effective_broker_url == embedded_cp.broker_url
    assert embedded_cp.url == f"http://127.0.0.1:{s.port}"


# -- ingest over the bus ---------------------------------------------------------------------------


def test_state_and_telemetry_published_by_a_device_show_up_in_the_api(cp):
    dev = uid("cam")
    publish(cp.broker_url, p.topics.state(dev),
            p.encode(p.DeviceState(device_id=dev, model="digits", version="1.0.0", tags=["shelf-3"])), retain=True)
    tel = p.Telemetry(device_id=dev, seq=0, ts=time.time(), window_inferences=60, window_s=10.0, latency_p95_ms=0.125)
    publish(cp.broker_url, p.topics.telemetry(dev), p.encode(p.Batch(device_id=dev, items=[tel])))
    device = wait_for(lambda: (d := get_or_none(cp, f"/api/v1/devices/{dev}")) and d["telemetry"] and d, 10,
                      "the device and its telemetry")
    assert device["tags"] == ["shelf-3"] and device["status"] == "online" and device["version"] == "1.0.0"
    assert device["telemetry"]["inference_rate"] == pytest.approx(6.0)
    assert device["telemetry"]["latency_p95_ms"] == pytest.approx(0.125)
    assert (device["inference_rate"], device["latency_p95_ms"]) == (pytest.approx(6.0), pytest.approx(0.125))
    latest = api(cp, "GET", "/api/v1/telemetry/latest")
    assert dev in [t["device_id"] for t in latest]


def test_bad_messages_are_counted_logged_and_do_not_stop_the_bus(embedded_cp, caplog):
    cp = embedded_cp
    caplog.set_level(logging.WARNING, logger="edgewise.control.ingest")
    topic = p.topics.telemetry("cam-1")
    publish(cp.broker_url, topic, b"\x00\xff garbage")
    publish(cp.broker_url, topic, p.encode(p.Batch(device_id="cam-2", items=[p.Telemetry(device_id="cam-2", seq=1, ts=1.0)])))
    publish(cp.broker_url, topic, p.encode(p.Batch(device_id="cam-1", items=[p.Telemetry(device_id="cam-1", seq=1, ts=1.0)])))
    stats = wait_for(lambda: (s := api(cp, "GET", "/api/v1/stats"))["ingest"]["telemetry_rows"] == 1 and s, 10,
                     "the valid message after the bad ones")
    assert stats["ingest"]["bad"] == 2
    assert stats["ingest"]["bad_by_reason"] == {"undecodable": 1, "device_mismatch": 1}
    assert caplog.text.count(topic) >= 2
    assert api(cp, "GET", "/api/v1/health")["mqtt"]["connected"]


def test_redelivered_batch_over_mqtt_is_stored_once(embedded_cp):
    cp = embedded_cp
    batch = p.encode(p.Batch(device_id="cam-1", items=[
        p.Telemetry(device_id="cam-1", seq=i, ts=float(i)) for i in range(3)
    ] + [p.Event(device_id="cam-1", seq=3, ts=3.0, kind="update", message="ok")]))
    for _ in range(2):
        publish(cp.broker_url, p.topics.telemetry("cam-1"), batch)
    stats = wait_for(lambda: (s := api(cp, "GET", "/api/v1/stats"))["ingest"]["duplicates"] == 4 and s, 10,
                     "the second copy")
    assert stats["stored"] == {"telemetry": 3, "events": 1, "summaries": 0}
    assert [e["kind"] for e in api(cp, "GET", "/api/v1/devices/cam-1/events")] == ["update"]
    assert [t["seq"] for t in api(cp, "GET", "/api/v1/devices/cam-1/telemetry?limit=2")] == [1, 2]
