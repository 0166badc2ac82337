"""Ingest and deployments as plain functions over a real SQLite database (no HTTP, no broker)."""

from __future__ import annotations

import logging
import shutil

import msgpack
import pytest
from sqlalchemy import func, select

from edgewise import protocol as p
from edgewise.control.db import init_db
from edgewise.control.deployments import deploy, desired_state
from edgewise.control.devices import get_device, register_device
from edgewise.control.errors import DeviceNotFoundError, ModelNotFoundError, NotFoundError
from edgewise.control.ingest import Ingest
from edgewise.control.models import EventRow, TelemetryRow
from edgewise.control.registry import Registry
from edgewise.control.telemetry import latest_per_device, series


@pytest.fixture()
def db(tmp_path, db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


@pytest.fixture()
def ingest(db):
    return Ingest(db)


def _tel(device, seq, **kw):
    return p.Telemetry(device_id=device, seq=seq, ts=1000.0 + seq, **kw)


def _count(db, table):
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(table))


def test_first_state_registers_an_unknown_device_with_its_tags(ingest, db):
    state = p.DeviceState(device_id="cam-1", status="online", model="digits", version="1.0.0", generation=0,
                          tags=["shelf-3", "ring-canary"], agent_version="0.1.0", api_url="http://10.0.0.5:8081")
    ingest.handle(p.topics.state("cam-1"), p.encode(state))
    with db.session() as s:
        d = get_device(s, "cam-1")
        assert d.tags == ["shelf-3", "ring-canary"]
        assert (d.status, d.model, d.version, d.api_url) == ("online", "digits", "1.0.0", "http://10.0.0.5:8081")
        assert d.last_seen is not None
    assert ingest.stats().states == 1


def test_later_states_update_status_but_not_operator_tags(ingest, db):
    with db.session() as s:
        register_device(s, "cam-1", ["site-a"])
    ingest.handle(p.topics.state("cam-1"), p.encode(p.DeviceState(device_id="cam-1", status="degraded", tags=["x"])))
    with db.session() as s:
        d = get_device(s, "cam-1")
        assert (d.status, d.tags) == ("degraded", ["site-a"])


def test_offline_last_will_marks_the_device_offline_without_counting_as_seen(ingest, db):
    ingest.handle(p.topics.state("cam-1"), p.encode(p.DeviceState(device_id="cam-1", status="online")))
    with db.session() as s:
        seen = get_device(s, "cam-1").last_seen
    ingest.handle(p.topics.state("cam-1"), p.encode(p.DeviceState(device_id="cam-1", status="offline")))
    with db.session() as s:
        d = get_device(s, "cam-1")
        assert d.status == "offline" and d.last_seen == seen


def test_a_batch_of_telemetry_and_events_stores_one_row_each(ingest, db):
    batch = p.Batch(device_id="cam-1", items=[
        _tel("cam-1", 1, window_inferences=50, window_s=10.0, latency_p95_ms=2.5),
        _tel("cam-1", 2, window_inferences=80, window_s=10.0, latency_p95_ms=3.0),
        p.Event(device_id="cam-1", seq=3, ts=1003.0, kind="update", severity="error", message="rolled back",
                detail={"reason": "golden mismatch"}),
    ])
    ingest.handle(p.topics.telemetry("cam-1"), p.encode(batch))
    assert _count(db, TelemetryRow) == 2 and _count(db, EventRow) == 1
    with db.session() as s:
        latest = latest_per_device(s)["cam-1"]
        assert (latest.seq, latest.latency_p95_ms) == (2, 3.0)
        assert [r.seq for r in series(s, "cam-1")] == [1, 2]
    st = ingest.stats()
    assert (st.telemetry_rows, st.event_rows, st.duplicates, st.bad) == (2, 1, 0, 0)


def test_single_telemetry_and_event_messages_are_stored_too(ingest, db):
    ingest.handle(p.topics.telemetry("cam-1", "sample"), p.encode(_tel("cam-1", 7)))
    ingest.handle(p.topics.events("cam-1", "alert"), p.encode(p.Event(device_id="cam-1", seq=8, ts=1.0, kind="drift")))
    assert _count(db, TelemetryRow) == 1 and _count(db, EventRow) == 1


def test_redelivered_record_with_the_same_device_and_seq_is_stored_once(ingest, db):
    payload = p.encode(p.Batch(device_id="cam-1", items=[_tel("cam-1", 1), _tel("cam-1", 2)]))
    ingest.handle(p.topics.telemetry("cam-1"), payload)
    ingest.handle(p.topics.telemetry("cam-1"), payload)
    assert _count(db, TelemetryRow) == 2
    assert ingest.stats().duplicates == 2


