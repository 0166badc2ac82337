"""The control plane's peers hint: devices report what they serve (DeviceState.peer_url/holds), ingest records it,
and a device's desired state names up to N nearby holders (DesiredState.peers). Then end to end through a real
control plane with TUF: the second agent takes the bundle from the first, verified against the signed target."""

from __future__ import annotations

import hashlib
import shutil
import uuid

import httpx
import pytest

from conftest import free_port
from edgewise import protocol as p
from edgewise.agent.tuf_client import install_root
from edgewise.control.db import init_db
from edgewise.control.deployments import deploy, desired_state
from edgewise.control.devices import get_device, register_device
from edgewise.control.ingest import Ingest
from edgewise.control.peers import PeerDirectory, directory
from edgewise.control.registry import Registry
from test_agent_support import make_agent, wait_for


@pytest.fixture()
def db(db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


@pytest.fixture()
def stored(db, tmp_path, trusted, bundles):
    registry = Registry(tmp_path / "bundles", trusted)
    with db.session() as s:
        for v, path in bundles.items():
            copy = tmp_path / f"up-{v}.ewb"
            shutil.copyfile(path, copy)
            registry.store(s, copy)
    return registry


def _sha(bundles, version="1.1.0"):
    return hashlib.sha256(bundles[version].read_bytes()).hexdigest()


def _ids(n):
    tag = uuid.uuid4().hex[:6]
    return [f"pc-{tag}-{i}" for i in range(n)]


def _report(ingest, device_id, *, peer_url, holds, status="online", hardware_class=None):
    hw = p.HardwareInfo(hardware_class=hardware_class) if hardware_class else None
    msg = p.DeviceState(device_id=device_id, status=status, peer_url=peer_url, holds=holds, hardware=hw)
    ingest.handle(p.topics.state(device_id), p.encode(msg))


def test_the_desired_state_names_nearby_devices_that_reported_holding_the_artifact(db, stored, bundles):
    ingest = Ingest(db)
    a, b, far, target = _ids(4)
    site, line, other = (f"{t}-{uuid.uuid4().hex[:6]}" for t in ("site", "line", "site"))  # the directory is per process
    sha = _sha(bundles)
    with db.session() as s:
        register_device(s, a, [site])
        register_device(s, b, [site, line])
        register_device(s, far, [other])
        register_device(s, target, [site, line])
    _report(ingest, a, peer_url="http://10.0.0.1:8471", holds=[sha])
    _report(ingest, b, peer_url="http://10.0.0.2:8471/", holds=[sha, "0" * 64])
    _report(ingest, far, peer_url="http://10.9.0.1:8471", holds=[sha])
    with db.session() as s:
        deploy(s, None, "digits", "1.1.0", device_id=target)
        state = desired_state(get_device(s, target))
    # b shares two tags, a one; the far device shares none (and no hardware class): not a neighbour
    assert state is not None and state.peers == ["http://10.0.0.2:8471", "http://10.0.0.1:8471"]


def test_no_peers_are_named_for_an_artifact_nobody_nearby_holds_or_by_a_device_gone_offline(db, stored, bundles):
    ingest = Ingest(db)
    a, target = _ids(2)
    site = f"site-{uuid.uuid4().hex[:6]}"
    with db.session() as s:
        register_device(s, a, [site])
        register_device(s, target, [site])
    _report(ingest, a, peer_url="http://10.0.0.1:8471", holds=[_sha(bundles, "1.0.0")])
    with db.session() as s:
        deploy(s, None, "digits", "1.1.0", device_id=target)
        assert desired_state(get_device(s, target)).peers == []
    _report(ingest, a, peer_url="http://10.0.0.1:8471", holds=[_sha(bundles)])
    with db.session() as s:
        assert desired_state(get_device(s, target)).peers == ["http://10.0.0.1:8471"]
    _report(ingest, a, peer_url="http://10.0.0.1:8471", holds=[_sha(bundles)], status="offline")  # its last will
    with db.session() as s:
        assert desired_state(get_device(s, target)).peers == []


def test_the_same_hardware_class_counts_as_nearby_and_the_hint_is_capped():
    d = PeerDirectory(limit=2)
    for i in range(4):
        d.record(p.DeviceState(device_id=f"hw-{i}", peer_url=f"http://10.0.0.{i}:1", holds=["a" * 64],
                               hardware=p.HardwareInfo(hardware_class="rpi5" if i else "jetson")))
    got = d.peers_for("me", "a" * 64, tags=[], hardware_class="rpi5")
    assert len(got) == 2 and "http://10.0.0.0:1" not in got
    assert sorted(d.peers_for("hw-1", "a" * 64, hardware_class="rpi5", limit=10)) == ["http://10.0.0.2:1", "http://10.0.0.3:1"]


def test_devices_asking_at_once_are_spread_over_equally_near_holders():
    d = PeerDirectory(limit=1)
    for i in range(4):
        d.record(p.DeviceState(device_id=f"holder-{i}", peer_url=f"http://10.0.1.{i}:1", holds=["b" * 64], tags=["site"]))
    firsts = {d.peers_for(f"asker-{j}", "b" * 64, tags=["site"])[0] for j in range(32)}
    assert len(firsts) >= 3  # not every asker is sent to the same holder
    assert d.peers_for("asker-0", "b" * 64, tags=["site"]) == d.peers_for("asker-0", "b" * 64, tags=["site"])  # stable per device


@pytest.fixture(scope="module")
def plane(tmp_path_factory, keys_dir):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("peer-cp") / "control", port=free_port(), embedded_broker_port=free_port(),
        trust=[keys_dir / "signing.pub"],
    )
    cp = ControlPlane(settings)
    cp.start()
    yield cp
    cp.stop()


