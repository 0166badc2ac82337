"""The TUF repository (keys, expiry, rotation), the control plane serving it, and the agent installing through it."""

from __future__ import annotations

import shutil
import stat
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from tuf.api.metadata import Metadata

from conftest import admin_headers
from edgewise.control import ServerSettings, create_app
from edgewise.control.tuf_service import TufService
from edgewise.protocol import DesiredState
from edgewise.security.tuf_repo import TufRepoError, TufRepository, target_name, utcnow
from test_agent_support import make_agent
from test_security_tuf_attacks import HostileServer


def test_init_keeps_root_keys_apart_and_online_keys_in_0600_files(tmp_path):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "offline", root_keys=3, threshold=2)
    status = repo.status()
    assert status["roles"]["root"]["threshold"] == 2 and len(status["roles"]["root"]["keyids"]) == 3
    assert len(list((tmp_path / "offline").glob("root-*.key"))) == 3
    assert not list((tmp_path / "repo").rglob("root-*.key"))  # no root key next to the online ones
    online = list((tmp_path / "repo" / "keys").glob("*.key"))
    assert sorted(p.name.split("-")[0] for p in online) == ["snapshot", "targets", "timestamp"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in online)
    assert stat.S_IMODE((tmp_path / "repo" / "keys").stat().st_mode) == 0o700
    assert Metadata.from_file(str(repo.metadata_dir / "1.root.json")).signed.consistent_snapshot is True


def test_expiry_defaults_are_one_day_seven_days_ninety_days_one_year(tmp_path):
    now = utcnow()
    repo = TufRepository(tmp_path / "repo", clock=lambda: now)
    repo.init(tmp_path / "offline")
    days = {role: (repo.load(role).signed.expires - now.replace(microsecond=0)).days for role in ("timestamp", "snapshot", "targets", "root")}
    assert days == {"timestamp": 1, "snapshot": 7, "targets": 90, "root": 365}


def test_a_bundle_target_carries_its_model_version_and_length_and_is_published_under_its_hash(tmp_path, bundles):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "offline")
    name = target_name("digits", "1.0.0", "int8")
    assert name == "digits/1.0.0/int8.ewb"
    repo.add_targets([(name, bundles["1.0.0"], {"model": "digits", "version": "1.0.0", "variant": "int8", "hardware_class": "rpi5"})])
    info = repo.target_info(name)
    assert info.length == bundles["1.0.0"].stat().st_size and info.custom["hardware_class"] == "rpi5"
    assert repo.target_file(repo.target_url_path(info)).read_bytes() == bundles["1.0.0"].read_bytes()
    assert repo.load("snapshot").signed.meta["targets.json"].version == repo.load("targets").signed.version


def test_rotating_root_is_signed_by_the_old_and_the_new_threshold(tmp_path):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "old", root_keys=3, threshold=2)
    repo.rotate("root", [tmp_path / "old"], new_root_keys_dir=tmp_path / "new", root_keys=2, threshold=2)
    v1 = Metadata.from_file(str(repo.metadata_dir / "1.root.json"))
    v2 = Metadata.from_file(str(repo.metadata_dir / "2.root.json"))
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # the old root vouches for the new one
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and the new one for itself
    assert len(v2.signatures) == 5 and v2.signed.roles["root"].threshold == 2
    # the old keys are now useless: a further rotation needs the new ones
    with pytest.raises(TufRepoError, match="needs 2 of its 2 root keys"):
        repo.rotate("timestamp", [tmp_path / "old"])
    repo.rotate("timestamp", [tmp_path / "new"])


def test_rotating_an_online_role_without_the_offline_root_keys_names_what_is_missing(tmp_path):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "offline", root_keys=3, threshold=2)
    with pytest.raises(TufRepoError, match=r"needs 2 of its 3 root keys; found 0 .*--root-keys"):
        repo.rotate("targets", [tmp_path / "elsewhere"])


