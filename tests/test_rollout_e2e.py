"""A rollout with real agents (separate processes, real broker, TUF-verified installs): a halted canary is
returned to the previous version by a signed rollback, then a healthy rollout reaches every device."""

from __future__ import annotations

import uuid

from conftest import free_port
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import AgentProcess, http_json, wait_until


def test_real_agents_roll_back_a_halted_canary_then_take_a_healthy_rollout_everywhere(tmp_path, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                              trust=[keys_dir / "signing.pub"], rollout_tick_s=0.2)
    run = uuid.uuid4().hex[:6]
    ids = [f"roe-{run}-{i}" for i in range(2)]
    tag = f"roe-{run}"
    with ControlPlane(settings) as cp:
        for path in bundles.values():
            upload_bundle(cp.url, path, cp.admin_token)
        agents = [AgentProcess(device_id=i, state_dir=tmp_path / i, server_url=cp.url, broker_url=cp.broker_url,
                               trust=keys_dir / "signing.pub", tags=[tag], telemetry_interval_s=0.3,
                               device_token=cp.issue_device_token(i)) for i in ids]
        for a in agents:
            a.start()
        try:
            for a in agents:
                a.wait_ready()

            def versions() -> dict[str, str | None]:
                return {d["id"]: d.get("version") for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)
                        if d["id"] in ids}

            def rollout(rid: int) -> dict:
                return http_json("GET", f"{cp.url}/api/v1/rollouts/{rid}", token=cp.admin_token)

            wait_until(lambda: len(versions()) == 2, 30, what="both agents to register")
            http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.0.0", "tag": tag},
                      token=cp.admin_token)
            wait_until(lambda: set(versions().values()) == {"1.0.0"}, 60, what="1.0.0 everywhere")

            # a canary whose error condition holds as soon as it runs the candidate: halt, signed rollback
            bad = http_json("POST", f"{cp.url}/api/v1/rollouts", {
                "model": "digits", "version": "1.1.0", "tag": tag,
                "waves": [{"name": "canary", "devices": [ids[0]], "error": "updated >= 1"}, {"percent": 100}]},
                token=cp.admin_token)
            halted = wait_until(lambda: (r := rollout(bad["id"]))["state"] == "halted" and r, 60, what="the halt")
            assert [d["decision"] for d in halted["decisions"] if d["decision"] in ("halt", "rollback")] == ["halt", "rollback"]
            wait_until(lambda: versions() == {ids[0]: "1.0.0", ids[1]: "1.0.0"}, 60, what="the canary back on 1.0.0")

            good = http_json("POST", f"{cp.url}/api/v1/rollouts", {
                "model": "digits", "version": "1.1.0", "tag": tag,
                "waves": [{"name": "canary", "devices": [ids[1]], "success": "updated >= 1 and reporting >= 1"},
                          {"name": "rest", "percent": 100, "success": "updated >= 1"}]},
                token=cp.admin_token)
            done = wait_until(lambda: (r := rollout(good["id"]))["state"] in ("completed", "halted") and r, 90,
                              what="the healthy rollout to finish")
            assert done["state"] == "completed", done["decisions"]
            wait_until(lambda: set(versions().values()) == {"1.1.0"}, 60, what="1.1.0 everywhere")
        finally:
            for a in agents:
                a.stop()
