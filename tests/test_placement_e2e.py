"""Placement end to end: a real control plane (embedded broker, TUF) admits a placement, the real agent fetches it
through TUF, serves it in its own worker, reports it, and stops it when the placement is removed."""

from __future__ import annotations

import json
import urllib.request

import httpx
import pytest

from conftest import free_port
from edgewise.agent.tuf_client import install_root
from edgewise.bundle import build_bundle
from test_agent_support import make_agent, wait_for


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("place-e2e") / "control", port=free_port(), embedded_broker_port=free_port(),
        trust=[keys_dir / "signing.pub"],
    )
    plane = ControlPlane(settings)
    plane.start()
    yield plane
    plane.stop()


def test_a_placement_goes_through_tuf_to_a_worker_that_serves_and_is_stopped_when_removed(cp, keys_dir, bundles, digits_models, signer, tmp_path, digits_data):
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    h = {"Authorization": f"Bearer {cp.admin_token}"}
    placed = tmp_path / "digits-a.ewb"
    build_bundle(digits_models["mlp"], name="digits-a", version="1.0.0", signer=signer, out=placed, labels=LABELS, preprocessing=PREPROCESSING)
    for path in (bundles["1.0.0"], placed):
        r = httpx.post(f"{cp.url}/api/v1/models", content=path.read_bytes(), headers={**h, "Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
    dev = "place-e2e"
    state = tmp_path / dev
    (state / "keys").mkdir(parents=True)
    (state / "keys" / "device.token").write_text(cp.issue_device_token(dev) + "\n")
    (state / "trust").mkdir()
    install_root(cp.settings.data_dir / "tuf" / "metadata" / "1.root.json", state / "trust" / "root.json")
    agent = make_agent(state, keys_dir, device_id=dev, server_url=cp.url, broker_url=cp.settings.effective_broker_url, update_trust="tuf")
    agent.start()
    try:
        r = httpx.post(f"{cp.url}/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": dev}, headers=h)
        assert r.status_code == 201, r.text
        wait_for(lambda: agent.model_version == "1.0.0", timeout=60, what="the primary model through TUF")
        wait_for(lambda: (httpx.get(f"{cp.url}/api/v1/devices/{dev}/placements", headers=h).json()["budget"]["ram_mb"] or 0) > 0,
                 what="the device's hardware reported")
        r = httpx.put(f"{cp.url}/api/v1/devices/{dev}/placements", json={"placements": [{"model": "digits-a", "version": "1.0.0", "memory_mb": 128}]}, headers=h)
        assert r.status_code == 200, r.text

        def serving():
            [p] = httpx.get(f"{cp.url}/api/v1/devices/{dev}/placements", headers=h).json()["placements"]
            return p if p["status"] == "serving" and p["rss_mb"] else None

        p = wait_for(serving, timeout=60, what="digits-a serving, as the control plane sees it")
        assert p["rss_mb"] > 1
        body = json.dumps({"inputs": {"x": digits_data.x_test[:3].tolist()}}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{agent.api_port}/v1/models/digits-a/predict", data=body), timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["model"] == "digits-a" and len(answer["outputs"]["label"]) == 3
        pid = agent.hosting.get("digits-a").pid
        assert httpx.delete(f"{cp.url}/api/v1/devices/{dev}/placements/digits-a", headers=h).status_code == 200
        wait_for(lambda: agent.hosting.get("digits-a") is None, timeout=30, what="the placement stopped on the device")
        wait_for(lambda: not httpx.get(f"{cp.url}/api/v1/devices/{dev}", headers=h).is_error and _gone(pid), what="worker gone")
    finally:
        agent.stop()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except OSError:
        return True
