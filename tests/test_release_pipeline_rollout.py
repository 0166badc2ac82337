"""`edgewise release` through the staged rollout: a real control plane, simulated devices (sim/virtual.py) on its broker.

Hardware classes come from a group (part TARGET's groups API); the rollout is part ROLLOUT's
``POST /api/v1/rollouts``. Tests skip when a part they need has not landed in this checkout.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from edgewise.cli.pipeline_cmd import EXIT_ROLLOUT
from edgewise.lab import pipeline as pl
from test_release_pipeline import pipeline_dict, run_cli, write

SRC = Path(__file__).resolve().parent.parent / "src" / "edgewise"
needs_rollouts = pytest.mark.skipif(not (SRC / "control" / "api" / "rollouts.py").is_file(),
                                    reason="part ROLLOUT (control/api/rollouts.py) has not landed")
needs_sim = pytest.mark.skipif(not (SRC / "sim" / "virtual.py").is_file(), reason="part SIM (sim/virtual.py) has not landed")

pytestmark = needs_sim


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    fast = {"rollout_tick_s": 0.1} if "rollout_tick_s" in ServerSettings.model_fields else {}
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("release-rollout") / "control", port=free_port(),
        embedded_broker_port=free_port(), trust=[keys_dir / "signing.pub"], **fast,
    )
    plane = ControlPlane(settings)
    plane.start()
    yield plane
    plane.stop()


def _api(cp, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, cp.url + path, headers={"Authorization": f"Bearer {cp.admin_token}"}, timeout=30, **kw)


@pytest.fixture()
def fleet(cp):
    """Two simulated x86-gateway devices with a fresh tag, in a group of their own; 1.3.0 crashes on install."""
    from edgewise.sim.virtual import VersionBehaviour, VirtualDeviceSpec, VirtualFleet

    run = uuid.uuid4().hex[:6]
    tag, group = f"rel-{run}", f"rel-{run}"
    ids = [f"rel-{run}-{i}" for i in range(2)]
    specs = [VirtualDeviceSpec(device_id=i, hardware_class="x86-gateway", tags=[tag], telemetry_s=0.2, install_s=0.1) for i in ids]
    with VirtualFleet(cp.broker_url, cp.url, cp.admin_token, specs, {"1.3.0": VersionBehaviour(crash=True)}, time_scale=1.0) as f:
        f.wait_connected(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # registered, with their hardware class
            devs = {d["id"]: d for d in _api(cp, "GET", "/api/v1/devices").json() if d["id"] in ids}
            if len(devs) == 2 and all((d.get("hardware") or {}).get("hardware_class") for d in devs.values()):
                break
            time.sleep(0.1)
        r = _api(cp, "POST", "/api/v1/groups", json={"name": group, "query": {"tags_all": [tag]}})
        if r.status_code == 404:
            pytest.skip("part TARGET's groups API is not registered yet")
        assert r.status_code == 201, r.text
        f.ids, f.tag, f.group = ids, tag, group  # type: ignore[attr-defined]
        yield f


def _rollout(**extra) -> dict:
    waves = [
        {"name": "canary", "devices": [], "min_reporting": 1, "soak_s": 0,
         "success": "reporting >= 1", "error": "failed > 0 or rolled_back > 0 or crashes > 0"},
        {"name": "all", "percent": 100, "min_reporting": 1, "soak_s": 0,
         "success": "reporting >= 1", "error": "failed > 0 or rolled_back > 0 or crashes > 0"},
    ]
    return {"waves": waves, **extra}


def test_hardware_classes_come_from_the_groups_devices(fleet, cp):
    spec = pl.parse_spec(pipeline_dict(Path("/nonexistent"), "digits", hardware={"classes": [], "from_group": fleet.group}))
    with pl.ControlClient(cp.url, cp.admin_token) as client:
        targets = pl.resolve_targets(spec, client)
    assert [(t.hardware_class, t.profile, t.devices) for t in targets] == [("x86-gateway", "x86-gateway", 2)]


@needs_rollouts
def test_a_release_rolls_out_to_every_wave_and_exits_0(tmp_path, keys_dir, cp, fleet):
    name = f"rel-ok-{uuid.uuid4().hex[:4]}"
    ro = _rollout()
    ro["waves"][0]["devices"] = [fleet.ids[0]]
    spec = pipeline_dict(keys_dir, name, hardware={"classes": [], "from_group": fleet.group}, rollout=ro,
                         timeouts={"poll_s": 0.2, "rollout_s": 60})
    res = run_cli(str(write(tmp_path, spec)), "--server", cp.url, "--token", cp.admin_token, "--out", str(tmp_path / "out"), "--json")
    summary = json.loads(res.stdout)
    assert res.exit_code == 0, summary["error"]
    assert (summary["outcome"], summary["stage"]) == ("ok", "rollout")
    assert summary["rollout"]["state"] == "completed", summary["stage_s"]
    assert summary["targets"][0]["hardware_class"] == "x86-gateway" and summary["targets"][0]["devices"] == 2
    fleet.wait_versions({i: "1.2.0" for i in fleet.ids}, timeout=30)


@needs_rollouts
def test_a_release_whose_canary_crashes_halts_and_exits_5(tmp_path, keys_dir, cp, fleet):
    name = f"rel-crash-{uuid.uuid4().hex[:4]}"
    ro = _rollout(tag=fleet.tag)
    ro["waves"][0]["devices"] = [fleet.ids[0]]
    spec = pipeline_dict(keys_dir, name, bundle={"version": "1.3.0"}, rollout=ro, timeouts={"poll_s": 0.2, "rollout_s": 60})
    res = run_cli(str(write(tmp_path, spec)), "--server", cp.url, "--token", cp.admin_token, "--out", str(tmp_path / "out"), "--json")
    summary = json.loads(res.stdout)
    assert res.exit_code == EXIT_ROLLOUT, summary
    assert summary["outcome"] == "rollout_failed" and summary["rollout"]["state"] == "halted"
    assert "halted" in summary["error"]
    decisions = [(d.get("wave"), d["decision"]) for d in summary["rollout"]["decisions"]]
    assert (0, "halt") in decisions and (1, "wave_start") not in decisions  # the second wave never started


@needs_rollouts
def test_waiting_for_a_paused_rollout_times_out_and_an_aborted_one_fails(keys_dir, cp, fleet, bundles):
    """The wait stage alone, on a version uploaded directly (no optimize run): timeout, then an operator's abort."""
    r = httpx.post(cp.url + "/api/v1/models", content=bundles["1.1.0"].read_bytes(), timeout=30, headers={
        "Authorization": f"Bearer {cp.admin_token}", "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    ro = _rollout(tag=fleet.tag, start_paused=True)
    ro["waves"][0]["devices"] = [fleet.ids[0]]
    spec = pl.parse_spec(pipeline_dict(keys_dir, "digits", bundle={"version": "1.1.0"}, rollout=ro))
    with pl.ControlClient(cp.url, cp.admin_token) as client:
        started = pl.start_rollout(client, spec)
        with pytest.raises(pl.RolloutTimeoutError, match=r"still paused after 0.5 s"):
            pl.wait_rollout(client, started["id"], timeout=0.5, poll=0.1)
        threading.Timer(0.3, lambda: _api(cp, "POST", f"/api/v1/rollouts/{started['id']}/abort")).start()
        with pytest.raises(pl.RolloutFailedError, match="aborted"):
            pl.wait_rollout(client, started["id"], timeout=20, poll=0.1)
