"""Helpers for the site gateway tests (no tests here): a real control plane behind a cuttable uplink, site agents.

The uplink is two TCP fault proxies (tests/faultproxy.py) between the gateway and the control plane: one for MQTT,
one for HTTP. ``Uplink.cut()`` drops both (connections reset, new ones refused), ``restore()`` forwards again.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from conftest import free_port
from faultproxy import FaultProxy
from test_agent_support import make_agent, wait_for

from edgewise.agent.gateway import GatewayConfig
from edgewise.agent.outbox import Outbox
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json


def start_control_plane(tmp_path: Path, keys_dir: Path, bundles: dict[str, Path]) -> Any:
    """The real control plane, embedded broker in ``open`` mode (the gateway logs in without device credentials
    upstream: see docs/site-gateway.md), with digits 1.0.0 and 1.1.0 uploaded."""
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
                              embedded_broker_auth="open", trust=[keys_dir / "signing.pub"])
    cp = ControlPlane(settings).start()
    for path in bundles.values():
        upload_bundle(cp.url, path, cp.admin_token)
    return cp


class Uplink:
    """The site's one uplink: MQTT and HTTP to the control plane through fault proxies."""

    def __init__(self, cp: Any) -> None:
        self.mqtt = FaultProxy(cp.settings.embedded_broker_port)
        self.http = FaultProxy(cp.settings.port)

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def cut(self) -> None:
        self.mqtt.drop()
        self.http.drop()

    def restore(self) -> None:
        self.mqtt.forward()
        self.http.forward()

    def close(self) -> None:
        self.mqtt.close()
        self.http.close()


def gateway_config(state_dir: Path, uplink: Uplink, device_ids: list[str], **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = dict(
        site=f"site-{uuid.uuid4().hex[:6]}", state_dir=state_dir, upstream_server=uplink.server,
        upstream_broker=uplink.mqtt.url, listen_host="127.0.0.1", mqtt_port=0, http_port=0, device_ids=device_ids,
        reconnect_min_s=0.1, reconnect_max_s=0.5, token_recheck_s=60,
    )
    settings.update(overrides)
    return GatewayConfig(**settings)


def site_agent(tmp_path: Path, keys_dir: Path, cp: Any, mqtt_url: str, http_url: str, device_id: str,
               bundle: Path | None = None, start: bool = True, tuf: bool = False, **overrides: Any) -> Any:
    """A real agent of the site: its device token from the control plane, its server and broker the gateway.
    ``tuf``: it installs only what the control plane's TUF metadata lists (its root copied into STATE/trust)."""
    state = tmp_path / device_id
    if tuf:
        (state / "trust").mkdir(parents=True, exist_ok=True)
        shutil.copy(cp.settings.data_dir / "tuf" / "metadata" / "1.root.json", state / "trust" / "root.json")
        overrides["update_trust"] = "tuf"
    token = state / "keys" / "device.token"
    if not token.exists():  # a restarted device keeps its token (the control plane may be out of reach)
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(cp.issue_device_token(device_id))
    agent = make_agent(state, keys_dir, device_id=device_id, server_url=http_url, broker_url=mqtt_url,
                       tags=["site"], **overrides)
    if bundle is not None:
        assert agent.install(bundle).result == "ok"
    if start:
        agent.start()
    return agent


def stored_seqs(cp: Any, device: str) -> list[int]:
    """Sequence numbers of the device's stored telemetry and events ([] before the device is registered)."""
    if device_known(cp, device) is None:
        return []
    t = http_json("GET", f"{cp.url}/api/v1/devices/{device}/telemetry?limit=100000", timeout=30, token=cp.admin_token)
    e = http_json("GET", f"{cp.url}/api/v1/devices/{device}/events?limit=100000", timeout=30, token=cp.admin_token)
    return [r["seq"] for r in t] + [r["seq"] for r in e]


def device_known(cp: Any, device: str) -> dict[str, Any] | None:
    try:
        return http_json("GET", f"{cp.url}/api/v1/devices/{device}", timeout=10, token=cp.admin_token)
    except Exception:  # noqa: BLE001 - 404 until the first state message arrives
        return None


def drained(agent: Any) -> Any:
    """Connected to the gateway with at most a couple of fresh records waiting (telemetry keeps coming)."""
    def check() -> Any:
        h = agent.health()
        return h if h["connected"] and h["outbox_pending"] <= 2 else None
    return check


def assert_exactly_once(cp: Any, agent: Any, device: str, timeout: float = 60.0) -> dict[str, int]:
    """Stop the agent, read its outbox, and check the control plane stored every record it issued exactly once."""
    agent.stop()
    with Outbox(agent.state_dir / "outbox.db") as ob:
        issued = ob.issued()
        waiting = {r.seq for r in ob.peek(1_000_000)}
        dropped = sum(ob.dropped().values())
    must = set(range(issued)) - waiting
    seqs = wait_for(lambda: (s := stored_seqs(cp, device)) and len(must - set(s)) <= dropped and s, timeout,
                    interval=0.3, what=f"{len(must)} records of {device} at the control plane")
    assert len(seqs) == len(set(seqs)), "duplicate (device, seq) rows stored"
    assert set(seqs) <= set(range(issued)), "a stored seq the agent never issued"
    assert len(must - set(seqs)) == dropped == 0, f"missing {sorted(must - set(seqs))[:20]}, dropped {dropped}"
    return {"issued": issued, "stored": len(seqs), "waiting": len(waiting)}
