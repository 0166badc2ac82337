"""The agent end to end against a real broker, with the test playing the control plane."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import free_port, wait_port
from edgewise.protocol import ArtifactRef, topics
from test_agent_support import BundleServer, ControlPlane, Mosquitto, artifact_for, make_agent, wait_for

ARTIFACT = "artifacts/digits-1.1.0.ewb"


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


@pytest.fixture
def cp(mosquitto):
    c = ControlPlane(mosquitto)
    yield c
    c.close()


def online_agent(tmp_path, keys_dir, bundles, server, mosquitto, device_id):
    agent = make_agent(tmp_path / device_id, keys_dir, device_id=device_id, server_url=server.base_url, broker_url=mosquitto)
    assert agent.install(bundles["1.0.0"]).result == "ok"
    agent.start()
    assert agent.link.wait_subscribed(10)
    return agent


def test_desired_state_downloads_verifies_switches_and_reports(tmp_path, keys_dir, bundles, server, mosquitto, cp, digits_data):
    server.add("/" + ARTIFACT, bundles["1.1.0"].read_bytes())
    agent = online_agent(tmp_path, keys_dir, bundles, server, mosquitto, "svc-1")
    try:
        cp.desire("svc-1", 1, model="digits", version="1.1.0", artifact=artifact_for(bundles["1.1.0"], ARTIFACT))
        wait_for(lambda: agent.model_version == "1.1.0", what="the switch to 1.1.0")
        state = wait_for(lambda: (s := cp.last_state("svc-1")) and s.generation == 1 and s, what="converged state")
        assert (state.status, state.model, state.version, state.last_update.result) == ("online", "digits", "1.1.0", "ok")
        assert "updating" in [s.status for s in cp.of("svc-1", "state")]
        update = wait_for(lambda: [e for e in cp.of("svc-1", "event") if e.kind == "update" and e.detail.get("source") == "desired"], what="update event")
        assert update[0].detail["result"] == "ok" and update[0].detail["version"] == "1.1.0"
        tele = wait_for(lambda: [t for t in cp.of("svc-1", "telemetry") if t.version == "1.1.0"], what="telemetry on 1.1.0")
        assert tele[-1].rss_bytes and tele[-1].cpu_percent is not None and tele[-1].outbox_pending is not None
        agent.predict(digits_data.x_test[:5])
        wait_for(lambda: any(t.inferences >= 1 and t.latency_p50_ms and t.latency_p95_ms for t in cp.of("svc-1", "telemetry")), what="latency telemetry")
    finally:
        agent.stop()


def test_a_refused_update_is_reported_in_state_and_as_an_error_event(tmp_path, keys_dir, bundles, server, mosquitto, cp):
    bad = bytearray(bundles["1.1.0"].read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    server.add("/bad.ewb", bytes(bad))
    agent = online_agent(tmp_path, keys_dir, bundles, server, mosquitto, "svc-2")
    try:
        art = ArtifactRef(url="bad.ewb", sha256=hashlib.sha256(bad).hexdigest(), size=len(bad))
        cp.desire("svc-2", 1, model="digits", version="1.1.0", artifact=art)
        state = wait_for(
            lambda: (s := cp.last_state("svc-2")) and s.last_update and s.last_update.generation == 1 and s, what="state with the failed update"
        )
        assert state.last_update.result == "failed" and "verification failed" in state.last_update.reason
        assert state.version == "1.0.0" and state.status == "online"
        event = wait_for(lambda: [e for e in cp.of("svc-2", "event") if e.kind == "update" and e.severity == "error"], what="error event")
        assert "verification failed" in event[0].message
        assert agent.predict(np.zeros((1, 64), np.float32))["label"].shape == (1,)
    finally:
        agent.stop()


def test_a_malformed_desired_payload_is_counted_reported_and_the_agent_keeps_working(tmp_path, keys_dir, bundles, server, mosquitto, cp):
    agent = online_agent(tmp_path, keys_dir, bundles, server, mosquitto, "svc-3")
    try:
        cp.publish(topics.desired("svc-3"), b"\x92garbage", retain=False)
        wait_for(lambda: agent.monitor.bad_messages == 1, what="the bad message to be counted")
        event = wait_for(lambda: [e for e in cp.of("svc-3", "event") if e.kind == "bad_message"], what="bad_message event")
        assert event[0].detail["topic"] == topics.desired("svc-3") and event[0].detail["reason"]
        assert agent.connected
        assert agent.predict(np.zeros((1, 64), np.float32))["label"].shape == (1,)
        cp.desire("svc-3", 4, model="digits", version="1.0.0")  # what it already runs: converges at once
        wait_for(lambda: (s := cp.last_state("svc-3")) and s.generation == 4, what="generation 4 converged")
    finally:
        agent.stop()


def test_older_generations_are_ignored_and_the_latest_desired_state_wins(tmp_path, keys_dir, bundles, server, mosquitto, cp):
    server.add("/" + ARTIFACT, bundles["1.1.0"].read_bytes())
    server.add("/artifacts/digits-1.0.0.ewb", bundles["1.0.0"].read_bytes())
    agent = online_agent(tmp_path, keys_dir, bundles, server, mosquitto, "svc-4")
    try:
        cp.desire("svc-4", 5, model="digits", version="1.1.0", artifact=artifact_for(bundles["1.1.0"], ARTIFACT))
        wait_for(lambda: (s := cp.last_state("svc-4")) and s.generation == 5, what="generation 5")
        # going down from 1.1.0 needs an explicit rollback (rollback protection)
        cp.desire("svc-4", 3, model="digits", version="1.0.0", artifact=artifact_for(bundles["1.0.0"], "artifacts/digits-1.0.0.ewb"), rollback=True)
        cp.desire("svc-4", 6, model="digits", version="1.0.0", artifact=artifact_for(bundles["1.0.0"], "artifacts/digits-1.0.0.ewb"), rollback=True)
        wait_for(lambda: (s := cp.last_state("svc-4")) and s.generation == 6, what="generation 6")
        assert agent.model_version == "1.0.0"
        assert 3 not in [s.generation for s in cp.of("svc-4", "state")]
    finally:
        agent.stop()


def test_a_failed_download_is_retried_until_the_artifact_appears(tmp_path, keys_dir, bundles, server, mosquitto, cp):
    agent = online_agent(tmp_path, keys_dir, bundles, server, mosquitto, "svc-5")
    try:
        cp.desire("svc-5", 1, model="digits", version="1.1.0", artifact=artifact_for(bundles["1.1.0"], ARTIFACT))
        wait_for(lambda: (s := cp.last_state("svc-5")) and s.last_update and "HTTP 404" in (s.last_update.reason or ""), what="a 404")
        assert agent.model_version == "1.0.0"
        server.add("/" + ARTIFACT, bundles["1.1.0"].read_bytes())
        wait_for(lambda: agent.model_version == "1.1.0", timeout=30, what="the retry to succeed")
    finally:
        agent.stop()


def test_predictions_in_flight_during_a_swap_complete_without_error(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "swap", keys_dir, device_id="svc-6")
    agent.install(bundles["1.0.0"])
    x = np.repeat(digits_data.x_test, 4, axis=0)[:2048]
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()

    def hammer() -> None:
        while not stop.is_set():
            try:
                model = agent.current_model
                out = agent.predict_on(model, x)
                assert out["probabilities"].shape == (len(x), 10)
                seen.add(model.version)
            except BaseException as exc:  # noqa: BLE001 - the test reports whatever went wrong
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in ("1.1.0", "1.0.0", "1.1.0", "1.0.0"):
            assert agent.install(bundles[version], rollback=True).result == "ok"
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        agent.stop()
    assert errors == []
    assert seen == {"1.0.0", "1.1.0"}
    assert agent.monitor.errors == 0 and agent.monitor.inferences > 0


def test_without_a_broker_it_serves_and_flushes_the_buffered_telemetry_once_the_broker_appears(tmp_path, keys_dir, bundles, digits_data):
    port = free_port()
    broker = Mosquitto(port, tmp_path, persistent=True)
    # The control plane's persistent session exists before the device comes up, like in production;
    # the broker is then stopped, so the agent starts with nothing to connect to.
    broker.start()
    wait_port(port)
    ControlPlane(broker.url, client_id="cp-offline", clean_session=False).close(clear_retained=False)
    broker.stop()

    agent = make_agent(tmp_path / "dev", keys_dir, device_id="svc-7", broker_url=broker.url, telemetry_interval_s=0.1, reconnect_cap_s=0.3)
    agent.install(bundles["1.0.0"])
    agent.start()
    cp = None
    try:
        assert agent.predict(digits_data.x_test[:2])["label"].shape == (2,)
        wait_for(lambda: agent.outbox.pending() >= 5, what="telemetry to pile up offline")
        assert not agent.connected
        assert "cannot connect" in agent.link.last_error
        buffered = agent.outbox.issued()
        broker.start()
        wait_for(lambda: agent.connected, what="the agent to connect")
        wait_for(lambda: all(r.seq >= buffered for r in agent.outbox.peek(1000)), what="the broker to acknowledge the backlog")
        cp = ControlPlane(broker.url, client_id="cp-offline", clean_session=False)

        def received() -> set[int]:
            return {r.seq for r in cp.of("svc-7", "telemetry") + cp.of("svc-7", "event")}

        wait_for(lambda: set(range(buffered)) <= received(), what="every record buffered offline")
        telemetry = cp.of("svc-7", "telemetry")
        assert telemetry[0].inferences == 1 and telemetry[0].version == "1.0.0"
    finally:
        agent.stop()
        if cp is not None:
            cp.close()
        broker.remove()


def test_run_agent_stops_cleanly_on_sigterm_and_says_offline(tmp_path, keys_dir, bundles, mosquitto, cp):
    state = tmp_path / "dev"
    seed = make_agent(state, keys_dir, device_id="svc-8", broker_url=mosquitto)
    seed.install(bundles["1.0.0"])
    seed.stop()
    script = textwrap.dedent(
        f"""
        from edgewise.agent import load_config, run_agent
        raise SystemExit(run_agent(load_config({str(state)!r})))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (s := cp.last_state("svc-8")) and s.status == "online", timeout=20, what="the agent online")
        assert (state / "api.port").exists()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: cp.last_state("svc-8").status == "offline", what="the offline state")
    assert not (state / "api.port").exists()
    again = make_agent(state, keys_dir)  # the state directory lock was released
    again.stop()


def test_observers_see_every_served_prediction_as_the_model_saw_it_and_cannot_fail_it(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "obs", keys_dir, device_id="obs-1")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        seen = []

        class Recorder:
            def observe(self, model, feed, outputs):
                seen.append((model.version, {k: v.copy() for k, v in feed.items()}, set(outputs)))

        class Broken:
            def observe(self, model, feed, outputs):
                raise RuntimeError("observer bug")

        agent.observers += [Broken(), Recorder()]
        x = digits_data.x_test[:2]
        out = agent.predict(x)
        assert out and len(seen) == 1
        version, feed, names = seen[0]
        assert version == "1.0.0" and names == set(out)
        (fed,) = feed.values()
        assert fed.dtype == np.float32 and np.allclose(fed, x.astype(np.float32) / 16)  # preprocessing applied
    finally:
        agent.stop()
