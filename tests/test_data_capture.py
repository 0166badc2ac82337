"""Sample capture on the device: policies, budget, switches, the outbox's `sample` priority, ingest and export.

Real agents (real bundles, ONNX Runtime, sealed SQLite), a real outbox, a real control-plane database.
"""

from __future__ import annotations

import io
import uuid

import msgpack
import numpy as np
import pytest

from test_agent_support import make_agent
from edgewise.agent.capture import CapturePolicy, CaptureError, SampleStore, sample_value
from edgewise.agent.outbox import PRIORITY_SAMPLE, PRIORITY_TELEMETRY, Outbox, drain_once
from edgewise.lab.demo_model import PREPROCESSING
from edgewise.protocol import DesiredState, Event, Sample, SampleArray, Telemetry, decode_for_topic, encode, topics
from edgewise.protocol.messages import Batch


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _agent(tmp_path, keys_dir, bundles, **capture):
    settings = dict(capture=True, capture_destination="local", capture_low_confidence=0.0,
                    capture_random_fraction=0.0, capture_drift_window=0, capture_seed=7)
    settings.update(capture)
    agent = make_agent(tmp_path / "dev", keys_dir, device_id=_id("cap"), **settings)
    agent.install(bundles["1.0.0"])
    return agent


def _serve(agent, x) -> tuple[np.ndarray, np.ndarray]:
    """Serve each row alone; return every row's top-1 score and the preprocessed rows (what the model got)."""
    conf = []
    for i in range(len(x)):
        out = agent.predict(x[i : i + 1])
        conf.append(float(out["probabilities"].max()))
    return np.array(conf), PREPROCESSING.apply(x).astype(np.float32)


def _stored(agent) -> list[Sample]:
    return [s for _, s in agent.capture.sink.samples()]


def _row_of(sample: Sample) -> np.ndarray:
    (arr,) = [a.array() for a in sample.inputs]
    return arr


# -- policies --------------------------------------------------------------------------------------


def test_low_confidence_policy_captures_exactly_the_rows_below_the_threshold(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_low_confidence=0.9)
    try:
        conf, served = _serve(agent, digits_data.x_test[:120])
        expected = np.flatnonzero(conf < 0.9)
        assert 0 < len(expected) < 120  # the test means something: some rows on each side
        got = _stored(agent)
        assert [s.reason for s in got] == ["low_confidence"] * len(expected)
        np.testing.assert_array_equal(np.concatenate([_row_of(s) for s in got]), served[expected])
        np.testing.assert_allclose([s.confidence for s in got], conf[expected], rtol=1e-6)
        assert all(s.model == "digits" and s.version == "1.0.0" and s.device_id == agent.device_id for s in got)
    finally:
        agent.stop()


def test_random_fraction_with_a_fixed_seed_captures_the_rows_its_draws_pick(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_random_fraction=0.1, capture_seed=1234)
    try:
        _, served = _serve(agent, digits_data.x_test[:300])
        picked = np.flatnonzero(np.random.default_rng(1234).random(300) < 0.1)
        got = _stored(agent)
        assert [s.reason for s in got] == ["random"] * len(picked) and 15 < len(picked) < 45
        np.testing.assert_array_equal(np.concatenate([_row_of(s) for s in got]), served[picked])
    finally:
        agent.stop()


def test_a_drift_mark_captures_the_window_before_it_and_the_window_after_it_and_nothing_else(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_drift_window=5)
    try:
        x = digits_data.x_test[:40]
        _serve(agent, x[:20])
        assert _stored(agent) == []  # no policy fired yet: the ring buffer holds rows, the store none
        assert agent.capture.mark_drift() == 5
        assert agent.capture.drifting
        _serve(agent, x[20:40])
        assert not agent.capture.drifting
        got = _stored(agent)
        served = PREPROCESSING.apply(x).astype(np.float32)
        assert [s.reason for s in got] == ["drift"] * 10
        np.testing.assert_array_equal(np.concatenate([_row_of(s) for s in got]), served[list(range(15, 25))])
    finally:
        agent.stop()


def test_rows_of_a_batch_are_captured_one_sample_each_with_the_batch_axis_kept(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_random_fraction=1.0)
    try:
        x = digits_data.x_test[:7]
        agent.predict(x)
        got = _stored(agent)
        assert len(got) == 7 and all(_row_of(s).shape == (1, 64) and _row_of(s).dtype == np.float32 for s in got)
        np.testing.assert_array_equal(np.concatenate([_row_of(s) for s in got]), PREPROCESSING.apply(x).astype(np.float32))
    finally:
        agent.stop()


# -- switches ----------------------------------------------------------------------------------------


