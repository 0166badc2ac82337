"""Ingest in batches (issue 7 figures, issue 9 scale): one transaction per batch, acknowledged to the broker only
once stored, nothing lost when the control plane dies mid-batch. Real Mosquitto, real SQLite."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt

from edgewise import protocol as p
from edgewise.control.bus import MqttBus
from edgewise.control.db import init_db
from edgewise.control.ingest import Ingest
from edgewise.control.models import TelemetryRow


def _batch(dev: str, seqs: range) -> bytes:
    return p.encode(p.Batch(device_id=dev, items=[p.Telemetry(device_id=dev, seq=s, ts=time.time()) for s in seqs]))


def _count(db, dev: str) -> int:
    with db.session() as s:
        return s.query(TelemetryRow).filter(TelemetryRow.device_id == dev).count()


def _publish(url: str, msgs: list[tuple[str, bytes]]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    c.connect(host, int(port))
    c.loop_start()
    for topic, payload in msgs:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_handle_many_stores_messages_of_many_devices_in_one_call_and_counts_each(db_url):
    db = init_db(db_url)
    ingest = Ingest(db)
    devs = [f"batch-{i}" for i in range(5)]
    assert ingest.handle_many([(p.topics.telemetry(d), _batch(d, range(1, 4))) for d in devs] + [("not/a/topic", b"x")])
    assert [_count(db, d) for d in devs] == [3] * 5
    st = ingest.stats()
    assert st.telemetry_rows == 15 and st.messages == 6 and st.bad_by_reason == {"bad_topic": 1}


def test_a_message_the_database_refuses_costs_only_itself(db_url, monkeypatch):
    db = init_db(db_url)
    ingest = Ingest(db)
    real = Ingest._on_records

    def refuse_boom(self, session, msg):
        if msg.device_id == "boom":
            raise RuntimeError("disk I/O error")  # what SQLite says when the disk goes bad under one insert
        return real(self, session, msg)

    monkeypatch.setattr(Ingest, "_on_records", refuse_boom)
    ok = ingest.handle_many([(p.topics.telemetry(d), _batch(d, range(1, 3))) for d in ("good-1", "boom", "good-2")])
    assert ok and _count(db, "good-1") == 2 and _count(db, "good-2") == 2 and ingest.stats().errors == 1


def test_a_batch_is_acknowledged_only_once_stored_so_a_control_plane_killed_mid_batch_loses_nothing(db_url, mosquitto):
    db = init_db(db_url)
    ingest = Ingest(db)
    dev = f"kill-{uuid.uuid4().hex[:6]}"
    client_id = f"cp-{uuid.uuid4().hex[:6]}"
    blocked, release = threading.Event(), threading.Event()

    def stuck(messages):  # the first control plane receives the messages but dies before storing them
        blocked.set()
        release.wait(10)
        return False

    first = MqttBus(mosquitto, ingest.handle, on_batch=stuck, client_id=client_id, persistent=True)
    first.start()
    assert first.wait_connected(10)
    _publish(mosquitto, [(p.topics.telemetry(dev), _batch(dev, range(s, s + 10))) for s in range(1, 101, 10)])
    assert blocked.wait(10)
    first._started = False  # as if killed: no retries, no acks, the socket just goes away
    first._client.disconnect()
    first._client.loop_stop()
    release.set()
    assert _count(db, dev) == 0

    second = MqttBus(mosquitto, ingest.handle, on_batch=ingest.handle_many, client_id=client_id, persistent=True)
    second.start()
    try:
        assert _wait(lambda: _count(db, dev) == 100), f"stored {_count(db, dev)} of 100 after the restart"
        assert second.batches >= 1 and second.lost == 0
    finally:
        second.stop()


def test_a_batch_the_database_refuses_for_a_while_is_retried_then_stored_once(db_url, mosquitto):
    db = init_db(db_url)
    ingest = Ingest(db)
    dev = f"retry-{uuid.uuid4().hex[:6]}"
    calls = {"n": 0}

    def flaky(messages):
        calls["n"] += 1
        return False if calls["n"] <= 2 else ingest.handle_many(messages)

    bus = MqttBus(mosquitto, ingest.handle, on_batch=flaky, client_id=f"cp-{uuid.uuid4().hex[:6]}", persistent=True)
    bus.start()
    try:
        assert bus.wait_connected(10)
        _publish(mosquitto, [(p.topics.telemetry(dev), _batch(dev, range(1, 6)))])
        assert _wait(lambda: _count(db, dev) == 5)
        time.sleep(0.5)
        assert calls["n"] >= 3 and bus.lost == 0 and ingest.stats().duplicates == 0 and _count(db, dev) == 5
    finally:
        bus.stop()


def _state(dev: str, ts: float, status: str = "online", version: str = "1.0.0") -> tuple[str, bytes]:
    return p.topics.state(dev), p.encode(p.DeviceState(device_id=dev, status=status, model="m", version=version, ts=ts))


def _device(db, dev: str):
    from edgewise.control.models import Device

    with db.session() as s:
        return s.get(Device, dev)


def test_an_older_state_stored_after_a_newer_one_is_not_applied(db_url):
    db = init_db(db_url)
    ingest = Ingest(db)
    t = time.time()
    ingest.handle_many([_state("order-1", t, "online", "2.0.0")])
    ingest.handle_many([_state("order-1", t - 5, "updating", "1.0.0")])  # committed by another worker, later
    d = _device(db, "order-1")
    assert (d.status, d.version) == ("online", "2.0.0") and ingest.stats().stale_states == 1


def test_the_brokers_last_will_is_applied_though_it_carries_the_time_of_the_connect(db_url):
    db = init_db(db_url)
    ingest = Ingest(db)
    t = time.time()
    ingest.handle_many([_state("order-2", t, "online")])
    ingest.handle_many([_state("order-2", t - 600, "offline")])  # the will was written when the device connected
    assert _device(db, "order-2").status == "offline" and ingest.stats().stale_states == 0
