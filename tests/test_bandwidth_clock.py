"""Issue 4: bandwidth modes (full / summary / alerts-only) and device clock-skew correction."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise import protocol as p
from edgewise.agent.outbox import batch_payload
from edgewise.agent.service import class_output
from edgewise.control import ServerSettings, create_app
from edgewise.control.db import init_db
from edgewise.control.ingest import Ingest
from edgewise.control.models import EventRow, TelemetryRow
from edgewise.control.telemetry import recent_summaries
from test_agent_support import make_agent

N = 40


def _records(agent):
    return [msgpack.unpackb(r.payload, raw=False) for r in agent.outbox.peek(1000)]


def _drive(tmp_path, keys_dir, bundles, digits_data, mode, n=N):
    agent = make_agent(tmp_path / mode, keys_dir, device_id=f"bw-{mode}", bandwidth_mode=mode)
    assert agent.install(bundles["1.0.0"]).result == "ok"
    for i in range(n):
        agent.predict(digits_data.x_test[i : i + 1])
    return agent


def test_full_mode_emits_a_telemetry_sample_per_tick(tmp_path, keys_dir, bundles, digits_data):
    agent = _drive(tmp_path, keys_dir, bundles, digits_data, "full")
    try:
        rec = agent.telemetry_tick()
        assert isinstance(rec, p.Telemetry) and rec.inferences == N
        assert [r["type"] for r in _records(agent) if r["type"] != "event"] == ["telemetry"]
    finally:
        agent.stop()


def test_summary_mode_emits_one_aggregate_whose_histograms_add_up(tmp_path, keys_dir, bundles, digits_data):
    agent = _drive(tmp_path, keys_dir, bundles, digits_data, "summary")
    try:
        s = agent.telemetry_tick()
        assert isinstance(s, p.Summary)
        assert s.inferences == s.predictions == N
        assert sum(s.classes.values()) == N and sum(s.confidence_hist) == N
        assert len(s.confidence_hist) == len(s.confidence_bins) - 1 == 10
        assert s.latency_p50_ms <= s.latency_p95_ms <= s.latency_p99_ms
        expected = agent.predict(digits_data.x_test[:N])["label"]  # the predicted classes match the model's labels
        counts = {str(int(c)): int(v) for c, v in zip(*np.unique(expected, return_counts=True))}
        assert s.classes == counts
        stored = [r for r in _records(agent) if r["type"] != "event"]
        assert [r["type"] for r in stored] == ["summary"]
        nxt = agent.telemetry_tick()  # the next interval starts empty (except the batch of N above)
        assert nxt.inferences == 1 and nxt.predictions == N and sum(nxt.confidence_hist) == N
        # a Summary travels in a Batch on the telemetry channel
        topic = p.topics.telemetry(agent.device_id)
        _, batch = p.decode_for_topic(topic, batch_payload(agent.device_id, [r.payload for r in agent.outbox.peek(1000) if r.kind == "telemetry"]))
        assert [type(i) for i in batch.items] == [p.Summary, p.Summary]
    finally:
        agent.stop()


def test_alerts_only_sends_no_periodic_telemetry_and_only_warning_events(tmp_path, keys_dir, bundles, digits_data):
    agent = _drive(tmp_path, keys_dir, bundles, digits_data, "alerts-only")
    try:
        assert agent.telemetry_tick() is None
        agent._emit_event("chatter", "routine", severity="info")
        agent._emit_event("drift", "input drift", severity="warning")
        recs = _records(agent)
        assert not [r for r in recs if r["type"] != "event"]
        kinds = [r["kind"] for r in recs]
        assert "drift" in kinds and "chatter" not in kinds
        assert "update" in kinds  # a state change (the install) is still reported
        h = agent.health()
        assert h["bandwidth_mode"] == "alerts-only" and h["bytes_sent"] == {}
    finally:
        agent.stop()


def test_class_output_rule():
    probs = np.array([[0.1, 0.9]], np.float32)
    assert class_output({"label": np.array([1]), "probabilities": probs}) is probs
    logits = np.array([[2.0, 1.0]], np.float32)
    assert class_output({"label": np.array([0]), "logits": logits, "scores": probs}) is probs
    assert class_output({"logits": logits}) is logits
    assert class_output({"label": np.array([1])}) is None


def test_bytes_sent_metric_is_exported_per_mode():
    from edgewise.agent.monitor import Monitor

    m = Monitor()
    m.count_bytes("summary", 123)
    body, _ = m.exposition()
    assert b'edgewise_agent_bytes_sent_total{mode="summary"} 123.0' in body


# -- control plane ---------------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path, db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


def _summary(device, seq, ts):
    return p.Summary(device_id=device, seq=seq, ts=ts, window_s=10.0, inferences=5, predictions=5,
                     latency_p50_ms=1.0, latency_p95_ms=2.0, latency_p99_ms=3.0,
                     classes={"3": 4, "7": 1}, confidence_hist=[0] * 9 + [5])


def test_control_plane_stores_summaries_and_estimates_a_clock_an_hour_behind(db):
    ingest = Ingest(db)
    now = time.time()
    behind = now - 3600.0  # the device's clock is one hour behind
    topic = p.topics.telemetry("slow-1")
    # an old record that waited in the outbox for 5 minutes, then a prompt one
    ingest.handle(topic, p.encode(p.Batch(device_id="slow-1", items=[
        p.Telemetry(device_id="slow-1", seq=1, ts=behind - 300),
        _summary("slow-1", 2, behind - 0.5),
    ])))
    ingest.handle(p.topics.events("slow-1"), p.encode(p.Event(device_id="slow-1", seq=3, ts=behind, kind="x", severity="warning")))
    assert ingest.stats().summary_rows == 1 and ingest.stats().telemetry_rows == 1
    with db.session() as s:
        from edgewise.control.devices import get_device

        d = get_device(s, "slow-1")
        assert d.clock_offset_s == pytest.approx(3600.0, abs=5.0)
        rows = recent_summaries(s, "slow-1")
        assert [r.seq for r in rows] == [2] and rows[0].classes == {"3": 4, "7": 1}
        assert rows[0].corrected_ts == pytest.approx(now, abs=5.0)
        tel = s.query(TelemetryRow).one()
        assert tel.corrected_ts == pytest.approx(now - 300, abs=5.0)  # the delayed record keeps its true time
        ev = s.query(EventRow).one()
        assert ev.corrected_ts == pytest.approx(now, abs=5.0)


def test_summaries_and_clock_offset_through_the_api(tmp_path, keys_dir):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    with TestClient(create_app(settings)) as client:
        client.headers.update(admin_headers(settings.data_dir))
        ingest = client.app.state.control.ingest
        behind = time.time() - 3600.0
        ingest.handle(p.topics.telemetry("api-1"), p.encode(_summary("api-1", 0, behind)))
        ingest.handle(p.topics.telemetry("api-1"), p.encode(p.Telemetry(device_id="api-1", seq=1, ts=behind)))
        r = client.get("/api/v1/devices/api-1/summaries")
        assert r.status_code == 200
        [s] = r.json()
        assert s["predictions"] == 5 and sum(s["confidence_hist"]) == 5 and s["latency_p99_ms"] == 3.0
        assert s["corrected_ts"] == pytest.approx(behind + 3600, abs=5.0)
        dev = client.get("/api/v1/devices/api-1").json()
        assert dev["clock_offset_s"] == pytest.approx(3600.0, abs=5.0)
        tel = client.get("/api/v1/devices/api-1/telemetry").json()
        assert tel[0]["corrected_ts"] == pytest.approx(behind + 3600, abs=5.0)
        assert client.get("/api/v1/stats").json()["stored"]["summaries"] == 1
        assert client.get("/api/v1/devices/nope/summaries").status_code == 404
