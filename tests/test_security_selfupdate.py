"""Agent self-update: signed releases installed beside the running env, started by the real launcher (real
processes, real signatures, real unix sockets). The edgewise wheel is built once per session from this checkout;
other versions are the same wheel with the version patched (and, for the broken release, one module patched)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from edgewise import __version__
from edgewise.agent.selfupdate import EXIT_INTEGRITY, AgentReleases, SelfUpdateError
from edgewise.bundle.release import ReleaseContentError, ReleaseError, ReleaseSignatureError, build_release, build_wheel
from conftest import patched_wheel  # noqa: F401  (kept importable from here)
from edgewise.security import TrustedKeys, load_signer

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
MAJOR, MINOR, PATCH = (int(x) for x in __version__.split(".")[:3])
NEXT = f"{MAJOR}.{MINOR}.{PATCH + 1}"
LOWER = f"{MAJOR}.{MINOR}.{PATCH - 1}" if PATCH else f"{MAJOR}.{max(MINOR - 1, 0)}.99"


# -- release fixtures: release_wheel, releases and patched_wheel live in conftest.py (shared with other tests) --

@pytest.fixture()
def device(tmp_path, keys_dir) -> dict:
    state = tmp_path / "state"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys_dir / "signing.pub", state / "trust" / "signing.pub")
    return {"state": state, "root": state / "releases", "trusted": TrustedKeys.from_paths([keys_dir / "signing.pub"]),
            "id": f"su-{tmp_path.name[-20:].strip('_-')}".replace("_", "-")}


def installed(device: dict, release: Path, *, commit: bool = False, max_starts: int = 3) -> AgentReleases:
    r = AgentReleases(device["root"])
    v = r.install(release, device["trusted"], running_version=__version__, max_starts=max_starts)
    if commit:
        assert r.begin_start().trial
        assert r.commit_trial(v.version)
    return r


# -- running the launcher like systemd does ------------------------------------------------------------

def launcher_cmd(device: dict, *extra: str) -> list[str]:
    return [PY, "-m", "edgewise.agent.launcher", "--state-dir", str(device["state"]), "--health-grace", "0.5",
            "--ready-timeout", "60", *extra, "--", "--api-port", "0", "--device-id", device["id"], "--update-trust", "signature-only"]


def start_launcher(device: dict, env: dict | None = None, *extra: str) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGEWISE_FAULT_KILL_AT")}
    e.update(env or {})
    log_path = device["state"].parent / f"{device['id']}-launcher.log"  # a file: a pipe nobody reads fills and blocks it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(launcher_cmd(device, *extra), env=e, cwd=device["state"].parent, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def launcher_output(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def wait_for(pred, timeout: float = 60.0, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out = launcher_output(proc)
            raise AssertionError(f"launcher exited with {proc.returncode}:\n{out[-4000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return launcher_output(proc)


def agent_health(device: dict) -> dict:
    port = int((device["state"] / "api.port").read_text())
    return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()


def serving(device: dict, version: str):
    def check():
        try:
            return agent_health(device)["agent_version"] == version
        except (OSError, ValueError, httpx.HTTPError, KeyError):
            return False
    return check


def outbox_events(device: dict) -> list:
    from edgewise.agent import Agent, load_config
    from edgewise.protocol import decode

    agent = Agent(load_config(device["state"], update_trust="signature-only"))
    try:
        return [decode(r.payload) for r in agent.outbox.peek(1000) if r.kind == "event"]
    finally:
        agent.stop()


# -- the tests -------------------------------------------------------------------------------------

def test_new_release_is_committed_after_it_reports_ready_and_runs_its_own_code(device, releases):
    r = installed(device, releases["current"])
    proc = start_launcher(device)
    try:
        wait_for(lambda: r.state().current == __version__, proc=proc)
    finally:
        stop(proc)
    r.install(releases["next"], device["trusted"], running_version=__version__)
    proc = start_launcher(device)
    try:
        wait_for(lambda: r.state().current == NEXT, proc=proc)
        wait_for(serving(device, NEXT), proc=proc)  # the process serves the env's code, not the checkout's
        st = r.state()
        assert (st.current, st.previous, st.trial) == (NEXT, __version__, None)
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out


def test_release_that_fails_at_start_is_rolled_back_to_the_previous_env_with_the_reason(device, releases):
    r = installed(device, releases["current"], commit=True)
    r.install(releases["broken"], device["trusted"], running_version=__version__, max_starts=2)
    proc = start_launcher(device)
    try:
        wait_for(lambda: r.state().trial is None, proc=proc)
        wait_for(serving(device, __version__), proc=proc)
        st = r.state()
        assert st.current == __version__
        assert "2 failed start(s)" in st.failed[NEXT] or "exited with status 1" in st.failed[NEXT]
        rolled = [h for h in st.history if h["event"] == "rolled_back"]
        assert rolled and rolled[-1]["version"] == NEXT and "status 1" in rolled[-1]["reason"]
        assert [h["start"] for h in st.history if h["event"] == "trial_failed"] == [1]
    finally:
        stop(proc)
    with pytest.raises(SelfUpdateError, match="rolled back on this device"):  # not retried in a loop
        r.install(releases["broken"], device["trusted"], running_version=__version__)


def test_release_with_a_lower_version_is_refused_and_nothing_changes(device, releases):
    r = installed(device, releases["next"], commit=True)
    before = (device["root"] / "current.json").read_bytes()
    for label in ("lower", "current"):
        with pytest.raises(SelfUpdateError, match="not newer"):
            r.install(releases[label], device["trusted"], running_version=__version__)
    assert (device["root"] / "current.json").read_bytes() == before
    assert sorted(p.name for p in (device["root"] / "envs").iterdir()) == [NEXT]


def test_release_lower_than_the_running_agent_is_refused(device, releases):
    with pytest.raises(SelfUpdateError, match="not newer"):
        installed(device, releases["lower"])
    assert not (device["root"] / "current.json").exists()


@pytest.mark.parametrize("how", ["untrusted-key", "flipped-manifest-byte", "flipped-wheel-byte", "truncated"])
def test_release_with_a_bad_signature_or_altered_content_is_refused_before_anything_is_installed(device, releases, tmp_path, how):
    path = tmp_path / "bad.ewr"
    data = bytearray(releases["next"].read_bytes())
    if how == "untrusted-key":
        data = bytearray(releases["foreign"].read_bytes())
    elif how == "flipped-manifest-byte":
        i = data.index(b'"version": "')
        data[i + 13] ^= 0x01
    elif how == "flipped-wheel-byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 200]
    path.write_bytes(bytes(data))
    with pytest.raises(ReleaseError):
        installed(device, path)
    assert list((device["root"] / "envs").iterdir()) == []
    assert not (device["root"] / "current.json").exists()


def test_signed_release_whose_manifest_lies_about_the_wheel_is_refused(device, release_wheel, keys_dir, tmp_path):
    from edgewise.bundle import format as fmt
    from edgewise.bundle.release import RELEASE_DOMAIN, ReleaseManifest, describe_wheel

    signer = load_signer(keys_dir / "signing.key")
    data = release_wheel.read_bytes()
    version, rp, req, files = describe_wheel(data)
    files = dict(files)
    files["edgewise/extra_backdoor.py"] = files["edgewise/__init__.py"]  # listed, but not in the wheel
    m = ReleaseManifest(version=NEXT, requires=req, wheel="wheel/" + release_wheel.name,
                        wheel_sha256=hashlib.sha256(data).hexdigest(), wheel_size=len(data), files=files)
    path = tmp_path / "liar.ewr"
    with open(path, "w+b") as f:
        with zipfile.ZipFile(f, "w") as zf:
            zf.writestr(fmt.zipinfo("release.json"), m.to_bytes())
            zf.writestr(fmt.zipinfo(m.wheel), data)
            zf.comment = b"\0" * fmt.BLOCK_LEN
        size = f.seek(0, 2)
        digest = fmt.hash_prefix(f, size - fmt.BLOCK_LEN)
        f.seek(size - fmt.BLOCK_LEN)
        f.write(fmt.pack_block(signer.key_id, signer.sign(RELEASE_DOMAIN + digest)))
    with pytest.raises(ReleaseContentError, match="wheel is version|differ"):
        installed(device, path)
    assert list((device["root"] / "envs").iterdir()) == []


def test_bundle_signature_is_not_accepted_as_a_release_signature(device, bundles):
    with pytest.raises(ReleaseSignatureError):
        installed(device, bundles["1.0.0"])


@pytest.mark.parametrize("step", ["release-stage", "release-switch"])
def test_kill_9_during_install_leaves_the_running_env_untouched(device, releases, step):
    r = installed(device, releases["current"], commit=True)
    before = (device["root"] / "current.json").read_bytes()
    env = {**os.environ, "EDGEWISE_FAULT_KILL_AT": step}
    proc = subprocess.run([PY, "-m", "edgewise.cli.main", "agent-release", "install", str(releases["next"]), "--state-dir", str(device["state"])],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (device["root"] / "current.json").read_bytes() == before
    assert sorted(p.name for p in (device["root"] / "envs").iterdir()) == [__version__]
    launch = r.begin_start()  # what the launcher does next: the committed env, staging debris removed
    assert (launch.version, launch.trial) == (__version__, False)
    assert list((device["root"] / "staging").iterdir()) == []
    r.install(releases["next"], device["trusted"], running_version=__version__)  # and a retry succeeds
    assert r.state().trial.version == NEXT


def test_tampered_file_makes_the_agent_refuse_to_run_with_a_critical_integrity_alert(device, releases):
    from edgewise.agent.launcher import BOOT

    r = installed(device, releases["current"], commit=True)
    target = r.env_dir(__version__) / "site" / "edgewise" / "agent" / "golden.py"
    os.chmod(target, 0o644)
    target.write_text(target.read_text() + "\nEXFILTRATE = True\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "EDGEWISE_LAUNCHER")}
    # The agent as the launcher starts it, without the launcher (whose own pre-check would stop it earlier).
    proc = subprocess.run([PY, "-I", "-B", "-c", BOOT, str(r.site_dir(__version__)), "agent", "--state-dir", str(device["state"]),
                           "--api-port", "0", "--device-id", device["id"], "--update-trust", "signature-only"],
                          env=env, capture_output=True, timeout=60, cwd=device["state"].parent)
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr.decode()[-3000:]
    assert b"modified: edgewise/agent/golden.py" in proc.stderr
    alerts = [e for e in outbox_events(device) if e.kind == "integrity"]
    assert len(alerts) == 1 and alerts[0].severity == "critical"
    assert "modified: edgewise/agent/golden.py" in alerts[0].detail["problems"]


def test_launcher_falls_back_from_a_tampered_committed_env_and_the_previous_agent_reports_it(device, releases):
    r = installed(device, releases["current"], commit=True)
    r.install(releases["next"], device["trusted"], running_version=__version__)
    assert r.begin_start().trial and r.commit_trial(NEXT)
    planted = r.env_dir(NEXT) / "site" / "edgewise" / "agent" / "__pycache__"
    os.chmod(planted.parent, 0o755)
    planted.mkdir()
    (planted / "service.cpython-311.pyc").write_bytes(b"not what was signed")
    proc = start_launcher(device)
    try:
        wait_for(serving(device, __version__), proc=proc)
        st = r.state()
        assert st.current == __version__ and "integrity" in st.failed[NEXT]
        assert "extra: edgewise/agent/__pycache__/service.cpython-311.pyc" in st.failed[NEXT]
        wait_for(lambda: any(h.get("reported") for h in r.state().history if h["event"] == "fell_back"), proc=proc)
    finally:
        stop(proc)
    reported = [e for e in outbox_events(device) if e.kind == "agent_release" and e.severity == "critical"]
    assert reported and "fell_back" in reported[0].message


def test_launcher_relays_ready_and_watchdog_pings_to_the_systemd_socket(device, releases):
    installed(device, releases["current"])
    sock_dir = tempfile.mkdtemp(prefix="ewsd-", dir="/tmp")  # unix socket paths are limited to 108 bytes
    path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    proc = start_launcher(device, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    got: list[str] = []
    try:
        while not ({"READY=1", "WATCHDOG=1"} <= set(got)):
            got.extend(sock.recv(4096).decode().split("\n"))
    finally:
        stop(proc)
        sock.close()
        shutil.rmtree(sock_dir)
    assert any(line.startswith("STATUS=agent ") for line in got)
    assert got.count("WATCHDOG=1") >= 1 and not any(line.startswith("MAINPID=") for line in got)


def test_sd_notify_sends_one_datagram_to_a_real_unix_socket_and_is_a_no_op_without_one():
    from edgewise.agent import sdnotify

    sock_dir = tempfile.mkdtemp(prefix="ewsd-", dir="/tmp")
    path = os.path.join(sock_dir, "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1\nSTATUS=up", env={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        abstract = f"@ewsd-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as a:
            a.bind("\0" + abstract[1:])
            a.settimeout(5)
            assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": abstract})
            assert a.recv(100) == b"WATCHDOG=1"
    shutil.rmtree(sock_dir)
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