def test_capture_off_in_the_device_config_captures_nothing(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "dev", keys_dir, device_id=_id("cap-off"), capture_random_fraction=1.0)
    try:
        agent.install(bundles["1.0.0"])
        _serve(agent, digits_data.x_test[:30])
        assert agent.capture is None and agent.health()["capture"] is None
        assert agent.outbox.priority_bytes(PRIORITY_SAMPLE) == 0
        assert not (agent.state_dir / "samples.db").exists()
    finally:
        agent.stop()


def test_capture_switched_off_for_the_group_by_the_desired_state_captures_nothing_until_allowed_again(
    tmp_path, keys_dir, bundles, digits_data
):
    agent = _agent(tmp_path, keys_dir, bundles, capture_random_fraction=1.0, capture_drift_window=4)
    try:
        agent._on_desired(DesiredState(device_id=agent.device_id, generation=1, capture=False))  # the MQTT callback
        _serve(agent, digits_data.x_test[:10])
        assert agent.capture.mark_drift() == 0
        assert _stored(agent) == [] and not agent.capture.enabled
        agent._on_desired(DesiredState(device_id=agent.device_id, generation=2))  # capture: None = device config decides
        _serve(agent, digits_data.x_test[:3])
        assert len(_stored(agent)) == 3
    finally:
        agent.stop()


def test_bad_capture_settings_are_refused_naming_the_setting():
    with pytest.raises(CaptureError, match="capture_random_fraction"):
        CapturePolicy(random_fraction=1.5)
    with pytest.raises(CaptureError, match="capture_destination"):
        CapturePolicy(destination="cloud")  # type: ignore[arg-type]
    from edgewise.agent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="capture_destination"):
        load_config("/nonexistent-capture-dir-for-test", device_id="x1", capture_destination="cloud")


# -- budget --------------------------------------------------------------------------------------------


def _sample(device_id: str, reason: str, conf: float, fill: float) -> Sample:
    x = np.full((1, 64), fill, dtype=np.float32)
    return Sample(device_id=device_id, seq=0, ts=1.0, reason=reason, top1=1, confidence=conf,
                  inputs=[SampleArray.of("x", x)])  # type: ignore[arg-type]


def test_the_local_store_never_exceeds_its_budget_and_the_lowest_value_oldest_samples_go_first(tmp_path):
    store = SampleStore(tmp_path / "samples.db", budget_bytes=4096)
    try:
        kinds = [("random", 0.9), ("low_confidence", 0.4), ("random", 0.8), ("drift", 0.7), ("low_confidence", 0.1)] * 8
        for i, (reason, conf) in enumerate(kinds):
            store.put(_sample("d", reason, conf, float(i)), sample_value(reason, conf, 0.5))
            assert store.size_bytes <= 4096
        kept = list(store.samples())
        values = [v for v, _ in kept]
        assert 4 <= len(kept) < len(kinds) and store.evicted > 0
        # everything kept is worth at least as much as anything that had to go
        assert min(values) >= 1.0 and sum(1 for _, s in kept if s.reason == "random") == 0
        assert store.size_bytes == sum(len(msgpack.packb(s.model_dump(mode="json"), use_bin_type=True)) + 64 for _, s in kept)
    finally:
        store.close()


def test_a_sample_worth_less_than_everything_kept_is_refused_not_swapped_in(tmp_path):
    store = SampleStore(tmp_path / "samples.db", budget_bytes=4096)
    try:
        while store.evicted == 0:  # full of drift samples (equal value: the oldest make room for the newest)
            assert store.put(_sample("d", "drift", 0.5, 1.0), 2.0)
        n = store.count()
        assert not store.put(_sample("d", "random", 0.9, 2.0), 0.0)
        assert store.count() == n and all(s.reason == "drift" for _, s in store.samples())
    finally:
        store.close()


def test_samples_kept_locally_are_sealed_at_rest(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_random_fraction=1.0)
    try:
        x = digits_data.x_test[:5] + 0.123  # values whose bytes would be easy to spot
        agent.predict(x)
        assert len(_stored(agent)) == 5  # opens with the device's key
        raw = (agent.state_dir / "samples.db").read_bytes() + (agent.state_dir / "samples.db-wal").read_bytes()
        assert PREPROCESSING.apply(x[:1]).astype(np.float32).tobytes()[:32] not in raw
        assert (agent.state_dir / "samples.key").exists()
    finally:
        agent.stop()


# -- upload through the outbox ---------------------------------------------------------------------------


def test_uploaded_samples_wait_in_the_outbox_within_their_budget(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_destination="upload", capture_random_fraction=1.0,
                   capture_budget_bytes=8192)
    try:
        for i in range(60):
            agent.predict(digits_data.x_test[i : i + 1])
            assert agent.outbox.priority_bytes(PRIORITY_SAMPLE) <= 8192
        dropped = agent.outbox.dropped()["sample"]
        assert dropped > 0 and agent.capture.captured["random"] == 60
        kinds = {r.kind for r in agent.outbox.peek(1000)}
        assert "sample" in kinds
    finally:
        agent.stop()


