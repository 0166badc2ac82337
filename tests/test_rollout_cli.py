"""`edgewise rollout` against a real control plane over HTTP, its engine running on its own loop (tick 0.1 s)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from typer.testing import CliRunner

from edgewise import protocol as p
from edgewise.cli.main import app
from edgewise.control import ServerSettings
from edgewise.control.server import ControlPlane
from edgewise.protocol.messages import HardwareInfo

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory, keys_dir, bundles):
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("rollout-cli") / "cp", port=0, embedded_broker_port=0,
                              trust=[keys_dir / "signing.pub"], rollout_tick_s=0.1)
    with ControlPlane(settings) as cp:
        h = {"Authorization": f"Bearer {cp.admin_token}", "Content-Type": "application/octet-stream"}
        for version in ("1.0.0", "1.1.0"):
            assert httpx.post(f"{cp.url}/api/v1/models", content=bundles[version].read_bytes(), headers=h).status_code == 201
        for i in range(3):
            device_id = f"cli-{i}"
            state = p.DeviceState(device_id=device_id, model="digits", version="1.0.0", tags=["cli"],
                                  hardware=HardwareInfo(hardware_class="x86"))
            cp.services.ingest.handle(p.topics.state(device_id), p.encode(state))
        yield cp


def _cli(cp: ControlPlane, *args: str) -> "object":
    return runner.invoke(app, ["rollout", *args, "--server", cp.url, "--api-token", cp.admin_token])


SPEC = """\
model: digits
version: 1.1.0
tag: cli
waves:
  - name: canary
    devices: [cli-0]
    min_reporting: 0
    success: "failed_fraction == 0"
    error: "failed_fraction > 0.2 or crashes > 0"
  - name: rest
    percent: 100
    min_reporting: 0
"""


def test_start_then_status_wait_reports_completion_with_exit_0(server, tmp_path):
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC)
    r = _cli(server, "start", str(spec), "--json")
    assert r.exit_code == 0, r.output
    rollout = json.loads(r.output)
    assert rollout["state"] in ("pending", "running") and [w["name"] for w in rollout["waves"]] == ["canary", "rest"]
    r = _cli(server, "status", str(rollout["id"]), "--wait", "--timeout", "30", "--json")
    assert r.exit_code == 0, r.output
    done = json.loads(r.output[r.output.index("{"):])
    assert done["state"] == "completed"
    assert [d["decision"] for d in done["decisions"]][:3] == ["created", "start", "wave_start"]
    table = _cli(server, "status", str(rollout["id"]))
    assert table.exit_code == 0 and "canary" in table.output and "completed" in table.output
    listing = _cli(server, "status")
    assert listing.exit_code == 0 and "digits" in listing.output


def test_pause_resume_and_abort_from_the_command_line(server, tmp_path):
    spec = tmp_path / "rollout.yaml"
    spec.write_text(SPEC.replace("version: 1.1.0", "version: 1.0.0"))
    r = _cli(server, "start", str(spec), "--paused", "--json")
    assert r.exit_code == 0, r.output
    rid = str(json.loads(r.output)["id"])
    time.sleep(0.3)
    assert json.loads(_cli(server, "status", rid, "--json").output)["state"] == "paused"
    assert json.loads(_cli(server, "resume", rid, "--json").output)["state"] == "running"
    assert json.loads(_cli(server, "abort", rid, "--json").output)["state"] == "aborted"
    r = _cli(server, "status", rid, "--wait", "--json")
    assert r.exit_code == 4
    r = _cli(server, "resume", rid)
    assert r.exit_code == 1 and "aborted" in r.output


def test_a_bad_spec_exits_non_zero_naming_the_problem(server, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.replace("crashes > 0", "crash_count > 0"))
    r = _cli(server, "start", str(spec))
    assert r.exit_code == 1 and "unknown figure 'crash_count'" in r.output
    spec.write_text("model: digits\nversion: 1.1.0\ntag: cli\nwaves:\n  - percent: 10\n    soak: 5\n")
    r = _cli(server, "start", str(spec))
    assert r.exit_code == 1 and "soak" in r.output
    r = _cli(server, "start", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 1 and "cannot read the spec" in r.output