def test_rotating_an_online_role_retires_its_old_key_file(tmp_path):
    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "offline")
    before = {p.name for p in (tmp_path / "repo" / "keys").glob("timestamp-*.key")}
    out = repo.rotate("timestamp", [tmp_path / "offline"])
    after = {p.name for p in (tmp_path / "repo" / "keys").glob("timestamp-*.key")}
    assert after == {f"timestamp-{out['keyids'][0][:16]}.key"} and not before & after


def test_the_refresher_renews_timestamp_and_snapshot_before_they_expire_under_a_faked_clock(tmp_path):
    start = utcnow()
    now = [start]
    repo = TufRepository(tmp_path / "repo", clock=lambda: now[0])
    repo.init(tmp_path / "offline")
    service = TufService(repo, tmp_path / "bundles", refresh_interval_s=0.05, clock=lambda: now[0])
    service.start()
    try:
        ts0 = repo.load("timestamp").signed
        now[0] = start + timedelta(hours=13)  # past half of the timestamp's day: renewed, snapshot not yet
        deadline = time.monotonic() + 10
        while repo.load("timestamp").signed.version == ts0.version and time.monotonic() < deadline:
            time.sleep(0.02)
        ts1 = repo.load("timestamp").signed
        assert ts1.version > ts0.version and ts1.expires > now[0] + timedelta(hours=23)
        snap_v = repo.load("snapshot").signed.version
        now[0] = start + timedelta(days=4)  # past half of the snapshot's week
        def renewed() -> bool:  # the snapshot is written first, then the timestamp that names it
            snap = repo.load("snapshot").signed.version
            return snap != snap_v and repo.load("timestamp").signed.snapshot_meta.version == snap

        while not renewed() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert repo.load("snapshot").signed.expires > now[0] + timedelta(days=6)
        assert repo.load("timestamp").signed.snapshot_meta.version == repo.load("snapshot").signed.version
    finally:
        service.stop()


def test_the_control_plane_creates_a_repository_registers_uploads_and_names_the_target_in_desired_state(tmp_path, keys_dir, bundles):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    with TestClient(create_app(settings)) as client:
        client.headers.update(admin_headers(settings.data_dir))
        assert (settings.data_dir / "tuf" / "root-keys-OFFLINE").is_dir()
        assert client.post("/api/v1/models", content=bundles["1.0.0"].read_bytes(),
                           headers={"Content-Type": "application/octet-stream"}).status_code == 201
        ts = client.get("/api/v1/tuf/metadata/timestamp.json")
        assert ts.status_code == 200 and ts.headers["cache-control"] == "no-cache"
        snap_v = ts.json()["signed"]["meta"]["snapshot.json"]["version"]
        targets_v = client.get(f"/api/v1/tuf/metadata/{snap_v}.snapshot.json").json()["signed"]["meta"]["targets.json"]["version"]
        targets = client.get(f"/api/v1/tuf/metadata/{targets_v}.targets.json").json()["signed"]["targets"]
        info = targets["digits/1.0.0.ewb"]
        assert info["custom"]["model"] == "digits" and info["custom"]["version"] == "1.0.0" and "rollback" not in info["custom"]
        body = client.get(f"/api/v1/tuf/targets/digits/{info['hashes']['sha256']}.1.0.0.ewb")
        assert body.status_code == 200 and body.content == bundles["1.0.0"].read_bytes()
        assert client.get("/api/v1/tuf/metadata/..%2Fkeys").status_code == 404
        assert client.get("/api/v1/tuf/targets/../keys/x").status_code == 404
        client.post("/api/v1/devices", json={"id": "tuf-cp-1"})
        assert client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "tuf-cp-1"}).status_code == 201
        services = client.app.state.control
        from edgewise.control.deployments import desired_state
        from edgewise.control.devices import get_device

        with services.db.session() as session:
            state = desired_state(get_device(session, "tuf-cp-1"))
        assert state.target == "digits/1.0.0.ewb" and state.artifact is not None  # old agents keep the artifact URL
        assert client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "tuf-cp-1",
                                                        "rollback": True}).status_code == 201
        with services.db.session() as session:
            state = desired_state(get_device(session, "tuf-cp-1"))
        assert state.target == "digits/1.0.0.rollback.ewb"
        assert services.tuf.repo.target_info(state.target).custom["rollback"] is True