def test_samples_are_the_first_records_dropped_when_the_outbox_is_full_and_are_counted(tmp_path):
    dev = _id("obx")
    box = Outbox(tmp_path / "outbox.db", max_bytes=8192)
    try:
        for _ in range(10):
            box.enqueue(_sample(dev, "drift", 0.5, 3.0))
        box.enqueue(Event(device_id=dev, seq=0, ts=1.0, kind="k"))
        for i in range(40):  # telemetry pushes the samples out, never the event
            box.enqueue(Telemetry(device_id=dev, seq=0, ts=float(i)))
        dropped = box.dropped()
        records = box.peek(1000)
        assert dropped["sample"] == 10 and dropped["event"] == 0 and dropped["alert"] == 0
        assert not any(r.kind == "sample" for r in records) and any(r.kind == "event" for r in records)
        # a sample never pushes out telemetry: with no samples left to drop, the new sample is dropped
        pending = box.pending()
        box.enqueue(_sample(dev, "drift", 0.5, 4.0))
        assert box.pending() == pending and box.dropped()["sample"] == 11 and box.dropped()["telemetry"] == dropped["telemetry"]
    finally:
        box.close()


def test_samples_drain_last_as_batches_on_the_telemetry_samples_topic(tmp_path):
    dev = _id("drain")
    box = Outbox(tmp_path / "outbox.db")
    try:
        box.enqueue(_sample(dev, "random", 0.9, 5.0))
        box.enqueue(Telemetry(device_id=dev, seq=0, ts=1.0))
        assert [r.priority for r in box.peek()] == [PRIORITY_TELEMETRY, PRIORITY_SAMPLE]
        sent: list[tuple[str, bytes]] = []
        assert drain_once(box, dev, lambda t, p: sent.append((t, p)) or True) == 2
        assert [t for t, _ in sent] == [topics.telemetry(dev), topics.telemetry(dev, "samples")]
        _, batch = decode_for_topic(*sent[1])
        assert isinstance(batch, Batch) and isinstance(batch.items[0], Sample)
        np.testing.assert_array_equal(batch.items[0].inputs[0].array(), np.full((1, 64), 5.0, dtype=np.float32))
    finally:
        box.close()


# -- control plane: ingest, de-duplication, export -----------------------------------------------------


def test_ingest_stores_a_sample_once_however_often_it_is_delivered_and_exports_it_unchanged(tmp_path, db_url):
    from edgewise.control.db import init_db
    from edgewise.control.ingest import Ingest
    from edgewise.control import samples as sm

    db = init_db(db_url)
    ingest = Ingest(db)
    dev = _id("ing")
    x = np.arange(2 * 3 * 4, dtype=np.int16).reshape(1, 2, 3, 4)
    items = [Sample(device_id=dev, seq=s, ts=10.0 + s, model="m", version="1.0.0", reason="random", top1=None,
                    confidence=None, inputs=[SampleArray.of("img", x + s), SampleArray.of("k", np.array([[s]], np.uint8))])
             for s in (5, 6)]
    payload = encode(Batch(device_id=dev, items=items))
    for _ in range(3):
        ingest.handle(topics.telemetry(dev, "samples"), payload)
    stats = ingest.stats()
    assert stats.sample_rows == 2 and stats.duplicates == 4 and stats.bad == 0
    with db.session() as s:
        body, _ = sm.export(s, "m", "1.0.0")
    data = np.load(io.BytesIO(body))
    assert data["x:img"].dtype == np.int16 and data["x:img"].shape == (2, 2, 3, 4)
    np.testing.assert_array_equal(data["x:img"], np.concatenate([x + 5, x + 6]))
    np.testing.assert_array_equal(data["x:k"], np.array([[5], [6]], np.uint8))
    assert list(data["seq"]) == [5, 6] and list(data["top1"]) == [-1, -1] and list(data["reason"]) == ["random"] * 2


def test_a_sample_whose_bytes_do_not_fit_its_shape_is_refused_and_the_rest_of_the_batch_is_stored(tmp_path, db_url):
    from edgewise.control.db import init_db
    from edgewise.control.ingest import Ingest

    db = init_db(db_url)
    ingest = Ingest(db)
    dev = _id("bad")
    good = _sample(dev, "random", 0.9, 1.0).model_copy(update={"seq": 1})
    bad = _sample(dev, "random", 0.9, 1.0).model_copy(update={"seq": 2})
    bad.inputs[0].shape = [1, 65]
    ingest.handle(topics.telemetry(dev, "samples"), encode(Batch(device_id=dev, items=[good, bad])))
    stats = ingest.stats()
    assert stats.sample_rows == 1 and stats.bad_by_reason == {"bad_sample": 1}


