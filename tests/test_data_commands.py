"""One-off commands (issue 6: adaptation "on command"): the control plane publishes on ``cmd/{name}``, the agent
runs the command and answers with a ``command.result`` event. Real agent, real broker, real control plane."""

from __future__ import annotations

import time
import uuid

import pytest

from conftest import free_port
from edgewise.agent.config import write_toml
from edgewise.protocol import Command, decode
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import AgentProcess, http_json, wait_until
from test_agent_support import make_agent, wait_for


def _results(agent) -> list:
    return [m for m in (decode(r.payload) for r in agent.outbox.peek(1000)) if getattr(m, "kind", None) == "command.result"]


def _command(name: str, **kw) -> Command:
    return Command(device_id="cmd-unit", id=uuid.uuid4().hex[:8], name=name, **kw)


@pytest.fixture()
def agent(tmp_path, keys_dir, bundles):
    a = make_agent(tmp_path / "dev", keys_dir, device_id="cmd-unit")
    assert a.install(bundles["1.0.0"]).result == "ok"
    yield a
    a.stop()


def test_an_adapt_command_with_too_few_samples_answers_failed_with_the_reason(agent):
    agent._run_command(_command("adapt"))
    (event,) = _results(agent)
    assert event.detail["result"] == "failed" and "samples" in event.detail["reason"] and event.severity == "warning"


def test_a_drift_reset_command_restarts_the_detectors_and_answers_ok(agent, digits_data):
    agent.predict(digits_data.x_test[:4])
    agent._run_command(_command("drift.reset"))
    (event,) = _results(agent)
    assert event.detail["result"] == "ok" and agent.drift.observer is None


def test_an_unknown_command_is_refused_with_the_known_names(agent):
    agent._run_command(_command("reboot"))
    (event,) = _results(agent)
    assert event.detail["result"] == "refused" and "adapt" in event.detail["reason"]


def test_an_expired_command_is_not_run(agent):
    agent._run_command(_command("adapt", expires_at=time.time() - 1))
    (event,) = _results(agent)
    assert event.detail["result"] == "expired"


def test_an_adapt_command_with_a_bad_method_is_refused(agent):
    agent._run_command(_command("adapt", args={"method": "magic"}))
    (event,) = _results(agent)
    assert event.detail["result"] == "refused" and "magic" in event.detail["reason"]


@pytest.fixture()
def control_plane(tmp_path, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    cp = ControlPlane(ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"]))
    cp.start()
    upload_bundle(cp.url, bundles["1.0.0"], cp.admin_token)
    yield cp
    cp.stop()


def test_a_command_sent_through_the_api_reaches_the_agent_and_its_result_comes_back_as_an_event(control_plane, tmp_path, keys_dir):
    cp = control_plane
    dev = f"cmd-e2e-{uuid.uuid4().hex[:6]}"
    state = tmp_path / dev
    state.mkdir()
    write_toml(state / "config.toml", {"device_id": dev})
    a = AgentProcess(device_id=dev, state_dir=state, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                     trust=keys_dir / "signing.pub", telemetry_interval_s=0.5, device_token=cp.issue_device_token(dev))
    a.start()
    try:
        a.wait_ready()
        # the agent subscribes to cmd/# before it publishes its state: once registered, it hears commands
        wait_until(lambda: any(d["id"] == dev for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)),
                   30, what="the agent to register")
        sent = http_json("POST", f"{cp.url}/api/v1/devices/{dev}/commands", {"name": "drift.reset"}, token=cp.admin_token)
        assert sent["name"] == "drift.reset" and sent["expires_at"] > sent["issued_at"]

        def answered():
            events = http_json("GET", f"{cp.url}/api/v1/devices/{dev}/events", token=cp.admin_token)
            return [e for e in events if e["kind"] == "command.result" and e["detail"].get("id") == sent["id"]]

        (event,) = wait_until(answered, 30, what="the command.result event")
        assert event["detail"]["result"] == "ok"
    finally:
        a.stop()


def test_the_api_refuses_an_unknown_command_and_an_unknown_device(control_plane):
    cp = control_plane
    with pytest.raises(Exception, match="422.*unknown command 'reboot'"):
        http_json("POST", f"{cp.url}/api/v1/devices/nobody/commands", {"name": "reboot"}, token=cp.admin_token)
    with pytest.raises(Exception, match="404"):
        http_json("POST", f"{cp.url}/api/v1/devices/nobody/commands", {"name": "adapt"}, token=cp.admin_token)
