"""Peer distribution across hosts: network namespaces joined by veth pairs (iproute2), created by the test.

Topology (``ip netns``; the test's own process is the "cloud" in the root namespace)::

    cloud (root ns)  artifact server on 10.X.Y.1 ──uplink veth── site-b (10.X.Y.2, 10.77.0.2)
                                                                    │ site LAN veth
                                                                 site-a (10.77.0.1): holds digits 1.1.0, serves peers

Each device is a real agent in its own process (``ip netns exec``). The uplink of site-b is cut (its veth end set
down): without a peer the update fails (the cut is real), with one — named by the hint or found by mDNS across the
veth — the bundle flows peer to peer, verified, and the control plane's artifact server serves nothing.
Skipped, saying why, where the kernel or the sandbox does not allow creating namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from test_peer_support import CountingServer

HOLDER = r'''
import sys
from edgewise.agent import Agent, load_config
state, host, bundle, mdns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
agent = Agent(load_config(state, device_id="netns-holder", api_port=0, update_trust="signature-only",
                          peer_port=8471, peer_host=host, peer_mdns=mdns))
assert agent.install(bundle).result == "ok"
agent.start()
print("READY", agent.peers.peer_url, flush=True)
sys.stdin.read()  # until the test closes our stdin
agent.stop()
'''

FETCHER = r'''
import json, sys, time
from edgewise.agent import Agent, load_config
from edgewise.protocol import ArtifactRef, DesiredState
state, host, url, sha, size, hints, mdns = sys.argv[1:8]
hints = [h for h in hints.split(",") if h]
agent = Agent(load_config(state, device_id="netns-fetcher", api_port=0, server_url=url.rsplit("/", 2)[0],
                          update_trust="signature-only", peer_host=host, peer_mdns=mdns == "1",
                          peer_timeout_s=2.0, download_timeout_s=2.0))
agent.peers.start()  # the updater alone: no broker (the uplink is cut)
if mdns == "1":
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not agent.peers.mdns.peers_for(sha):
        time.sleep(0.1)
desired = DesiredState(device_id="netns-fetcher", generation=1, model="digits", version="1.1.0",
                       artifact=ArtifactRef(url=url, sha256=sha, size=int(size)), peers=hints)
agent.peers.hint(desired.peers)
result = agent.updater.apply(desired)
print(json.dumps({"result": result.model_dump(mode="json"), "running": agent.model_version, "peers": agent.peers.describe()}), flush=True)
agent.peers.stop()
agent.stop()
'''


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@pytest.fixture()
def net(tmp_path):
    """Two namespaces (site-a, site-b), a site LAN between them and an uplink from site-b to the root namespace."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = uuid.uuid4().hex[:6]
    a, b = f"ewp-{tag}-a", f"ewp-{tag}-b"
    probe = _ip("netns", "add", a, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here ({probe.stderr.strip() or probe.returncode}): needs root / CAP_SYS_ADMIN")
    x, y = random.randint(100, 250), random.randint(0, 250)  # a random /30 for the uplink: other tests may run beside us
    cloud_ip, uplink_ip = f"10.{x}.{y}.1", f"10.{x}.{y}.2"
    lan_a, lan_b, up_b, up_root = f"ewa{tag}", f"ewb{tag}", f"ewu{tag}", f"ewr{tag}"
    try:
        _ip("netns", "add", b)
        for ns in (a, b):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", lan_a, "type", "veth", "peer", "name", lan_b)
        _ip("link", "set", lan_a, "netns", a)
        _ip("link", "set", lan_b, "netns", b)
        _ip("-n", a, "addr", "add", "10.77.0.1/24", "dev", lan_a)
        _ip("-n", b, "addr", "add", "10.77.0.2/24", "dev", lan_b)
        _ip("-n", a, "link", "set", lan_a, "up", "multicast", "on")
        _ip("-n", b, "link", "set", lan_b, "up", "multicast", "on")
        _ip("link", "add", up_root, "type", "veth", "peer", "name", up_b)
        _ip("link", "set", up_b, "netns", b)
        _ip("addr", "add", f"{cloud_ip}/30", "dev", up_root)
        _ip("link", "set", up_root, "up")
        _ip("-n", b, "addr", "add", f"{uplink_ip}/30", "dev", up_b)
        _ip("-n", b, "link", "set", up_b, "up")
    except subprocess.CalledProcessError as exc:
        for ns in (a, b):
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", up_root, check=False)
        pytest.skip(f"cannot build the veth topology: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
    yield {"a": a, "b": b, "cloud_ip": cloud_ip, "uplink_dev": up_b}
    for ns in (a, b):
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", up_root, check=False)


def _state(tmp_path: Path, name: str, keys_dir: Path) -> Path:
    state = tmp_path / name
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys_dir / "signing.pub", state / "trust" / "signing.pub")
    return state


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _holder(net, tmp_path, keys_dir, bundles, mdns: bool) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", net["a"], sys.executable, str(script), str(_state(tmp_path, "holder", keys_dir)), "10.77.0.1",
         str(bundles["1.1.0"]), "1" if mdns else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise AssertionError(f"the holder did not start: {line!r} {proc.stderr.read()[-2000:]}")
    assert line.split()[1] == "http://10.77.0.1:8471"
    return proc


def _fetch(net, tmp_path, keys_dir, name: str, url: str, data: bytes, hints: list[str], mdns: bool) -> dict:
    script = tmp_path / "fetcher.py"
    script.write_text(FETCHER)
    out = subprocess.run(
        ["ip", "netns", "exec", net["b"], sys.executable, str(script), str(_state(tmp_path, name, keys_dir)), "10.77.0.2", url,
         hashlib.sha256(data).hexdigest(), str(len(data)), ",".join(hints), "1" if mdns else "0"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def cloud(net):
    s = CountingServer(host=net["cloud_ip"])
    yield s
    s.close()


def _cut_uplink(net) -> None:
    _ip("-n", net["b"], "link", "set", net["uplink_dev"], "down")


def test_with_the_uplink_cut_the_bundle_flows_peer_to_peer_across_namespaces(net, cloud, tmp_path, keys_dir, bundles):
    data = bundles["1.1.0"].read_bytes()
    url = cloud.add("/artifacts/digits-1.1.0.ewb", data)
    holder = _holder(net, tmp_path, keys_dir, bundles, mdns=False)
    try:
        _cut_uplink(net)
        alone = _fetch(net, tmp_path, keys_dir, "fetcher-alone", url, data, [], mdns=False)
        assert alone["result"]["result"] == "failed" and alone["running"] is None  # no peer, no uplink: no update
        got = _fetch(net, tmp_path, keys_dir, "fetcher", url, data, ["http://10.77.0.1:8471"], mdns=False)
        assert got["result"]["result"] == "ok" and got["running"] == "1.1.0"
        assert got["peers"]["fetched_from_peer"] == 1 and got["peers"]["bytes_from_origin"] == 0
        assert cloud.sent("/artifacts/digits-1.1.0.ewb") == 0
    finally:
        holder.stdin.close()
        holder.wait(15)


def test_with_the_uplink_cut_a_peer_found_by_mdns_across_the_veth_serves_the_bundle(net, cloud, tmp_path, keys_dir, bundles):
    pytest.importorskip("zeroconf", reason="mDNS discovery needs python-zeroconf: pip install 'edgewise[peer]'")
    data = bundles["1.1.0"].read_bytes()
    url = cloud.add("/artifacts/digits-1.1.0.ewb", data)
    holder = _holder(net, tmp_path, keys_dir, bundles, mdns=True)
    try:
        _cut_uplink(net)
        got = _fetch(net, tmp_path, keys_dir, "fetcher", url, data, [], mdns=True)
        if got["peers"]["mdns_peers"] == []:
            pytest.skip("mDNS found no peer across the veth pair (multicast not forwarded in this kernel/sandbox)")
        assert got["peers"]["mdns_peers"] == ["http://10.77.0.1:8471"]
        assert got["result"]["result"] == "ok" and got["running"] == "1.1.0"
        assert cloud.sent("/artifacts/digits-1.1.0.ewb") == 0
    finally:
        holder.stdin.close()
        holder.wait(15)
