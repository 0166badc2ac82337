"""Shadow mode end to end: a real control plane (TUF, embedded broker, rollout engine) and a real agent serving inputs.

The rollout's canary wave shadows the candidate first; the agent fetches it as a signed TUF target, compares it on
the inputs it serves, the comparisons reach the control plane's database through the real outbox, and the wave's
gates read them before the install starts.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest

from conftest import free_port
from edgewise.control.models import TelemetryRow
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json
from test_agent_support import make_agent, wait_for


@pytest.fixture
def plane(tmp_path, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                              trust=[keys_dir / "signing.pub"], rollout_tick_s=0.1)
    cp = ControlPlane(settings)
    cp.start()
    for version in ("1.0.0", "1.1.0"):
        upload_bundle(cp.url, bundles[version], cp.admin_token)
    yield cp
    cp.stop()


def _device(cp, tmp_path, keys_dir, dev):
    """An agent as enrollment leaves it: the control plane's TUF root, a device token (its broker login)."""
    state = tmp_path / dev
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "device.token").write_text(cp.issue_device_token(dev))
    (state / "trust").mkdir(parents=True)
    root = httpx.get(f"{cp.url}/api/v1/tuf/metadata/1.root.json", headers={"Authorization": f"Bearer {cp.admin_token}"})
    assert root.status_code == 200, root.text
    (state / "trust" / "root.json").write_bytes(root.content)
    return make_agent(state, keys_dir, device_id=dev, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                      update_trust="tuf")


def test_a_rollouts_shadow_wave_gets_agreement_from_a_real_agent_before_it_installs(plane, tmp_path, keys_dir, digits_data):
    cp = plane
    dev = f"shadow-ro-{uuid.uuid4().hex[:6]}"
    agent = _device(cp, tmp_path, keys_dir, dev)
    stop = threading.Event()

    def serve() -> None:  # live traffic: one input every few milliseconds
        x = digits_data.x_test
        i = 0
        while not stop.wait(0.003):
            try:
                agent.predict(x[i % len(x) : i % len(x) + 1])
            except Exception:
                pass  # before 1.0.0 is installed
            i += 1

    server = threading.Thread(target=serve, daemon=True)
    try:
        agent.start()
        wait_for(lambda: any(d["id"] == dev for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)),
                 30, what="the agent to register")
        http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.0.0", "device_id": dev}, token=cp.admin_token)
        wait_for(lambda: agent.model_version == "1.0.0", 60, what="1.0.0 on the device")
        server.start()
        spec = {"model": "digits", "version": "1.1.0", "devices": [dev], "waves": [{
            "name": "canary", "devices": [dev], "shadow_s": 0.5, "min_reporting": 1,
            "success": "reporting >= 1", "error": "failed_fraction > 0.5 or shadow_agreement < 0.5",
        }]}
        rollout = http_json("POST", f"{cp.url}/api/v1/rollouts", spec, token=cp.admin_token)
        wait_for(lambda: agent.shadow.active, 60, what="the candidate loaded in shadow mode")
        assert (agent.shadow.candidate.name, agent.shadow.candidate.version) == ("digits", "1.1.0")
        assert agent.model_version == "1.0.0"  # shadowed, not served

        def shadow_rows():
            with cp.services.db.session() as s:
                return s.query(TelemetryRow).filter(TelemetryRow.device_id == dev, TelemetryRow.shadow_compared > 0).all()

        rows = wait_for(shadow_rows, 60, what="shadow comparisons in the control plane's database")
        assert {r.shadow_version for r in rows} == {"1.1.0"} and all(r.shadow_agreed <= r.shadow_compared for r in rows)
        wait_for(lambda: agent.model_version == "1.1.0", 90, what="the install after the shadow phase")
        wait_for(lambda: not agent.shadow.active, 30, what="the shadow to end with the install")
        status = http_json("GET", f"{cp.url}/api/v1/rollouts/{rollout['id']}", token=cp.admin_token)
        passed = [d for d in status["decisions"] if d["decision"] == "shadow_passed"]
        assert passed and passed[0]["figures"]["shadow_compared"] > 0 and passed[0]["figures"]["shadow_agreement"] >= 0.5
    finally:
        stop.set()
        agent.stop()
