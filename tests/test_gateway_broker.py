"""The embedded broker's publish hook (edgewise.broker): what a site gateway's "stored before acknowledged" rests on."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt

from edgewise.broker import EmbeddedBroker

TOPIC = "edgewise/devices/hook-dev/telemetry/batch"


def _client(port: int) -> tuple[mqtt.Client, dict[int, float]]:
    acked: dict[int, float] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hook-dev", protocol=mqtt.MQTTv311)
    c.on_publish = lambda _c, _u, mid, *_: acked.__setitem__(mid, time.monotonic())
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c, acked


def test_every_publish_reaches_the_hook_in_order_before_the_client_gets_its_puback():
    stored: list[tuple[bytes, float]] = []

    def hook(username, topic, payload, retain):  # type: ignore[no-untyped-def]
        time.sleep(0.01)  # a slow disk: the PUBACK must still wait for it
        stored.append((payload, time.monotonic()))

    with EmbeddedBroker(port=0, on_publish=hook) as broker:
        c, acked = _client(broker.port)
        try:
            infos = [c.publish(TOPIC, str(i).encode(), qos=1) for i in range(50)]
            for info in infos:
                info.wait_for_publish(10)
        finally:
            c.disconnect()
            c.loop_stop()
    assert [p for p, _ in stored] == [str(i).encode() for i in range(50)]
    for info, (_, stored_at) in zip(infos, stored):
        assert acked[info.mid] >= stored_at


def test_a_publish_the_hook_refuses_is_never_acknowledged():
    def hook(username, topic, payload, retain):  # type: ignore[no-untyped-def]
        if payload == b"refuse":
            raise OSError("disk full")

    with EmbeddedBroker(port=0, on_publish=hook) as broker:
        c, acked = _client(broker.port)
        try:
            refused = c.publish(TOPIC, b"refuse", qos=1)
            fine = c.publish(TOPIC, b"fine", qos=1)
            fine.wait_for_publish(10)
            time.sleep(0.3)
            assert fine.mid in acked and refused.mid not in acked
        finally:
            c.disconnect()
            c.loop_stop()


def test_a_will_fired_for_a_vanished_client_goes_through_the_hook():
    got = threading.Event()
    seen: list[tuple[str, bytes, bool]] = []

    def hook(username, topic, payload, retain):  # type: ignore[no-untyped-def]
        seen.append((topic, payload, retain))
        if payload == b"offline":
            got.set()

    with EmbeddedBroker(port=0, on_publish=hook) as broker:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hook-dev", protocol=mqtt.MQTTv311)
        c.will_set("edgewise/devices/hook-dev/state", b"offline", qos=1, retain=True)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.publish(TOPIC, b"x", qos=1).wait_for_publish(10)
        c._sock.close()  # noqa: SLF001 - vanish without DISCONNECT, like a power cut
        c.loop_stop()
        assert got.wait(10)
    assert ("edgewise/devices/hook-dev/state", b"offline", True) in seen
