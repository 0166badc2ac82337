"""Peer distribution: bytes the control plane serves, and rollout time over a slow uplink, with peers on and off (issue 9).

Setup (one machine, loopback): N real agents (``Agent``, encryption at rest on, signature-only trust, peer server
on 127.0.0.1), one site tag. The control plane's artifact server is a real HTTP server with Range support behind
a shared token bucket of ``UPLINK_BPS`` (the site's one uplink: every download from the control plane shares it);
peers talk over loopback unthrottled (the site LAN). The rollout is what the control plane's rollout engine does:
waves of 1 (canary), 2, 4, ... devices, each wave's devices updating at the same time. With peers on, each device's
desired state names up to 3 devices that hold the bundle, picked by the control plane's own ``PeerDirectory`` from
the DeviceState each holder reported (``peer_url``, ``holds``). Every install verifies size, sha256 and the bundle
signature exactly as without peers.

Figures: bytes served by the control plane, per-device share, the most any one peer uploaded, wall time of the
rollout (noisy on a shared machine: compare the two rows of one run, not across runs).
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

AGENTS = 12
UPLINK_BPS = 400_000  # bytes/s: a ~3 Mbit/s site uplink
HINTS = 3


class _Uplink:
    """A token bucket shared by every response of the origin: the site's uplink."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class _Origin:
    def __init__(self, data: bytes, rate: float) -> None:
        self.data = data
        self.bytes_sent = 0
        self.requests = 0
        uplink = _Uplink(rate)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests += 1
                rng = self.headers.get("Range")
                start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
                body = outer.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for off in range(0, len(body), 16 * 1024):
                    chunk = body[off:off + 16 * 1024]
                    uplink.take(len(chunk))
                    self.wfile.write(chunk)
                    outer.bytes_sent += len(chunk)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/artifacts/digits-1.1.0.ewb"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _waves(n: int) -> list[list[int]]:
    out, i, size = [], 0, 1
    while i < n:
        out.append(list(range(i, min(n, i + size))))
        i += size
        size *= 2
    return out


def _rollout(root: Path, bundle: Path, pub: Path, *, peers_on: bool, n: int, rate: float) -> dict[str, Any]:
    from edgewise.agent.config import AgentConfig
    from edgewise.agent.service import Agent
    from edgewise.control.peers import PeerDirectory
    from edgewise.protocol import ArtifactRef, DesiredState

    data = bundle.read_bytes()
    origin = _Origin(data, rate)
    ref = ArtifactRef(url=origin.url, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    directory = PeerDirectory(limit=HINTS)
    agents = []
    try:
        for i in range(n):
            state = root / f"{'on' if peers_on else 'off'}-{i}"
            (state / "trust").mkdir(parents=True)
            (state / "trust" / "signing.pub").write_bytes(pub.read_bytes())
            cfg = AgentConfig(device_id=f"bench-peer-{i}", state_dir=state, api_port=0, server_url=origin.url.rsplit("/", 2)[0],
                              update_trust="signature-only", tags=["site-1"], threads=1,
                              peer_port=0 if peers_on else None, peer_host="127.0.0.1", peer_fetch=peers_on)
            agent = Agent(cfg)
            if agent.peers is not None:
                agent.peers.start()
            agents.append(agent)
        failures: list[str] = []
        t0 = time.perf_counter()
        for wave in _waves(n):
            def update(i: int) -> None:
                a = agents[i]
                hint = directory.peers_for(a.device_id, ref.sha256, tags=["site-1"]) if peers_on else []
                desired = DesiredState(device_id=a.device_id, generation=1, model="digits", version="1.1.0", artifact=ref, peers=hint)
                if a.peers is not None:
                    a.peers.hint(desired.peers)
                result = a.updater.apply(desired)
                if result.result != "ok":
                    failures.append(f"{a.device_id}: {result.reason}")
                if peers_on:
                    directory.record(a.device_state())  # what its retained state would tell the control plane

            threads = [threading.Thread(target=update, args=(i,)) for i in wave]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        took = time.perf_counter() - t0
        served = [a.peers.server.bytes_served for a in agents if a.peers is not None and a.peers.server is not None]
        from_peers = sum(a.peers.fetcher.stats.fetched_from_peer for a in agents if a.peers is not None)
        return {
            "agents": n,
            "bundle_bytes": len(data),
            "cp_bytes": origin.bytes_sent,
            "cp_requests": origin.requests,
            "cp_bytes_per_device": round(origin.bytes_sent / n, 1),
            "fetched_from_peers": from_peers,
            "max_bytes_one_peer_served": max(served) if served else 0,
            "rollout_s": round(took, 2),
            "waves": len(_waves(n)),
            "all_running": all(a.model_version == "1.1.0" for a in agents),
            "failures": failures,
        }
    finally:
        for a in agents:
            if a.peers is not None:
                a.peers.stop()
            a.stop()
        origin.close()


def run(agents: int = AGENTS, uplink_bps: float = UPLINK_BPS) -> dict:
    from _common import build_demo_bundles, machine, tempdir

    root = tempdir("ew-bench-peer-")
    bundles, pub = build_demo_bundles(root)
    off = _rollout(root, bundles["1.1.0"], pub, peers_on=False, n=agents, rate=uplink_bps)
    on = _rollout(root, bundles["1.1.0"], pub, peers_on=True, n=agents, rate=uplink_bps)
    return {
        "machine": machine(),
        "uplink_bps": uplink_bps,
        "hints": HINTS,
        "off": off,
        "on": on,
        "cp_bytes_ratio": round(on["cp_bytes"] / off["cp_bytes"], 4) if off["cp_bytes"] else None,
        "rollout_time_ratio": round(on["rollout_s"] / off["rollout_s"], 3) if off["rollout_s"] else None,
    }


def markdown(r: dict) -> str:
    off, on = r["off"], r["on"]
    lines = [
        f"Peer distribution (`benchmarks/bench_peer.py`): {off['agents']} real agents roll digits 1.1.0 "
        f"({off['bundle_bytes']:,} bytes) out in {off['waves']} waves (1, 2, 4, ...), the control plane's artifact server "
        f"behind one shared {r['uplink_bps'] * 8 / 1e6:.1f} Mbit/s uplink, peers on loopback; with peers on, each desired state "
        f"names up to {r['hints']} holders picked by the control plane's `PeerDirectory`. Every install verifies size, sha256 and "
        "signature either way.",
        "",
        "| peers | bytes from the control plane | per device | requests to it | fetched from peers | most one peer uploaded | rollout s | all on 1.1.0 |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in (("off", off), ("on", on)):
        lines.append(
            f"| {name} | {row['cp_bytes']:,} | {row['cp_bytes_per_device']:,} | {row['cp_requests']} | {row['fetched_from_peers']} | "
            f"{row['max_bytes_one_peer_served']:,} | {row['rollout_s']} | {'yes' if row['all_running'] else 'NO'} |"
        )
    lines += [
        "",
        f"Control-plane bytes with peers on / off: **{r['cp_bytes_ratio']}** (1/N = {1 / off['agents']:.3f}: only the canary "
        f"downloads from the control plane); rollout time on / off: {r['rollout_time_ratio']} (same run; the uplink, not the "
        "CPU, bounds the 'off' row).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    res = run()
    print(json.dumps(res, indent=2))
    print(markdown(res))
