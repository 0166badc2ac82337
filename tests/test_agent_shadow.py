"""Shadow mode on a real agent: real signed bundles over real HTTP, real ONNX Runtime, the real outbox and broker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgewise.agent.shadow import Shadow, agreement
from edgewise.bundle import build_bundle, verify_bundle
from edgewise.agent.runtime import LoadedModel
from edgewise.lab.demo_model import LABELS, PREPROCESSING
from edgewise.protocol import DesiredState, Event, Summary, decode, encode, topics
from edgewise.protocol.messages import ShadowTarget
from edgewise.security import load_signer
from test_agent_support import BundleServer, ControlPlane, artifact_for, make_agent, wait_for


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


def _agent(tmp_path, keys_dir, bundles, server, device_id, **kw):
    agent = make_agent(tmp_path / device_id, keys_dir, device_id=device_id, server_url=server.base_url, **kw)
    assert agent.install(bundles["1.0.0"]).result == "ok"
    return agent


def _target(server, bundles, version, *, sample_every=1, data=None):
    url = server.add(f"/shadow/digits-{version}.ewb", data if data is not None else bundles[version].read_bytes())
    return ShadowTarget(model="digits", version=version, artifact=artifact_for(bundles[version], url), sample_every=sample_every)


def _events(agent, kind):
    return [r for r in (decode(rec.payload) for rec in agent.outbox.peek(10000)) if isinstance(r, Event) and r.kind == kind]


def _collect(agent, total, timeout=20.0):
    """Sum take_interval() windows until ``total`` sampled inputs are accounted for (compared + errors + skipped)."""
    sums = {"compared": 0, "agreed": 0, "errors": 0, "skipped": 0}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = agent.shadow.take_interval()
        if stats is not None:
            for k in sums:
                sums[k] += getattr(stats, k)
        if sums["compared"] + sums["errors"] + sums["skipped"] >= total:
            return sums
        time.sleep(0.02)
    raise AssertionError(f"shadow accounted for {sums} of {total} inputs")


def test_an_identical_candidate_agrees_on_every_input_it_compared(tmp_path, keys_dir, bundles, server, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-same")
    try:
        agent.shadow.want(_target(server, bundles, "1.0.0"))
        wait_for(lambda: agent.shadow.active, what="candidate loaded")
        x = digits_data.x_test[:60]
        for i in range(len(x)):
            agent.predict(x[i : i + 1])
        sums = _collect(agent, 60)
        assert sums["compared"] > 0 and sums["errors"] == 0
        assert sums["agreed"] == sums["compared"]  # agreement 1.0
        started = _events(agent, "shadow.started")
        assert len(started) == 1 and started[0].detail["version"] == "1.0.0"
        assert sorted(p.name for p in (agent.state_dir / "shadow").iterdir()) == [f"{artifact_for(bundles['1.0.0'], 'x').sha256}.ewb"]
        assert agent.slots.record().version == "1.0.0" and agent.model_version == "1.0.0"  # never in a slot, never served
    finally:
        agent.stop()


def test_a_different_candidate_agrees_exactly_as_often_as_the_two_models_top_1_classes_do(tmp_path, keys_dir, bundles, server, digits_data, trusted):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-diff")
    try:
        agent.shadow.want(_target(server, bundles, "1.1.0"))
        wait_for(lambda: agent.shadow.active, what="candidate loaded")
        x = digits_data.x_test
        for start in range(0, len(x), 30):  # 18 batches: the queue (32) never fills, so every row is compared
            agent.predict(x[start : start + 30])
        sums = _collect(agent, len(x))
        old = LoadedModel.from_bundle(verify_bundle(bundles["1.0.0"], trusted)).predict(x)["probabilities"].argmax(1)
        new = LoadedModel.from_bundle(verify_bundle(bundles["1.1.0"], trusted)).predict(x)["probabilities"].argmax(1)
        expected = int((old == new).sum())
        assert sums == {"compared": len(x), "agreed": expected, "errors": 0, "skipped": 0}
        assert expected < len(x)  # agreement < 1
    finally:
        agent.stop()


def test_a_candidate_whose_bytes_were_tampered_with_is_refused_with_an_event_and_reports_no_stats(tmp_path, keys_dir, bundles, server):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-tamper")
    try:
        data = bytearray(bundles["1.1.0"].read_bytes())
        data[len(data) // 3] ^= 0x01
        agent.shadow.want(_target(server, bundles, "1.1.0", data=bytes(data)))
        wait_for(lambda: _events(agent, "shadow.refused"), what="refusal event")
        ev = _events(agent, "shadow.refused")[0]
        assert ev.severity == "error" and "sha256" in ev.message and ev.detail["version"] == "1.1.0"
        assert not agent.shadow.active and agent.shadow.take_interval() is None
        assert agent.telemetry_tick().shadow is None
        assert "sha256" in agent.health()["shadow"]["problem"]
    finally:
        agent.stop()


def test_a_candidate_signed_by_an_untrusted_key_is_refused_naming_the_verification_failure(tmp_path, keys_dir, bundles, server, digits_models):
    other = tmp_path / "digits-1.1.0-other.ewb"
    build_bundle(digits_models["mlp"], name="digits", version="1.1.0", signer=load_signer(keys_dir / "other.key"), out=other,
                 labels=LABELS, preprocessing=PREPROCESSING)
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-unsigned")
    try:
        url = server.add("/other.ewb", other.read_bytes())
        agent.shadow.want(ShadowTarget(model="digits", version="1.1.0", artifact=artifact_for(other, url)))
        wait_for(lambda: _events(agent, "shadow.refused"), what="refusal event")
        ev = _events(agent, "shadow.refused")[0]
        assert "verification failed" in ev.message and ev.detail["retrying"] is False
        assert agent.shadow.take_interval() is None and not list((agent.state_dir / "shadow").iterdir())
    finally:
        agent.stop()


def test_serving_never_waits_for_the_candidate_a_full_queue_skips_and_counts(tmp_path, keys_dir, bundles, digits_data, trusted):
    agent = make_agent(tmp_path / "q", keys_dir, device_id="shadow-full")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        # A candidate whose worker never runs (no desired state started one): the queue of 2 fills and stays full.
        agent.shadow = Shadow(None, tmp_path / "q-shadow", queue_size=2)
        agent.shadow.use(LoadedModel.from_bundle(verify_bundle(bundles["1.1.0"], trusted), threads=1))
        x = digits_data.x_test[:100]
        served = [agent.predict(x[i : i + 1])["probabilities"] for i in range(100)]  # returns: nothing waited on the queue
        direct = agent.current_model.predict(x)["probabilities"]
        np.testing.assert_allclose(np.concatenate(served), direct, rtol=1e-5, atol=1e-6)  # the committed model served them all
        stats = agent.shadow.take_interval()
        assert (stats.compared, stats.skipped) == (0, 98) and stats.version == "1.1.0"
    finally:
        agent.stop()


def test_sample_every_n_offers_only_every_nth_served_input(tmp_path, keys_dir, bundles, server, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-every")
    try:
        agent.shadow.want(_target(server, bundles, "1.0.0", sample_every=5))
        wait_for(lambda: agent.shadow.active, what="candidate loaded")
        for i in range(50):
            agent.predict(digits_data.x_test[i : i + 1])
            time.sleep(0.002)
        sums = _collect(agent, 10)
        assert sums["compared"] + sums["skipped"] == 10 and sums["agreed"] == sums["compared"]
    finally:
        agent.stop()


def test_a_new_candidate_replaces_the_loaded_one_and_none_unloads_it(tmp_path, keys_dir, bundles, server, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-replace")
    try:
        agent.shadow.want(_target(server, bundles, "1.0.0"))
        wait_for(lambda: agent.shadow.active, what="first candidate")
        agent.shadow.want(_target(server, bundles, "1.1.0"))
        wait_for(lambda: agent.shadow.candidate is not None and agent.shadow.candidate.version == "1.1.0", what="replacement")
        agent.predict(digits_data.x_test[:5])
        assert agent.shadow.take_interval().version == "1.1.0"
        assert [p.name for p in (agent.state_dir / "shadow").iterdir()] == [f"{artifact_for(bundles['1.1.0'], 'x').sha256}.ewb"]
        agent.shadow.want(None)
        wait_for(lambda: not agent.shadow.active and agent.shadow.candidate is None, what="unload")
        assert agent.shadow.take_interval() is None and agent.telemetry_tick().shadow is None
        assert not list((agent.state_dir / "shadow").iterdir()) and agent.health()["shadow"] is None
        assert [e.detail["version"] for e in _events(agent, "shadow.stopped")] == ["1.0.0", "1.1.0"]
        agent.predict(digits_data.x_test[:5])  # serving without a shadow is unaffected
    finally:
        agent.stop()


def test_summary_mode_carries_the_shadow_counts_too(tmp_path, keys_dir, bundles, server, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-summary", bandwidth_mode="summary")
    try:
        agent.shadow.want(_target(server, bundles, "1.0.0"))
        wait_for(lambda: agent.shadow.active, what="candidate loaded")
        agent.predict(digits_data.x_test[:20])
        wait_for(lambda: agent.shadow._compared == 20, what="compared")
        record = agent.telemetry_tick()
        assert isinstance(record, Summary) and record.shadow.compared == 20 and record.shadow.agreed == 20
        assert record.shadow.latency_p95_ms > 0 and record.shadow.committed_latency_p95_ms > 0
        assert agent.telemetry_tick().shadow.compared == 0  # counts are per window
    finally:
        agent.stop()


def test_agreement_compares_top_1_for_classifiers_and_allclose_row_by_row_otherwise():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    assert agreement({"probabilities": probs}, {"probabilities": probs[:, ::-1]}) == (3, 1)  # ties resolve to the first class
    y = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert agreement({"y": y}, {"y": y * 1.001}) == (2, 2)
    assert agreement({"y": y}, {"y": y + np.array([[0, 0], [0, 1]], np.float32)}) == (2, 1)
    assert agreement({"y": y}, {"other": y}) == (2, 2)  # matched by position when the names differ
    assert agreement({"y": y}, {"y": y[:1]}) == (2, 0)  # shapes differ: nothing agrees


def test_shadow_stats_reach_the_control_plane_in_telemetry_through_the_real_outbox_and_stop_on_shadow_none(
    tmp_path, keys_dir, bundles, server, mosquitto, digits_data,
):
    device = "shadow-e2e"
    cp = ControlPlane(mosquitto)
    agent = _agent(tmp_path, keys_dir, bundles, server, device, broker_url=mosquitto)
    try:
        agent.start()
        target = _target(server, bundles, "1.1.0")
        desired = DesiredState(device_id=device, generation=1, model="digits", version="1.0.0", shadow=target)
        cp.publish(topics.desired(device), encode(desired))
        wait_for(lambda: agent.shadow.active, what="candidate loaded from the desired state")
        agent.predict(digits_data.x_test[:40])
        wait_for(lambda: sum(t.shadow.compared for t in cp.of(device, "telemetry") if t.shadow) >= 40, what="shadow telemetry")
        samples = [t.shadow for t in cp.of(device, "telemetry") if t.shadow is not None]
        assert {(s.model, s.version) for s in samples} == {("digits", "1.1.0")}
        assert sum(s.compared for s in samples) == 40 and 0 < sum(s.agreed for s in samples) <= 40
        assert any(e.kind == "shadow.started" for e in cp.of(device, "event"))
        assert agent.model_version == "1.0.0"  # the candidate is never served
        cp.publish(topics.desired(device), encode(desired.model_copy(update={"generation": 2, "shadow": None})))
        wait_for(lambda: agent.shadow.candidate is None, what="unload")
        unloaded = time.time()
        wait_for(lambda: any(e.kind == "shadow.stopped" for e in cp.of(device, "event")), what="unload event")
        wait_for(lambda: len([t for t in cp.of(device, "telemetry") if t.ts > unloaded]) >= 2, what="telemetry after the unload")
        assert all(t.shadow is None for t in cp.of(device, "telemetry") if t.ts > unloaded)
    finally:
        agent.stop()
        cp.close()


def test_the_local_metrics_count_shadow_comparisons_since_start_across_windows(tmp_path, keys_dir, bundles, server, digits_data):
    agent = _agent(tmp_path, keys_dir, bundles, server, "shadow-metrics")
    try:
        assert b"edgewise_agent_shadow" not in agent.monitor.exposition()[0]  # no candidate: no shadow metrics
        agent.shadow.want(_target(server, bundles, "1.0.0"))
        wait_for(lambda: agent.shadow.active, what="candidate loaded")
        agent.predict(digits_data.x_test[:7])
        wait_for(lambda: agent.shadow._compared == 7, what="compared")
        agent.telemetry_tick()  # a window is taken: the totals keep counting
        agent.predict(digits_data.x_test[:5])
        wait_for(lambda: agent.shadow._compared == 5, what="compared")
        body = agent.monitor.exposition()[0].decode()
        assert 'edgewise_agent_shadow_inputs_total{outcome="compared"} 12.0' in body
        assert 'edgewise_agent_shadow_inputs_total{outcome="agreed"} 12.0' in body
        assert 'edgewise_agent_shadow_candidate_info{model="digits",version="1.0.0"} 1.0' in body
    finally:
        agent.stop()