def test_an_agent_without_a_tuf_root_refuses_updates_unless_configured_signature_only(tmp_path, keys_dir, bundles):
    server = HostileServer(TufRepository(tmp_path / "unused"))
    try:
        agent = make_agent(tmp_path / "a", keys_dir, device_id="tuf-noroot", server_url=server.base_url, update_trust="tuf")
        d = DesiredState(device_id="tuf-noroot", generation=1, model="digits", version="1.0.0", target="digits/1.0.0.ewb")
        result = agent.updater.apply(d)
        assert result.result == "failed" and "no trusted TUF root" in result.reason and "signature-only" in result.reason
        agent.stop()
        agent = make_agent(tmp_path / "b", keys_dir, device_id="tuf-sigonly", server_url=server.base_url, update_trust="signature-only")
        assert agent.updater.tuf is None and not agent.updater.require_tuf
        agent.stop()
    finally:
        server.close()


def test_installing_a_tuf_root_refuses_a_file_that_is_not_self_signed_root_metadata(tmp_path):
    from edgewise.agent.tuf_client import install_root

    repo = TufRepository(tmp_path / "repo")
    repo.init(tmp_path / "offline")
    install_root(repo.metadata_dir / "1.root.json", tmp_path / "trust" / "root.json")
    assert (tmp_path / "trust" / "root.json").read_bytes() == repo.root_bytes()
    with pytest.raises(ValueError, match="not root"):
        install_root(repo.metadata_dir / "timestamp.json", tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(repo.root_bytes().replace(b'"threshold": 1', b'"threshold": 2', 1))
    with pytest.raises(ValueError, match="self-signed"):
        install_root(bad, tmp_path / "y.json")


def test_cli_tuf_init_rotate_and_status(tmp_path):
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    runner = CliRunner()
    d = tmp_path / "data"
    r = runner.invoke(app, ["tuf", "init", "--data-dir", str(d), "--root-keys-out", str(tmp_path / "rk"), "--root-keys", "3", "--threshold", "2"])
    assert r.exit_code == 0, r.output
    assert "MOVE THIS FOLDER OFFLINE" in r.output
    for role in ("timestamp", "snapshot", "targets"):
        r = runner.invoke(app, ["tuf", "rotate", "--role", role, "--data-dir", str(d), "--root-keys", str(tmp_path / "rk")])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["tuf", "rotate", "--role", "root", "--data-dir", str(d), "--root-keys", str(tmp_path / "rk"),
                            "--new-root-keys", str(tmp_path / "rk2")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["tuf", "status", "--data-dir", str(d), "--json"])
    import json

    assert json.loads(r.output)["roles"]["root"]["version"] == 5
    r = runner.invoke(app, ["tuf", "rotate", "--role", "timestamp", "--data-dir", str(d), "--root-keys", str(tmp_path / "rk")])
    assert r.exit_code == 1 and "root keys" in r.output
    shutil.rmtree(tmp_path / "rk")


def test_a_stored_bundle_changed_on_disk_after_upload_is_never_signed_and_its_deployment_is_refused(tmp_path, keys_dir, bundles):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    with TestClient(create_app(settings)) as client:
        client.headers.update(admin_headers(settings.data_dir))
        assert client.post("/api/v1/models", content=bundles["1.0.0"].read_bytes(),
                           headers={"Content-Type": "application/octet-stream"}).status_code == 201
        services = client.app.state.control
        stored = next(p for p in (settings.data_dir / "bundles").rglob("*.ewb"))
        stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # someone with access to the data dir
        client.post("/api/v1/devices", json={"id": "tuf-cp-2"})
        r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "tuf-cp-2",
                                                     "rollback": True})
        assert r.status_code == 409 and "changed on disk" in r.text
        assert services.tuf.repo.target_info("digits/1.0.0.rollback.ewb") is None