def test_same_seq_from_two_devices_are_different_records(ingest, db):
    for dev in ("cam-1", "cam-2"):
        ingest.handle(p.topics.telemetry(dev), p.encode(p.Batch(device_id=dev, items=[_tel(dev, 1)])))
    assert _count(db, TelemetryRow) == 2


@pytest.mark.parametrize(
    "topic, payload, reason",
    [
        ("edgewise/devices/cam-1/telemetry/batch", b"\xc1\xc1 not msgpack", "undecodable"),
        ("edgewise/devices/cam-1/telemetry/batch", p.encode(_tel("cam-2", 1)), "device_mismatch"),
        ("edgewise/devices/cam-1/state", p.encode(_tel("cam-1", 1)), "wrong_channel"),
        ("edgewise/devices/cam-1/telemetry/batch", msgpack.packb({"type": "telemetry", "device_id": "cam-1"}),
         "invalid_fields"),
        ("edgewise/devices/cam+1/state", b"x", "bad_topic"),
    ],
    ids=["garbage", "other-device", "wrong-channel", "missing-fields", "bad-topic"],
)
def test_bad_messages_are_counted_by_reason_and_logged_with_their_topic(ingest, db, caplog, topic, payload, reason):
    caplog.set_level(logging.WARNING, logger="edgewise.control.ingest")
    ingest.handle(topic, payload)  # must not raise
    st = ingest.stats()
    assert st.bad == 1 and st.bad_by_reason == {reason: 1}
    assert topic in caplog.text
    assert _count(db, TelemetryRow) == 0


def test_a_failing_database_is_counted_and_does_not_raise(tmp_path, db_url, caplog):
    db = init_db(db_url)
    ingest = Ingest(db)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE telemetry")
    ingest.handle(p.topics.telemetry("cam-1"), p.encode(p.Batch(device_id="cam-1", items=[_tel("cam-1", 1)])))
    assert ingest.stats().errors == 1
    assert "failed to store" in caplog.text


# -- deployments (recorded; publishing is covered with real brokers in test_control_mqtt.py) --------


@pytest.fixture()
def stored(db, tmp_path, trusted, bundles):
    registry = Registry(tmp_path / "bundles", trusted)
    with db.session() as s:
        for v, path in bundles.items():
            copy = tmp_path / f"up-{v}.ewb"
            shutil.copyfile(path, copy)
            registry.store(s, copy)
    return registry


def test_each_deployment_bumps_the_device_generation_and_records_the_artifact(db, stored, bundles):
    with db.session() as s:
        register_device(s, "cam-1")
        first = deploy(s, None, "digits", "1.0.0", device_id="cam-1")
        second = deploy(s, None, "digits", "1.1.0", device_id="cam-1")
        state = desired_state(get_device(s, "cam-1"))
    assert [first.states[0].generation, second.states[0].generation] == [1, 2]
    assert state is not None and (state.model, state.version, state.generation) == ("digits", "1.1.0", 2)
    assert state.artifact is not None and state.artifact.url == "/api/v1/models/digits/1.1.0/bundle"
    assert state.artifact.size == bundles["1.1.0"].stat().st_size


def test_tag_deployment_reaches_the_devices_that_have_the_tag_now(db, stored):
    with db.session() as s:
        register_device(s, "a", ["lab"])
        register_device(s, "b", ["lab", "x"])
        register_device(s, "c", ["field"])
        result = deploy(s, None, "digits", "1.0.0", tag="lab")
        register_device(s, "d", ["lab"])  # tagged later: not part of that deployment
        assert result.deployment.device_ids == ["a", "b"] and result.deployment.device_count == 2
        assert desired_state(get_device(s, "c")) is None and desired_state(get_device(s, "d")) is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": "digits", "version": "9.9.9", "device_id": "cam-1"}, ModelNotFoundError, "digits 9.9.9 not found"),
        ({"model": "digits", "version": "1.0.0", "device_id": "ghost"}, DeviceNotFoundError, "'ghost' is not registered"),
        ({"model": "digits", "version": "1.0.0", "tag": "nobody"}, NotFoundError, "no registered device has tag 'nobody'"),
    ],
)
def test_deploying_to_something_missing_names_it(db, stored, kwargs, error, match):
    with db.session() as s:
        register_device(s, "cam-1")
        with pytest.raises(error, match=match):
            deploy(s, None, **kwargs)
