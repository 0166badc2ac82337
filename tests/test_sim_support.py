"""Helpers for the simulator tests and the rollout scenarios: a real control plane on a real broker, digits bundles
of any version, and a small REST client with the bootstrap admin token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from edgewise.bundle import build_bundle
from edgewise.control import ControlPlane, ServerSettings


def build_versions(out_dir: Path, model_bytes: bytes, signer: Any, versions: list[str], *, name: str = "digits") -> dict[str, Path]:
    """Signed bundles of one model under several version numbers (the simulated devices never run them; the registry needs them)."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for v in versions:
        path = out_dir / f"{name}-{v}.ewb"
        build_bundle(model_bytes, name=name, version=v, signer=signer, out=path, labels=LABELS, preprocessing=PREPROCESSING)
        paths[v] = path
    return paths


def start_control_plane(data_dir: Path, broker_url: str | None, trust: Path, **extra: Any) -> ControlPlane:
    """A control plane on ``broker_url`` (None: its embedded broker), with a fast rollout tick where the setting exists."""
    fields = ServerSettings.model_fields
    opts: dict[str, Any] = {k: v for k, v in extra.items() if k in fields}
    if "rollout_tick_s" in fields and "rollout_tick_s" not in opts:
        opts["rollout_tick_s"] = 0.1
    if broker_url is not None:
        opts["broker_url"] = broker_url
    else:
        opts["embedded_broker_port"] = 0
    return ControlPlane(ServerSettings(data_dir=data_dir, port=0, trust=[trust], **opts)).start()


class Api:
    """The control plane's REST API with the admin token; every call asserts the status it expects."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.http = httpx.Client(base_url=cp.url, headers={"Authorization": f"Bearer {cp.admin_token}"}, timeout=30)

    def call(self, method: str, path: str, *, json: Any = None, content: bytes | None = None, expect: int | tuple[int, ...] = (200, 201)) -> Any:
        headers = {"Content-Type": "application/octet-stream"} if content is not None else None
        r = self.http.request(method, path, json=json, content=content, headers=headers)
        ok = (expect,) if isinstance(expect, int) else expect
        assert r.status_code in ok, f"{method} {path} -> {r.status_code}: {r.text[:500]}"
        return r.json() if r.content else None

    def upload(self, path: Path) -> Any:
        return self.call("POST", "/api/v1/models", content=path.read_bytes())

    def deploy(self, version: str, *, tag: str | None = None, device_ids: list[str] | None = None, rollback: bool = False) -> Any:
        body: dict[str, Any] = {"model": "digits", "version": version, "rollback": rollback}
        if tag is not None:
            body["tag"] = tag
        elif device_ids is not None and len(device_ids) == 1:
            body["device_id"] = device_ids[0]
        else:
            body["device_ids"] = device_ids
        return self.call("POST", "/api/v1/deployments", json=body)

    def wait_registered(self, device_ids: list[str], timeout: float = 15.0) -> None:
        """Connected is not yet registered: the control plane registers a device when it stores its first state."""
        import time

        deadline = time.monotonic() + timeout
        while not set(device_ids) <= {d["id"] for d in self.call("GET", "/api/v1/devices")}:
            assert time.monotonic() < deadline, f"devices not registered after {timeout} s: {device_ids[:5]}"
            time.sleep(0.05)

    def device(self, device_id: str) -> Any:
        return self.call("GET", f"/api/v1/devices/{device_id}")

    def close(self) -> None:
        self.http.close()
