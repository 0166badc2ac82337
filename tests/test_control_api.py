"""The REST API and dashboard through FastAPI's TestClient (real app, real SQLite, embedded broker)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise.bundle import build_bundle
from edgewise.control import ServerSettings, create_app
from edgewise.security import load_signer


@pytest.fixture()
def settings(tmp_path, keys_dir):
    return ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings)) as c:
        c.headers.update(admin_headers(settings.data_dir))
        yield c


def upload(client, path, *, multipart=False):
    if multipart:
        with open(path, "rb") as f:
            return client.post("/api/v1/models", files={"file": (path.name, f, "application/octet-stream")})
    return client.post("/api/v1/models", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})


def stored_bundles(settings):
    return sorted(p.name for p in settings.bundles_dir.glob("*.ewb"))


# -- models ----------------------------------------------------------------------------------------


def test_uploaded_bundle_is_listed_and_downloads_byte_for_byte(client, bundles):
    r = upload(client, bundles["1.0.0"])
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["version"]) == ("digits", "1.0.0")
    assert body["url"] == "/api/v1/models/digits/1.0.0/bundle"
    assert body["manifest"]["labels"] == [str(i) for i in range(10)]

    assert client.get("/api/v1/models").json() == [{"name": "digits", "versions": ["1.0.0"], "latest": "1.0.0"}]
    assert [v["version"] for v in client.get("/api/v1/models/digits").json()] == ["1.0.0"]
    assert client.get("/api/v1/models/digits/1.0.0").json()["sha256"] == body["sha256"]

    dl = client.get(body["url"])
    assert dl.status_code == 200
    assert dl.content == bundles["1.0.0"].read_bytes()
    assert dl.headers["etag"] == f'"{body["sha256"]}"'
    assert dl.headers["accept-ranges"] == "bytes"


def test_multipart_upload_is_accepted_too(client, bundles):
    r = upload(client, bundles["1.1.0"], multipart=True)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == "1.1.0"


def test_range_request_returns_206_with_exactly_those_bytes(client, bundles):
    upload(client, bundles["1.0.0"])
    data = bundles["1.0.0"].read_bytes()
    r = client.get("/api/v1/models/digits/1.0.0/bundle", headers={"Range": "bytes=100-1099"})
    assert r.status_code == 206
    assert r.content == data[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{len(data)}"

    tail = client.get("/api/v1/models/digits/1.0.0/bundle", headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206 and tail.content == data[-10:]


def test_resume_with_if_range_on_a_matching_etag_gets_the_range(client, bundles):
    sha = upload(client, bundles["1.0.0"]).json()["sha256"]
    r = client.get("/api/v1/models/digits/1.0.0/bundle", headers={"Range": "bytes=0-9", "If-Range": f'"{sha}"'})
    assert r.status_code == 206 and len(r.content) == 10


def test_corrupt_bundle_is_refused_with_422_naming_the_failure_and_nothing_is_stored(client, settings, bundles, tmp_path):
    data = bytearray(bundles["1.0.0"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.ewb"
    bad.write_bytes(bytes(data))
    r = upload(client, bad)
    assert r.status_code == 422
    assert r.json()["error"] == "BundleRejectedError"
    assert "bundle rejected" in r.json()["detail"]
    assert client.get("/api/v1/models").json() == []
    assert stored_bundles(settings) == []


def test_not_a_bundle_at_all_is_refused_with_422(client):
    r = client.post("/api/v1/models", content=b"hello", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 422 and "too short" in r.json()["detail"]


def test_bundle_signed_by_an_unknown_key_is_refused_naming_the_key(client, settings, digits_models, keys_dir, tmp_path):
    stranger = load_signer(keys_dir / "other.key")
    path = tmp_path / "stranger.ewb"
    build_bundle(digits_models["logreg"], name="digits", version="3.0.0", signer=stranger, out=path)
    r = upload(client, path)
    assert r.status_code == 422
    assert stranger.key_id in r.json()["detail"] and "not trusted" in r.json()["detail"]
    assert stored_bundles(settings) == []


def test_reupload_of_identical_bytes_is_200_and_of_different_bytes_is_409(client, bundles, digits_models, signer, tmp_path):
    assert upload(client, bundles["1.0.0"]).status_code == 201
    assert upload(client, bundles["1.0.0"]).status_code == 200
    other = tmp_path / "other.ewb"
    build_bundle(digits_models["mlp"], name="digits", version="1.0.0", signer=signer, out=other)
    r = upload(client, other)
    assert r.status_code == 409
    assert "immutable" in r.json()["detail"]


def test_upload_larger_than_the_limit_is_refused_with_413(tmp_path, keys_dir, bundles):
    s = ServerSettings(data_dir=tmp_path / "cp", embedded_broker_port=0, trust=[keys_dir / "signing.pub"],
                       max_upload_mb=0.001)
    with TestClient(create_app(s)) as c:
        c.headers.update(admin_headers(s.data_dir))
        r = upload(c, bundles["1.0.0"])
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]


def test_unsupported_content_type_is_refused_with_415(client):
    r = client.post("/api/v1/models", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_unknown_model_and_version_are_404_naming_them(client, bundles):
    assert "no model named 'nope'" in client.get("/api/v1/models/nope").json()["detail"]
    upload(client, bundles["1.0.0"])
    r = client.get("/api/v1/models/digits/7.0.0/bundle")
    assert r.status_code == 404 and "digits 7.0.0 not found" in r.json()["detail"]


# -- devices and deployments -----------------------------------------------------------------------


def test_registered_devices_are_listed_and_shown(client):
    assert client.post("/api/v1/devices", json={"id": "cam-1", "tags": ["lab", "shelf-3"]}).status_code == 201
    assert client.post("/api/v1/devices", json={"id": "cam-2"}).status_code == 201
    devices = client.get("/api/v1/devices").json()
    assert [d["id"] for d in devices] == ["cam-1", "cam-2"]
    one = client.get("/api/v1/devices/cam-1").json()
    assert one["tags"] == ["lab", "shelf-3"] and one["status"] == "registered"
    assert one["desired"] is None and one["in_sync"] and one["telemetry"] is None
    assert [d["id"] for d in client.get("/api/v1/devices", params={"tag": "shelf-3"}).json()] == ["cam-1"]


def test_registering_again_replaces_the_tags(client):
    client.post("/api/v1/devices", json={"id": "cam-1", "tags": ["a"]})
    r = client.post("/api/v1/devices", json={"id": "cam-1", "tags": ["b"]})
    assert r.status_code == 200 and r.json()["tags"] == ["b"]


def test_invalid_device_id_is_422_saying_what_is_allowed(client):
    r = client.post("/api/v1/devices", json={"id": "cam/1"})
    assert r.status_code == 422 and "invalid device id" in r.json()["detail"]


def test_unknown_device_is_404_naming_it(client):
    r = client.get("/api/v1/devices/ghost")
    assert r.status_code == 404 and "'ghost' is not registered" in r.json()["detail"]
    assert client.get("/api/v1/devices/ghost/telemetry").status_code == 404


def test_deployment_sets_the_desired_version_shown_for_each_target(client, bundles):
    upload(client, bundles["1.0.0"])
    for dev, tags in (("a", ["lab"]), ("b", ["lab"]), ("c", [])):
        client.post("/api/v1/devices", json={"id": dev, "tags": tags})
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "tag": "lab"})
    assert r.status_code == 201, r.text
    assert r.json()["device_ids"] == ["a", "b"] and r.json()["generations"] == {"a": 1, "b": 1}
    devices = {d["id"]: d for d in client.get("/api/v1/devices").json()}
    assert devices["a"]["desired"]["version"] == "1.0.0" and not devices["a"]["in_sync"]
    assert devices["c"]["desired"] is None
    listed = client.get("/api/v1/deployments").json()
    assert [(d["target_kind"], d["target_value"], d["device_count"]) for d in listed] == [("tag", "lab", 2)]


def test_a_rollback_deployment_is_published_in_the_desired_state_and_a_normal_one_clears_it(client, bundles):
    from edgewise.control.deployments import desired_state

    upload(client, bundles["1.0.0"])
    upload(client, bundles["1.1.0"])
    client.post("/api/v1/devices", json={"id": "a"})
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "a", "rollback": True})
    assert r.status_code == 201, r.text
    assert client.get("/api/v1/devices/a").json()["desired"]["rollback"] is True
    with client.app.state.control.db.session() as s:  # what goes on the wire
        from edgewise.control.devices import get_device

        state = desired_state(get_device(s, "a"))
    assert state is not None and state.rollback is True and state.version == "1.0.0"
    client.post("/api/v1/deployments", json={"model": "digits", "version": "1.1.0", "device_id": "a"})
    assert client.get("/api/v1/devices/a").json()["desired"]["rollback"] is False


def test_deployment_needs_exactly_one_target(client):
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "a", "tag": "x"})
    assert r.status_code == 422 and "exactly one target" in r.text


def test_deployment_of_an_unknown_version_is_404_saying_how_to_fix_it(client):
    client.post("/api/v1/devices", json={"id": "a"})
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": "a"})
    assert r.status_code == 404 and "POST /api/v1/models" in r.json()["detail"]


# -- system, dashboard, OpenAPI --------------------------------------------------------------------


def test_health_reports_database_and_broker(client):
    h = client.get("/api/v1/health").json()
    assert h["status"] == "ok" and h["database"] == "ok"
    assert h["mqtt"]["embedded"] and h["mqtt"]["connected"]


def test_stats_start_at_zero(client):
    s = client.get("/api/v1/stats").json()
    assert s["ingest"]["telemetry_rows"] == 0 and s["ingest"]["duplicates"] == 0 and s["ingest"]["bad"] == 0
    assert s["devices"] == 0 and s["stored"] == {"telemetry": 0, "events": 0, "summaries": 0}


def test_dashboard_page_is_served_with_the_fleet_table_and_its_script(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in ('id="fleet"', "Desired", "Actual", "Status", "Last seen", "p95", "/dashboard/app.js"):
        assert needle in r.text
    js = client.get("/dashboard/app.js")
    assert js.status_code == 200 and "/api/v1/devices" in js.text and "setInterval" in js.text
    assert "http" not in client.get("/dashboard/style.css").text  # nothing fetched from elsewhere


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        "/api/v1/devices": {"get", "post"},
        "/api/v1/devices/{device_id}": {"get"},
        "/api/v1/devices/{device_id}/telemetry": {"get"},
        "/api/v1/devices/{device_id}/events": {"get"},
        "/api/v1/models": {"get", "post"},
        "/api/v1/models/{name}": {"get"},
        "/api/v1/models/{name}/{version}": {"get"},
        "/api/v1/models/{name}/{version}/bundle": {"get"},
        "/api/v1/deployments": {"get", "post"},
        "/api/v1/telemetry/latest": {"get"},
        "/api/v1/stats": {"get"},
        "/api/v1/health": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    body = paths["/api/v1/models"]["post"]["requestBody"]["content"]
    assert {"application/octet-stream", "multipart/form-data"} <= set(body)