def _tuf_agent(plane, tmp_path, keys_dir, device_id, tag):
    state = tmp_path / device_id
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "device.token").write_text(plane.issue_device_token(device_id) + "\n")
    (state / "trust").mkdir()
    install_root(plane.settings.data_dir / "tuf" / "metadata" / "1.root.json", state / "trust" / "root.json")
    return make_agent(state, keys_dir, device_id=device_id, server_url=plane.url, broker_url=plane.settings.effective_broker_url,
                      update_trust="tuf", tags=[tag], peer_port=0, peer_host="127.0.0.1")


def test_through_a_real_control_plane_with_tuf_the_second_device_takes_the_bundle_from_the_first(plane, tmp_path, keys_dir, bundles):
    h = {"Authorization": f"Bearer {plane.admin_token}"}
    r = httpx.post(f"{plane.url}/api/v1/models", content=bundles["1.1.0"].read_bytes(),
                   headers={**h, "Content-Type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    sha, size = _sha(bundles), bundles["1.1.0"].stat().st_size
    first, second = _ids(2)
    tag = f"site-{uuid.uuid4().hex[:6]}"
    a = _tuf_agent(plane, tmp_path, keys_dir, first, tag)
    b = _tuf_agent(plane, tmp_path, keys_dir, second, tag)
    a.start()
    b.start()
    try:
        assert httpx.post(f"{plane.url}/api/v1/deployments", json={"model": "digits", "version": "1.1.0", "device_id": first},
                          headers=h).status_code == 201
        wait_for(lambda: a.model_version == "1.1.0", timeout=60, what="the first device on 1.1.0 from the control plane")
        wait_for(lambda: any(e["device_id"] == first and sha in e["holds"] for e in directory.snapshot()),
                 what="the control plane knows the first device holds it")
        assert httpx.post(f"{plane.url}/api/v1/deployments", json={"model": "digits", "version": "1.1.0", "device_id": second},
                          headers=h).status_code == 201
        wait_for(lambda: b.model_version == "1.1.0", timeout=60, what="the second device on 1.1.0")
        stats = b.peers.fetcher.stats
        assert (stats.fetched_from_peer, stats.bytes_from_peers, stats.bytes_from_origin) == (1, size, 0)
        assert a.peers.server.bytes_served == size
        assert b.current_model.sha256 == sha
    finally:
        b.stop()
        a.stop()
