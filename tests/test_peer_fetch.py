"""Peer distribution on real agents: one holds digits 1.1.0 and serves it, the other fetches it from there.

Real parts only: two ``Agent`` objects (make_agent), a real Mosquitto carrying the desired state, real HTTP
servers for the control plane's artifacts (counting every byte) and for misbehaving peers (tampered bytes,
connections dropped mid-file). The bundle's integrity comes from the size + sha256 the agent was told by the
control plane and from the bundle signature: a peer can waste time, never install anything.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import uuid

import pytest

from edgewise.agent.peers import ROUTE, parse_range
from test_agent_support import ControlPlane, make_agent, wait_for
from test_peer_support import CountingServer, artifact, desire

ORIGIN_PATH = "/artifacts/digits-1.1.0.ewb"


@pytest.fixture()
def origin():
    s = CountingServer()
    yield s
    s.close()


@pytest.fixture()
def cp(mosquitto):
    c = ControlPlane(mosquitto)
    yield c
    c.close()


@pytest.fixture()
def holder(tmp_path, keys_dir, bundles):
    """Agent A: already runs digits 1.1.0 (installed offline) and serves it to peers on loopback."""
    a = make_agent(tmp_path / "holder", keys_dir, device_id=f"peer-a-{uuid.uuid4().hex[:6]}", peer_port=0, peer_host="127.0.0.1")
    assert a.install(bundles["1.1.0"]).result == "ok"
    a.start()
    yield a
    a.stop()


@pytest.fixture()
def fetcher_agent(tmp_path, keys_dir, origin, mosquitto):
    """Agent B: no model yet, told by the desired state where its peers are; has a device token for the control plane."""
    state = tmp_path / "fetcher"
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "device.token").write_text("device-secret-token\n")
    b = make_agent(state, keys_dir, device_id=f"peer-b-{uuid.uuid4().hex[:6]}", server_url=origin.base_url, broker_url=mosquitto,
                   peer_host="127.0.0.1")
    b.start()
    yield b
    b.stop()


def _genuine(bundles):
    data = bundles["1.1.0"].read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_an_agent_fetches_the_bundle_from_a_peer_and_the_control_plane_serves_none_of_it(holder, fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
    desire(cp, fetcher_agent.device_id, 1, ref, peers=[holder.peers.peer_url])
    wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
    assert fetcher_agent.current_model.sha256 == sha
    assert origin.requests_for(ORIGIN_PATH) == [] and origin.sent(ORIGIN_PATH) == 0
    assert holder.peers.server.bytes_served == len(data)
    stats = fetcher_agent.peers.fetcher.stats
    assert (stats.fetched_from_peer, stats.bytes_from_peers, stats.bytes_from_origin) == (1, len(data), 0)
    assert fetcher_agent.health()["peers"]["fetched_from_peer"] == 1


def test_a_peer_serving_tampered_bytes_is_refused_banned_and_the_genuine_bundle_installs(fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    bad = CountingServer()
    try:
        bad_url = bad.add_as_peer(data)
        bad.tamper.add(ROUTE + sha)
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, fetcher_agent.device_id, 1, ref, peers=[bad_url])
        wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0 from the control plane")
        assert fetcher_agent.current_model.sha256 == sha  # the genuine bytes, not the peer's
        assert bad.sent(ROUTE + sha) == len(data)  # the hostile peer did serve its bytes ...
        assert origin.sent(ORIGIN_PATH) == len(data)  # ... and they were thrown away and fetched again
        fetcher = fetcher_agent.peers.fetcher
        assert bad_url in fetcher.banned() and fetcher.stats.bad_peers == {bad_url: 1}
        assert bad_url not in fetcher.candidates(sha)
        assert fetcher_agent.health()["peers"]["banned"] == [bad_url]
    finally:
        bad.close()


def test_a_peer_that_drops_the_connection_mid_file_is_resumed_from_the_control_plane_with_range(fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    flaky = CountingServer()
    try:
        flaky_url = flaky.add_as_peer(data)
        half = len(data) // 2
        flaky.cut_after[ROUTE + sha] = half
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, fetcher_agent.device_id, 1, ref, peers=[flaky_url])
        wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
        assert origin.requests_for(ORIGIN_PATH) == [f"bytes={half}-"]
        assert origin.sent(ORIGIN_PATH) == len(data) - half
        fetcher = fetcher_agent.peers.fetcher
        assert fetcher.stats.bytes_from_peers == half and fetcher.stats.peer_failures == {flaky_url: 1}
        assert fetcher.banned() == {}  # a dropped link is not misbehaviour
    finally:
        flaky.close()


def test_a_dropped_peer_download_resumes_from_the_next_peer_and_the_control_plane_serves_nothing(holder, fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    flaky = CountingServer()
    try:
        flaky_url = flaky.add_as_peer(data)
        third = len(data) // 3
        flaky.cut_after[ROUTE + sha] = third
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, fetcher_agent.device_id, 1, ref, peers=[flaky_url, holder.peers.peer_url])
        wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
        assert origin.sent(ORIGIN_PATH) == 0
        assert holder.peers.server.bytes_served == len(data) - third  # the holder served only the rest (Range)
    finally:
        flaky.close()


def test_a_tampered_prefix_left_by_a_dropped_peer_is_caught_and_fetched_again_from_the_control_plane(fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    bad = CountingServer()
    try:
        bad_url = bad.add_as_peer(data)
        bad.tamper.add(ROUTE + sha)  # the flipped byte sits a third of the way in ...
        cut = 2 * len(data) // 3
        bad.cut_after[ROUTE + sha] = cut  # ... and the peer hangs up after two thirds, looking merely flaky
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, fetcher_agent.device_id, 1, ref, peers=[bad_url])
        wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
        assert fetcher_agent.current_model.sha256 == sha
        assert origin.requests_for(ORIGIN_PATH) == [f"bytes={cut}-", None]  # resumed, mismatched, fetched whole
        assert bad_url in fetcher_agent.peers.fetcher.banned()
    finally:
        bad.close()


def test_the_peer_never_receives_the_device_token_the_control_plane_does(fetcher_agent, origin, cp, bundles):
    data, sha = _genuine(bundles)
    peer = CountingServer()
    try:
        peer_url = peer.add_as_peer(data)
        peer.cut_after[ROUTE + sha] = 1000
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, fetcher_agent.device_id, 1, ref, peers=[peer_url])
        wait_for(lambda: fetcher_agent.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
        assert peer.authorization == [None]
        assert origin.authorization == ["Bearer device-secret-token"]
    finally:
        peer.close()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}, method=method), timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_peer_server_serves_its_encrypted_slot_by_sha256_with_ranges_and_404s_anything_else(holder, bundles):
    data, sha = _genuine(bundles)
    base = holder.peers.peer_url + ROUTE
    status, headers, body = _get(base + sha)
    assert (status, body) == (200, data) and headers["Accept-Ranges"] == "bytes"
    assert _get(base + sha, {"Range": "bytes=100-199"})[::2] == (206, data[100:200])
    status, headers, body = _get(base + sha, {"Range": f"bytes={len(data) - 10}-"})
    assert (status, body, headers["Content-Range"]) == (206, data[-10:], f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}")
    assert _get(base + sha, {"Range": "bytes=-5"})[::2] == (206, data[-5:])
    assert _get(base + sha, {"Range": f"bytes={len(data)}-"})[0] == 416
    status, headers, body = _get(base + sha, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(data)), b"")
    assert _get(base + "0" * 64)[0] == 404
    assert _get(base + "not-a-sha")[0] == 400
    assert _get(holder.peers.peer_url + "/v1/health")[0] == 404  # the peer port serves bundles, nothing else
    assert holder.device_state().holds == [sha] and holder.device_state().peer_url == holder.peers.peer_url


def test_only_bundles_that_verify_and_hash_to_their_name_are_held_outside_the_slots(holder, bundles):
    shadow = holder.state_dir / "shadow"
    shadow.mkdir(exist_ok=True)
    old = bundles["1.0.0"].read_bytes()
    old_sha = hashlib.sha256(old).hexdigest()
    (shadow / f"{old_sha}.ewb").write_bytes(old)  # a verified candidate: served
    fake_sha = hashlib.sha256(b"junk").hexdigest()
    (shadow / f"{fake_sha}.ewb").write_bytes(b"junk")  # named right, but no signed bundle: never served
    wrong = "1" * 64
    (shadow / f"{wrong}.ewb").write_bytes(old)  # a signed bundle under another name: never served
    held = holder.peers.holds()
    assert old_sha in held and fake_sha not in held and wrong not in held
    base = holder.peers.peer_url + ROUTE
    assert _get(base + old_sha)[::2] == (200, old)
    assert _get(base + fake_sha)[0] == 404 and _get(base + wrong)[0] == 404


def test_an_agent_without_a_peer_port_serves_nothing_and_reports_no_holdings(fetcher_agent):
    state = fetcher_agent.device_state()
    assert state.peer_url is None and state.holds == []
    assert fetcher_agent.peers.server is None


@pytest.mark.parametrize("header,size,expected", [
    (None, 10, None), ("bytes=0-", 10, (0, 9)), ("bytes=2-4", 10, (2, 4)), ("bytes=5-100", 10, (5, 9)),
    ("bytes=-3", 10, (7, 9)), ("bytes=-30", 10, (0, 9)), ("bytes=10-", 10, "unsatisfiable"), ("bytes=4-2", 10, "unsatisfiable"),
    ("bytes=0-1,4-5", 10, None), ("items=0-1", 10, None), ("bytes=-0", 10, "unsatisfiable"),
])
def test_range_headers_are_parsed_as_one_byte_range_or_the_whole_file(header, size, expected):
    assert parse_range(header, size) == expected


def test_with_peer_fetch_off_the_hint_is_ignored_and_the_control_plane_serves(tmp_path, keys_dir, origin, cp, mosquitto, holder, bundles):
    b = make_agent(tmp_path / "nofetch", keys_dir, device_id=f"peer-nf-{uuid.uuid4().hex[:6]}", server_url=origin.base_url,
                   broker_url=mosquitto, peer_fetch=False, peer_port=0, peer_host="127.0.0.1")
    b.start()
    try:
        data, _ = _genuine(bundles)
        ref = artifact(bundles["1.1.0"], origin.add(ORIGIN_PATH, data))
        desire(cp, b.device_id, 1, ref, peers=[holder.peers.peer_url])
        wait_for(lambda: b.model_version == "1.1.0", timeout=30, what="B running 1.1.0")
        assert origin.sent(ORIGIN_PATH) == len(data) and holder.peers.server.bytes_served == 0
    finally:
        b.stop()
