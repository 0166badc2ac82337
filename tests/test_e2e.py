"""End to end: a real control plane, real brokers, agents as separate processes."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from conftest import free_port
from edgewise.sim.demo import run_demo, upload_bundle
from edgewise.sim.fleet import AgentProcess, http_json, wait_until


@pytest.fixture()
def control_plane(tmp_path, keys_dir, bundles, request):
    """A control plane on the embedded broker (or the broker given by indirect param), bundles uploaded."""
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    broker_url = getattr(request, "param", None)
    if broker_url == "mosquitto":
        broker_url = request.getfixturevalue("mosquitto")
    settings = ServerSettings(
        data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
        broker_url=broker_url, trust=[keys_dir / "signing.pub"],
    )
    cp = ControlPlane(settings)
    cp.start()
    for path in bundles.values():
        upload_bundle(cp.url, path, cp.admin_token)
    yield cp
    cp.stop()


def _agent(cp, tmp_path, keys_dir, name, tags=("e2e",)):
    a = AgentProcess(
        device_id=name, state_dir=tmp_path / name, server_url=cp.url,
        broker_url=cp.settings.effective_broker_url, trust=keys_dir / "signing.pub", tags=list(tags),
        telemetry_interval_s=0.5, device_token=cp.issue_device_token(name),
    )
    a.start()
    return a


def _versions(cp, ids):
    """Versions of *our* devices: a shared broker may hold retained states of other tests' devices."""
    return {d["id"]: d.get("version") for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)
            if d["id"] in ids}


@pytest.mark.parametrize("control_plane", [None, "mosquitto"], indirect=True, ids=["embedded-amqtt", "mosquitto"])
def test_fleet_converges_to_each_deployed_version_and_reports(control_plane, tmp_path, keys_dir, digits_data):
    cp = control_plane
    run = uuid.uuid4().hex[:6]
    ids = [f"e2e-{run}-{i}" for i in range(2)]
    tag = f"e2e-{run}"
    agents = [_agent(cp, tmp_path, keys_dir, i, tags=(tag,)) for i in ids]
    try:
        for a in agents:
            a.wait_ready()
        wait_until(lambda: len(_versions(cp, ids)) == 2, 30, what="both agents to register")
        http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.0.0", "tag": tag},
                  token=cp.admin_token)
        wait_until(lambda: set(_versions(cp, ids).values()) == {"1.0.0"}, 60, what="1.0.0 everywhere")

        x, y = digits_data.x_test[:20], digits_data.y_test[:20]
        labels = [int(agents[0].predict(x[i : i + 1])["outputs"]["label"][0]) for i in range(20)]
        assert np.mean(np.array(labels) == y) > 0.8

        http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.1.0", "device_id": ids[1]},
                  token=cp.admin_token)
        wait_until(lambda: _versions(cp, ids) == {ids[0]: "1.0.0", ids[1]: "1.1.0"}, 60, what="1.1.0 on one device only")
        assert agents[1].health()["version"] == "1.1.0"

        def reported():
            rows = http_json("GET", f"{cp.url}/api/v1/devices/{ids[0]}/telemetry?limit=1000", token=cp.admin_token)
            return rows if any(r.get("inferences", 0) >= 20 for r in rows) else None

        rows = wait_until(reported, 30, what="telemetry with the 20 inferences")
        assert any(r.get("latency_p95_ms") is not None for r in rows)
    finally:
        for a in agents:
            a.stop()


def test_agent_started_while_the_server_is_down_serves_then_delivers_everything(tmp_path, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
        trust=[keys_dir / "signing.pub"],
    )
    server_url = f"http://127.0.0.1:{settings.port}"
    with ControlPlane(settings) as provisioning:  # the device was provisioned (token issued), then the server went away
        token = provisioning.issue_device_token("lonely")
    a = AgentProcess(device_id="lonely", state_dir=tmp_path / "lonely", server_url=server_url,
                     broker_url=settings.effective_broker_url, trust=keys_dir / "signing.pub",
                     telemetry_interval_s=0.3, device_token=token)
    # Seed the device offline with 1.0.0, as a factory image would.
    from edgewise.agent.config import load_config
    from edgewise.agent.service import Agent

    a.state_dir.mkdir(parents=True)
    (a.state_dir / "trust").mkdir()
    (a.state_dir / "trust" / "signing.pub").write_bytes(a.trust.read_bytes())
    seed = Agent(load_config(a.state_dir, device_id="lonely"))
    seed.install(bundles["1.0.0"])
    seed.stop()
    a.start()
    cp = None
    try:
        a.wait_ready()
        out = a.predict(np.zeros((1, 64), dtype=np.float32))
        assert out["version"] == "1.0.0"
        time.sleep(2.0)  # several telemetry samples pile up in the outbox
        assert a.health()["outbox_pending"] > 0 and not a.health()["connected"]

        cp = ControlPlane(settings)
        cp.start()
        h = wait_until(lambda: (lambda h: h if h["connected"] and h["outbox_pending"] == 0 else None)(a.health()),
                       60, what="the agent to connect and drain its outbox")
        issued = h["seq_issued"]

        def all_delivered():
            t = http_json("GET", f"{cp.url}/api/v1/devices/lonely/telemetry?limit=100000", token=cp.admin_token)
            e = http_json("GET", f"{cp.url}/api/v1/devices/lonely/events?limit=100000", token=cp.admin_token)
            return len(t) + len(e) >= issued

        wait_until(all_delivered, 30, what=f"all {issued} buffered records at the server")
    finally:
        a.stop()
        if cp is not None:
            cp.stop()


def test_demo_reports_every_agent_on_the_final_version_with_nothing_lost(tmp_path):
    result = run_demo(agents=2, samples_per_agent=10, workdir=tmp_path)
    assert result.devices == 2 and result.deployed == 2
    assert result.inferences == 40 and result.accuracy > 0.85
    assert result.telemetry_received > 0 and result.telemetry_lost == 0