def test_parquet_export_without_pyarrow_says_what_to_do(tmp_path, db_url, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a control plane installed without edgewise[parquet]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    from edgewise.control import samples as sm
    from edgewise.control.db import init_db
    from edgewise.control.errors import InvalidRequestError
    from edgewise.control.ingest import Ingest

    db = init_db(db_url)
    dev = _id("pq")
    Ingest(db).handle(topics.telemetry(dev, "samples"),
                      encode(_sample(dev, "random", 0.9, 1.0).model_copy(update={"seq": 1, "model": "m", "version": "1"})))
    with db.session() as s, pytest.raises(InvalidRequestError, match="pip install pyarrow"):
        sm.export(s, "m", "1", "parquet")


def test_a_corrupt_local_sample_store_is_moved_aside_and_capture_goes_on(tmp_path, keys_dir, bundles, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, capture_random_fraction=1.0)
    agent.predict(digits_data.x_test[:2])
    agent.stop()
    db = agent.state_dir / "samples.db"
    for side in ("samples.db-wal", "samples.db-shm"):
        (agent.state_dir / side).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    from edgewise.agent import Agent

    again = Agent(agent.config)
    try:
        assert again.capture is not None and again.capture.sink.recovered_from is not None
        again.start()  # loads the committed model
        again.predict(digits_data.x_test[:3])
        assert len(_stored(again)) == 3
    finally:
        again.stop()


def test_an_operator_switches_capture_off_for_a_tag_through_the_desired_state_and_back_to_device_config(tmp_path, keys_dir):
    from fastapi.testclient import TestClient

    from conftest import admin_headers
    from edgewise.control.app import create_app
    from edgewise.control.deployments import desired_state
    from edgewise.control.devices import get_device
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    with TestClient(create_app(settings)) as client:
        client.headers.update(admin_headers(settings.data_dir))
        for dev, tags in (("cap-a", ["ward-3"]), ("cap-b", ["ward-3"]), ("cap-c", ["lab"])):
            assert client.post("/api/v1/devices", json={"id": dev, "tags": tags}).status_code in (200, 201)
        r = client.put("/api/v1/capture", json={"tag": "ward-3", "enabled": False})
        assert r.status_code == 200, r.text
        assert sorted(r.json()["devices"]) == ["cap-a", "cap-b"]
        services = client.app.state.control
        with services.db.session() as session:
            states = {d: desired_state(get_device(session, d)) for d in ("cap-a", "cap-b", "cap-c")}
        assert states["cap-a"].capture is False and states["cap-b"].capture is False and states["cap-c"] is None
        assert client.put("/api/v1/capture", json={"device_id": "cap-a", "enabled": None}).status_code == 200
        with services.db.session() as session:
            again = desired_state(get_device(session, "cap-a"))
        assert again.capture is None and again.generation > states["cap-a"].generation
        assert client.put("/api/v1/capture", json={"tag": "nobody", "enabled": False}).status_code == 404
        assert client.put("/api/v1/capture", json={"enabled": False}).status_code in (400, 422)
        # a saved group (issue 7): its devices now, by attribute query
        assert client.post("/api/v1/groups", json={"name": "lab-devices", "query": {"tags_any": ["lab"]}}).status_code in (200, 201)
        r = client.put("/api/v1/capture", json={"group": "lab-devices", "enabled": False})
        assert r.status_code == 200, r.text
        assert r.json()["devices"] == ["cap-c"]
        assert client.put("/api/v1/capture", json={"group": "no-such-group", "enabled": False}).status_code == 404


def test_parquet_export_holds_one_row_per_sample_with_each_input_and_its_shape(tmp_path, db_url):
    import io

    import pyarrow.parquet as pq

    from edgewise.control import samples as sm
    from edgewise.control.db import init_db
    from edgewise.control.ingest import Ingest

    db = init_db(db_url)
    dev = _id("pq2")
    sent = [_sample(dev, "random", 0.9, float(i)).model_copy(update={"seq": i + 1, "model": "m", "version": "1"}) for i in range(3)]
    for s in sent:
        Ingest(db).handle(topics.telemetry(dev, "samples"), encode(s))
    with db.session() as s:
        data, media = sm.export(s, "m", "1", "parquet")
        npz, _ = sm.export(s, "m", "1", "npz")
    table = pq.read_table(io.BytesIO(data))
    arrays = np.load(io.BytesIO(npz))
    assert media == "application/vnd.apache.parquet" and table.num_rows == 3
    key = next(k for k in arrays.files if k.startswith("x:"))
    flat = np.asarray(table.column(key).to_pylist(), dtype=arrays[key].dtype)
    np.testing.assert_array_equal(flat, arrays[key].reshape(3, -1))
    assert table.schema.metadata[f"edgewise.shape.{key}".encode()].decode().endswith(str(list(arrays[key].shape[1:])))
