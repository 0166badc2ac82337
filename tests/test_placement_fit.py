"""Placing models on devices within their RAM and CPU budget (issue 7, orchestration): the control plane side,
real app, real SQLite, real HTTP through TestClient."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise.bundle import build_bundle
from edgewise.control import ServerSettings, create_app
from edgewise.control.deployments import desired_state
from edgewise.control.devices import get_device
from edgewise.control.placements import AGENT_RESERVE_MB, WORKER_OVERHEAD_MB
from edgewise.protocol import DeviceState, encode, topics
from edgewise.protocol.messages import HardwareInfo, HostedModel


@pytest.fixture(scope="module")
def extra_bundles(tmp_path_factory, digits_models, signer) -> dict[str, Path]:
    """digits-a (placeable) and big 1.0.0, whose variant profile says it peaks at 300 MB."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    d = tmp_path_factory.mktemp("fit")
    out = {"digits-a": d / "digits-a.ewb", "big": d / "big.ewb"}
    build_bundle(digits_models["logreg"], name="digits-a", version="1.0.0", signer=signer, out=out["digits-a"],
                 labels=LABELS, preprocessing=PREPROCESSING)
    build_bundle(digits_models["mlp"], name="big", version="1.0.0", signer=signer, out=out["big"], labels=LABELS,
                 preprocessing=PREPROCESSING, variant={"name": "fp32", "figures": {"peak_rss_mb": 300}})
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory, keys_dir, bundles, extra_bundles):
    """One control plane for the module (its start dominates the run time); each test uses its own devices."""
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("fit-cp") / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    with TestClient(create_app(settings)) as c:
        c.headers.update(admin_headers(settings.data_dir))
        for path in (bundles["1.0.0"], extra_bundles["digits-a"], extra_bundles["big"]):
            r = c.post("/api/v1/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})
            assert r.status_code in (200, 201), r.text
        yield c


def device(client, device_id: str, *, ram_mb: int | None = 1024, cores: int = 4, primary: str | None = "digits") -> None:
    """A registered device that reported its hardware, running ``primary`` 1.0.0 (deployed)."""
    assert client.post("/api/v1/devices", json={"id": device_id}).status_code in (200, 201)
    if ram_mb is not None:
        with client.app.state.control.db.session() as s:
            get_device(s, device_id).hardware = HardwareInfo(arch="x86_64", cores=cores, ram_mb=ram_mb).model_dump(mode="json")
            s.commit()
    if primary is not None:
        r = client.post("/api/v1/deployments", json={"model": primary, "version": "1.0.0", "device_id": device_id})
        assert r.status_code == 201, r.text


def wire(client, device_id: str):
    with client.app.state.control.db.session() as s:
        return desired_state(get_device(s, device_id))


def put(client, device_id: str, *placements: dict):
    return client.put(f"/api/v1/devices/{device_id}/placements", json={"placements": list(placements)})


def test_a_placement_that_fits_is_published_in_the_desired_state_with_its_limits(client, extra_bundles):
    device(client, "fit-ok")
    before = wire(client, "fit-ok").generation
    r = put(client, "fit-ok", {"model": "digits-a", "version": "1.0.0", "threads": 2, "memory_mb": 128})
    assert r.status_code == 200, r.text
    state = wire(client, "fit-ok")
    assert state.generation == before + 1 and (state.model, state.version) == ("digits", "1.0.0")  # the primary stays
    [p] = state.placements
    assert (p.model, p.version, p.threads, p.memory_mb) == ("digits-a", "1.0.0", 2, 128)
    assert p.artifact.size == extra_bundles["digits-a"].stat().st_size and p.target  # a signed TUF target, like deployments
    listed = client.get("/api/v1/devices/fit-ok/placements").json()
    assert [(x["model"], x["status"]) for x in listed["placements"]] == [("digits-a", "pending")]
    budget = listed["budget"]
    assert budget["ram_mb"] == 1024 and budget["threads_used"] == 3 and budget["free_mb"] <= 1024 - AGENT_RESERVE_MB - 128 - WORKER_OVERHEAD_MB


def test_a_placement_over_the_free_ram_is_refused_with_409_the_reason_and_the_figures(client):
    device(client, "fit-ram", ram_mb=512)
    before = wire(client, "fit-ram").generation
    r = put(client, "fit-ram", {"model": "digits-a", "version": "1.0.0", "memory_mb": 400})
    assert r.status_code == 409
    body = r.json()
    assert "does not fit device fit-ram" in body["detail"] and "lower memory_mb" in body["detail"]
    figures = body["figures"]
    assert figures["ram_mb"] == 512 and figures["reserve_mb"] == AGENT_RESERVE_MB
    assert figures["refused"]["needed_mb"] > figures["refused"]["free_mb"] and figures["refused"]["memory_mb"] == 400
    state = wire(client, "fit-ram")
    assert state.generation == before and state.placements == []  # nothing changed


def test_the_primary_model_and_earlier_placements_count_against_the_budget(client):
    device(client, "fit-primary", ram_mb=700, primary="big")  # big's profile: 300 MB
    r = put(client, "fit-primary", {"model": "digits-a", "version": "1.0.0", "memory_mb": 256})
    assert r.status_code == 409, r.text
    assert "primary 300" in r.json()["detail"] and r.json()["figures"]["primary_mb"] == 300
    device(client, "fit-two", ram_mb=800)  # tiny primary: one placement of 256 fits, a second one does not
    assert put(client, "fit-two", {"model": "digits-a", "version": "1.0.0", "memory_mb": 256}).status_code == 200
    r = put(client, "fit-two", {"model": "digits-a", "version": "1.0.0", "memory_mb": 256}, {"model": "big", "version": "1.0.0", "memory_mb": 64})
    assert r.status_code == 409 and "big 1.0.0 does not fit" in r.json()["detail"]
    assert "other placements" in r.json()["detail"] and r.json()["figures"]["refused"]["footprint_mb"] == 300


def test_a_placement_asking_for_more_threads_than_free_cores_is_refused(client):
    device(client, "fit-cores", cores=2)
    r = put(client, "fit-cores", {"model": "digits-a", "version": "1.0.0", "threads": 2, "memory_mb": 64})
    assert r.status_code == 409
    assert "2 thread(s)" in r.json()["detail"] and "1 of its 2 core(s) are taken" in r.json()["detail"]
    assert put(client, "fit-cores", {"model": "digits-a", "version": "1.0.0", "threads": 1, "memory_mb": 64}).status_code == 200


def test_a_device_that_never_reported_its_hardware_is_refused_saying_to_wait(client):
    device(client, "fit-silent", ram_mb=None, primary=None)
    r = put(client, "fit-silent", {"model": "digits-a", "version": "1.0.0"})
    assert r.status_code == 409 and "has not reported its hardware" in r.json()["detail"]


def test_bad_requests_name_what_is_wrong(client):
    device(client, "fit-bad")
    assert put(client, "fit-bad", {"model": "nope", "version": "1.0.0"}).status_code == 404
    r = put(client, "fit-bad", {"model": "digits", "version": "1.0.0"})
    assert r.status_code == 422 and "primary model" in r.json()["detail"]
    r = put(client, "fit-bad", {"model": "digits-a", "version": "1.0.0"}, {"model": "digits-a", "version": "1.0.0"})
    assert r.status_code == 422 and "placed twice" in r.json()["detail"]
    assert put(client, "fit-bad", {"model": "digits-a", "version": "1.0.0", "threads": 0}).status_code == 422
    assert client.put("/api/v1/devices/nobody/placements", json={"placements": []}).status_code == 404


def test_removing_a_placement_publishes_a_desired_state_without_it(client):
    device(client, "fit-rm")
    assert put(client, "fit-rm", {"model": "digits-a", "version": "1.0.0", "memory_mb": 64}, {"model": "big", "version": "1.0.0", "memory_mb": 64}).status_code == 200
    gen = wire(client, "fit-rm").generation
    r = client.delete("/api/v1/devices/fit-rm/placements/digits-a")
    assert r.status_code == 200 and [p["model"] for p in r.json()["placements"]] == ["big"]
    state = wire(client, "fit-rm")
    assert state.generation == gen + 1 and [p.model for p in state.placements] == ["big"]
    r = client.delete("/api/v1/devices/fit-rm/placements/digits-a")
    assert r.status_code == 404 and "placed: big" in r.json()["detail"]


def test_what_the_agent_reports_of_its_placed_models_is_shown_with_them(client):
    device(client, "fit-report")
    assert put(client, "fit-report", {"model": "digits-a", "version": "1.0.0", "memory_mb": 64}).status_code == 200
    state = DeviceState(device_id="fit-report", model="digits", version="1.0.0", hardware=HardwareInfo(cores=4, ram_mb=1024),
                        hosted=[HostedModel(model="digits-a", version="1.0.0", status="failed", reason="exceeds its memory limit", threads=1, memory_mb=64)])
    client.app.state.control.ingest.handle(topics.state("fit-report"), encode(state))
    [p] = client.get("/api/v1/devices/fit-report/placements").json()["placements"]
    assert (p["status"], p["reason"]) == ("failed", "exceeds its memory limit")


def test_viewers_read_placements_and_only_operators_change_them(client):
    from edgewise.control.auth import create_api_token, create_user

    device(client, "fit-acl")
    with client.app.state.control.db.session() as s:
        viewer = create_api_token(s, create_user(s, "fit-viewer", "correct horse battery", "viewer"), name="v")[0]
        s.commit()
    h = {"Authorization": f"Bearer {viewer}"}
    assert client.get("/api/v1/devices/fit-acl/placements", headers=h).status_code == 200
    assert client.put("/api/v1/devices/fit-acl/placements", json={"placements": []}, headers=h).status_code == 403
    assert client.delete("/api/v1/devices/fit-acl/placements/digits-a", headers=h).status_code == 403
