"""mDNS peer discovery (python-zeroconf) on loopback: a holder advertises ``_edgewise-peer._tcp`` with prefixes of the
sha256s it holds; another agent, told nothing about peers, finds it and fetches from it. Skipped (saying why) where
python-zeroconf is not installed or multicast does not work on loopback."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from test_agent_support import ControlPlane, make_agent, wait_for
from test_peer_support import CountingServer, artifact, desire

zeroconf = pytest.importorskip("zeroconf", reason="mDNS discovery needs python-zeroconf: pip install 'edgewise[peer]'")

from edgewise.agent.peers import HINT_HEX, MdnsPeers  # noqa: E402


@pytest.fixture(scope="module")
def multicast_on_loopback():
    """Two zeroconf instances on 127.0.0.1 must see each other, else the sandbox has no multicast there."""
    sha = "ab" * 32
    a = MdnsPeers(f"probe-a-{uuid.uuid4().hex[:6]}", port=9, address="127.0.0.1", holds=lambda: [sha], interfaces=["127.0.0.1"])
    b = MdnsPeers(f"probe-b-{uuid.uuid4().hex[:6]}", port=None, address=None, holds=list, interfaces=["127.0.0.1"])
    try:
        a.start()
        b.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not b.peers_for(sha):
            time.sleep(0.1)
        if not b.peers_for(sha):
            pytest.skip("multicast DNS does not reach 127.0.0.1 in this environment (no multicast on loopback)")
    except OSError as exc:
        pytest.skip(f"cannot open a multicast socket on 127.0.0.1: {exc}")
    finally:
        a.stop()
        b.stop()


def test_an_advertised_peer_is_found_with_the_prefixes_of_what_it_holds(multicast_on_loopback):
    sha = hashlib.sha256(b"bundle").hexdigest()
    a = MdnsPeers(f"adv-{uuid.uuid4().hex[:6]}", port=8471, address="127.0.0.1", holds=lambda: [sha], interfaces=["127.0.0.1"])
    b = MdnsPeers(f"browse-{uuid.uuid4().hex[:6]}", port=None, address=None, holds=list, interfaces=["127.0.0.1"])
    a.start()
    b.start()
    try:
        wait_for(lambda: b.peers_for(sha), timeout=10, what="the advertised peer found")
        assert b.peers_for(sha) == ["http://127.0.0.1:8471"]
        [(url, hints)] = [v for v in b.peers().values() if v[0].endswith(":8471")]
        assert hints == {sha[:HINT_HEX]}  # a prefix only: the full sha256 a request needs is not broadcast
        assert b.peers_for("0" * 64) == []
    finally:
        a.stop()
        b.stop()


def test_an_agent_told_of_no_peers_finds_one_by_mdns_and_the_control_plane_serves_nothing(
    multicast_on_loopback, tmp_path, keys_dir, bundles, mosquitto,
):
    data = bundles["1.1.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    origin = CountingServer()
    cp = ControlPlane(mosquitto)
    holder = make_agent(tmp_path / "a", keys_dir, device_id=f"mdns-a-{uuid.uuid4().hex[:6]}", peer_port=0, peer_host="127.0.0.1",
                        peer_mdns=True)
    assert holder.install(bundles["1.1.0"]).result == "ok"
    fetcher = make_agent(tmp_path / "b", keys_dir, device_id=f"mdns-b-{uuid.uuid4().hex[:6]}", server_url=origin.base_url,
                         broker_url=mosquitto, peer_host="127.0.0.1", peer_mdns=True)
    holder.start()
    fetcher.start()
    try:
        wait_for(lambda: fetcher.peers.mdns.peers_for(sha), timeout=10, what="the holder discovered by mDNS")
        ref = artifact(bundles["1.1.0"], origin.add("/a/digits-1.1.0.ewb", data))
        desire(cp, fetcher.device_id, 1, ref)  # no peers hint from the control plane
        wait_for(lambda: fetcher.model_version == "1.1.0", timeout=30, what="the fetcher on 1.1.0")
        assert origin.sent("/a/digits-1.1.0.ewb") == 0
        assert holder.peers.server.bytes_served == len(data)
        assert fetcher.health()["peers"]["mdns_peers"] == [holder.peers.peer_url]
    finally:
        fetcher.stop()
        holder.stop()
        cp.close()
        origin.close()
