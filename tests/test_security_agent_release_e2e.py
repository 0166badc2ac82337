"""Agent releases end to end: a real control plane (embedded broker, TUF) stores and signs a release as a TUF
target, a deployment names it in the desired state, and a real agent under the real launcher verifies it through
TUF, installs it and comes back on the new version. Releases come from conftest's ``releases`` (one wheel build)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import _release_versions, free_port

CURRENT, NEXT, _LOWER = _release_versions()


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir):
    """A control plane with TUF on and the embedded broker (devices authenticate with their token)."""
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("release-e2e") / "control", port=free_port(), embedded_broker_port=free_port(),
        trust=[keys_dir / "signing.pub"],
    )
    plane = ControlPlane(settings)
    plane.start()
    yield plane
    plane.stop()


def _h(cp) -> dict[str, str]:
    return {"Authorization": f"Bearer {cp.admin_token}"}


def _upload(cp, path: Path) -> httpx.Response:
    return httpx.post(f"{cp.url}/api/v1/agent-releases", content=path.read_bytes(),
                      headers={**_h(cp), "Content-Type": "application/octet-stream"}, timeout=30)


def _wait(pred, timeout: float = 40.0, proc: subprocess.Popen | None = None, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            v = pred()
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            v = None
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited with {proc.returncode}:\n{_output(proc)[-4000:]}")
        time.sleep(0.1)
    tail = _output(proc)[-4000:] if proc is not None else ""
    raise AssertionError(f"timed out waiting for {what}" + (f"; launcher output:\n{tail}" if tail else ""))


def _output(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)  # the launcher's output goes to a file: a pipe nobody reads fills and blocks it
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


class Device:
    """A provisioned device (trust key, TUF root, device token) whose agent runs under the real launcher."""

    def __init__(self, cp, tmp_path: Path, keys_dir: Path) -> None:
        self.id = f"rel-{uuid.uuid4().hex[:8]}"
        self.state = tmp_path / self.id
        (self.state / "trust").mkdir(parents=True)
        shutil.copy(keys_dir / "signing.pub", self.state / "trust" / "signing.pub")
        (self.state / "keys").mkdir(mode=0o700)
        (self.state / "keys" / "device.token").write_text(cp.issue_device_token(self.id) + "\n")
        self.root = cp.settings.data_dir / "tuf" / "metadata" / "1.root.json"
        self.cp = cp
        self.proc: subprocess.Popen | None = None

    def start(self, *, tuf_root: bool = True) -> None:
        cmd = [sys.executable, "-m", "edgewise.agent.launcher", "--state-dir", str(self.state), "--health-grace", "0.5",
               "--ready-timeout", "60", "--", "--server", self.cp.url, "--broker", self.cp.settings.effective_broker_url,
               "--device-id", self.id, "--api-port", "0", "--telemetry-interval", "0.5"]
        cmd += ["--tuf-root", str(self.root)] if tuf_root else []
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGEWISE_FAULT_KILL_AT")}
        log_path = self.state.parent / f"{self.id}.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.state.parent, stdout=log, stderr=subprocess.STDOUT)
        self.proc.log_path = log_path  # type: ignore[attr-defined]

    def stop(self) -> str:
        proc = self.proc
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return _output(proc)

    def health(self) -> dict:
        port = int((self.state / "api.port").read_text())
        return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()

    def record(self) -> dict:
        r = httpx.get(f"{self.cp.url}/api/v1/devices/{self.id}", headers=_h(self.cp), timeout=5)
        r.raise_for_status()
        return r.json()

    def events(self) -> list[dict]:
        return httpx.get(f"{self.cp.url}/api/v1/devices/{self.id}/events", headers=_h(self.cp), timeout=5).json()

    def deploy_agent(self, version: str) -> httpx.Response:
        return httpx.post(f"{self.cp.url}/api/v1/deployments", json={"agent_version": version, "device_id": self.id},
                          headers=_h(self.cp), timeout=30)


@pytest.fixture()
def device(cp, tmp_path, keys_dir):
    d = Device(cp, tmp_path, keys_dir)
    d.start()
    yield d
    d.stop()


def test_an_uploaded_release_is_a_signed_tuf_target_and_listed(cp, releases):
    r = _upload(cp, releases["next"])
    assert r.status_code in (200, 201), r.text
    body = r.json()
    assert body["version"] == NEXT and body["target"] == f"agent/edgewise-agent-{NEXT}.ewr"
    info = cp.services.tuf.repo.target_info(body["target"])
    assert info.custom == {"kind": "agent-release", "version": NEXT}
    assert (info.length, info.hashes["sha256"]) == (body["size"], body["sha256"])
    listed = httpx.get(f"{cp.url}/api/v1/agent-releases", headers=_h(cp)).json()
    assert NEXT in [x["version"] for x in listed]
    assert _upload(cp, releases["next"]).status_code == 200  # the same bytes again: idempotent


def test_a_release_signed_by_an_untrusted_key_is_refused_at_upload(cp, releases):
    r = _upload(cp, releases["foreign"])
    assert r.status_code == 422 and "agent release rejected" in r.json()["detail"]


def test_deploying_an_unknown_agent_version_is_a_404_naming_the_known_ones(cp, releases):
    assert _upload(cp, releases["next"]).status_code in (200, 201)
    with httpx.Client(base_url=cp.url, headers=_h(cp)) as c:
        c.post("/api/v1/devices", json={"id": "rel-unknown-dev", "tags": []})
        r = c.post("/api/v1/deployments", json={"agent_version": "99.0.0", "device_id": "rel-unknown-dev"})
        assert r.status_code == 404 and "agent release 99.0.0 not found" in r.json()["detail"] and NEXT in r.json()["detail"]
        r = c.post("/api/v1/deployments", json={"device_id": "rel-unknown-dev"})  # neither model nor agent
        assert r.status_code == 422


def test_a_deployed_release_is_installed_through_tuf_and_the_device_comes_back_on_it(cp, device, releases):
    assert _upload(cp, releases["next"]).status_code in (200, 201)
    _wait(lambda: device.health()["agent_version"] == CURRENT, proc=device.proc, what="the OS image's agent")
    _wait(lambda: device.record()["agent_version"] == CURRENT, proc=device.proc, what="the device's first state")
    r = device.deploy_agent(NEXT)
    assert r.status_code == 201, r.text
    assert r.json()["agent_version"] == NEXT and r.json()["model"] is None
    _wait(lambda: device.health()["agent_version"] == NEXT, timeout=60, proc=device.proc, what=f"agent {NEXT} serving")
    _wait(lambda: device.record()["agent_version"] == NEXT, proc=device.proc, what="the new version reported")
    from edgewise.agent.selfupdate import AgentReleases

    _wait(lambda: AgentReleases(device.state / "releases").state().current == NEXT, proc=device.proc, what="the trial committed")
    assert any("installed; restarting" in e["message"] for e in device.events())


def test_a_release_whose_served_file_differs_from_its_signed_tuf_target_is_refused(cp, device, releases, tmp_path):
    assert _upload(cp, releases["next"]).status_code in (200, 201)
    _wait(lambda: device.record()["agent_version"] == CURRENT, proc=device.proc, what="the device's first state")
    stored = cp.settings.bundles_dir / "agent-releases" / f"edgewise-agent-{NEXT}.ewr"
    original = stored.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01
    # every file the server could serve for it: the stored release and its TUF target (a hard link, or a copy)
    served = [f for f in cp.settings.data_dir.rglob("*.ewr") if f.stat().st_size == len(original) and f.read_bytes() == original]
    assert stored in served
    try:
        for f in served:
            with open(f, "r+b") as fh:  # in place, as a compromised disk or mirror would
                fh.write(tampered)
        assert device.deploy_agent(NEXT).status_code == 201
        ev = _wait(lambda: next((e for e in device.events() if "not installed" in e["message"]), None), proc=device.proc,
                   what="the refusal event")
    finally:
        for f in served:
            with open(f, "r+b") as fh:
                fh.write(original)
    assert "TUF refused the agent release (target-mismatch)" in ev["message"], ev["message"]
    assert device.health()["agent_version"] == CURRENT
    from edgewise.agent.selfupdate import AgentReleases

    assert AgentReleases(device.state / "releases").state().trial is None


def test_a_model_deployment_keeps_the_desired_agent_and_an_agent_deployment_keeps_the_model(cp, releases, bundles):
    from edgewise.control.deployments import desired_state
    from edgewise.control.devices import get_device

    dev = f"rel-keep-{uuid.uuid4().hex[:6]}"
    assert _upload(cp, releases["next"]).status_code in (200, 201)
    with httpx.Client(base_url=cp.url, headers=_h(cp), timeout=30) as c:
        r = c.post("/api/v1/models", content=bundles["1.0.0"].read_bytes(), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
        assert c.post("/api/v1/devices", json={"id": dev, "tags": []}).status_code in (200, 201)
        assert c.post("/api/v1/deployments", json={"agent_version": NEXT, "device_id": dev}).status_code == 201
        assert c.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": dev}).status_code == 201
    with cp.services.db.session() as s:
        state = desired_state(get_device(s, dev))
    assert (state.model, state.version, state.target) == ("digits", "1.0.0", "digits/1.0.0.ewb")
    assert state.agent is not None and state.agent.version == NEXT
    assert state.agent.target == f"agent/edgewise-agent-{NEXT}.ewr"
    assert state.agent.artifact.url == f"/api/v1/agent-releases/{NEXT}/artifact"
    with httpx.Client(base_url=cp.url, headers=_h(cp), timeout=30) as c:  # the release's bytes, as a device downloads them
        dev_token = cp.issue_device_token(dev)
        body = c.get(state.agent.artifact.url, headers={"Authorization": f"Bearer {dev_token}"}).content
    assert body == releases["next"].read_bytes()


def test_without_a_tuf_root_a_deployed_release_is_refused_saying_how_to_install_the_root(cp, tmp_path, keys_dir, releases):
    assert _upload(cp, releases["next"]).status_code in (200, 201)
    d = Device(cp, tmp_path, keys_dir)
    d.start(tuf_root=False)
    try:
        _wait(lambda: d.record()["agent_version"] == CURRENT, proc=d.proc, what="the device's first state")
        assert d.deploy_agent(NEXT).status_code == 201
        ev = _wait(lambda: next((e for e in d.events() if "not installed" in e["message"]), None), proc=d.proc, what="the refusal")
        assert "TUF refused the agent release (no-root)" in ev["message"] and "--tuf-root" in ev["message"]
        assert d.health()["agent_version"] == CURRENT
    finally:
        d.stop()


def test_the_cli_uploads_a_release_and_deploys_it_to_a_tag(cp, releases):
    tag = f"rel-cli-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=cp.url, headers=_h(cp), timeout=30) as c:
        assert c.post("/api/v1/devices", json={"id": f"{tag}-dev", "tags": [tag]}).status_code in (200, 201)
    env = {**os.environ, "EDGEWISE_API_TOKEN": cp.admin_token}
    cli = [sys.executable, "-m", "edgewise.cli.main", "agent-release"]
    up = subprocess.run([*cli, "upload", str(releases["next"]), "--server", cp.url], env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    assert f"edgewise agent {NEXT}" in up.stdout and f"agent/edgewise-agent-{NEXT}.ewr" in up.stdout
    dep = subprocess.run([*cli, "deploy", NEXT, "--tag", tag, "--server", cp.url], env=env, capture_output=True, text=True, timeout=60)
    assert dep.returncode == 0, dep.stderr
    assert f"agent {NEXT} to tag {tag} (1 device(s))" in dep.stdout
    bad = subprocess.run([*cli, "deploy", "99.0.0", "--tag", tag, "--server", cp.url], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "agent release 99.0.0 not found" in bad.stdout + bad.stderr
