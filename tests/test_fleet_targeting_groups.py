"""Groups: saved device queries evaluated when used, attribute conditions, maintenance windows, REST."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise.control import ServerSettings, create_app
from edgewise.control import groups as g
from edgewise.control.db import init_db
from edgewise.control.devices import register_device
from edgewise.control.errors import ConflictError, InvalidRequestError
from edgewise.control.models import Device, Group

PI = {"arch": "aarch64", "ram_mb": 1024, "cores": 4, "hardware_class": "rpi4", "providers": ["CPUExecutionProvider"],
      "isa": ["asimd"]}
X86 = {"arch": "x86_64", "ram_mb": 8192, "cores": 8, "hardware_class": "x86-gateway",
       "providers": ["CPUExecutionProvider", "OpenVINOExecutionProvider"], "isa": ["avx2", "avx512_vnni", "fma"]}


@pytest.fixture()
def db(tmp_path, db_url):
    database = init_db(db_url)
    yield database
    database.dispose()


def _device(session, device_id, tags=(), hardware=None, **columns):
    device, _ = register_device(session, device_id, tags)
    device.hardware = hardware
    for k, v in columns.items():
        setattr(device, k, v)
    session.commit()
    return device


def _group(session, name, query=None, maintenance=(), rate=None):
    return g.create_group(session, g.parse_spec({"name": name, "query": query or {}, "maintenance": list(maintenance),
                                                 "rate_limit_per_min": rate}))


def _ids(devices):
    return [d.id for d in devices]


# -- queries ----------------------------------------------------------------------------------------


def test_an_empty_query_holds_every_device(db):
    with db.session() as s:
        for i in ("ge-1", "ge-2"):
            _device(s, i)
        _group(s, "everyone")
        assert _ids(g.resolve(s, "everyone")) == ["ge-1", "ge-2"]


def test_tags_all_needs_every_tag_and_tags_any_needs_one(db):
    with db.session() as s:
        _device(s, "gt-1", ["site-a", "canary"])
        _device(s, "gt-2", ["site-a"])
        _device(s, "gt-3", ["site-b", "ring0"])
        _group(s, "a-canary", {"tags_all": ["site-a", "canary"]})
        _group(s, "early", {"tags_any": ["canary", "ring0"]})
        assert _ids(g.resolve(s, "a-canary")) == ["gt-1"]
        assert _ids(g.resolve(s, "early")) == ["gt-1", "gt-3"]


def test_a_device_that_matches_later_joins_the_group(db):
    with db.session() as s:
        _group(s, "big", {"where": [{"field": "hardware.ram_mb", "op": ">=", "value": 2048}]})
        _device(s, "gl-1", hardware=PI)
        assert g.resolve(s, "big") == []
        s.get(Device, "gl-1").hardware = {**PI, "ram_mb": 4096}  # the device reported an upgrade
        _device(s, "gl-2", hardware=X86)  # a device registered after the group was saved
        assert _ids(g.resolve(s, "big")) == ["gl-1", "gl-2"]


@pytest.mark.parametrize(("condition", "expected"), [
    ({"field": "hardware.arch", "op": "==", "value": "aarch64"}, ["go-pi"]),
    ({"field": "hardware.arch", "op": "!=", "value": "aarch64"}, ["go-none", "go-x86"]),
    ({"field": "hardware.ram_mb", "op": "<", "value": 2048}, ["go-pi"]),
    ({"field": "hardware.ram_mb", "op": "<=", "value": 1024}, ["go-pi"]),
    ({"field": "hardware.cores", "op": ">", "value": 4}, ["go-x86"]),
    ({"field": "hardware.cores", "op": ">=", "value": 4}, ["go-pi", "go-x86"]),
    ({"field": "hardware.hardware_class", "op": "in", "value": ["rpi4", "rpi5"]}, ["go-pi"]),
    ({"field": "hardware.providers", "op": "contains", "value": "OpenVINOExecutionProvider"}, ["go-x86"]),
    ({"field": "hardware.isa", "op": "contains", "value": "asimd"}, ["go-pi"]),
    ({"field": "status", "op": "==", "value": "online"}, ["go-pi", "go-x86"]),
    ({"field": "version", "op": "==", "value": "1.0.0"}, ["go-x86"]),
    ({"field": "agent_version", "op": "contains", "value": "0.7"}, ["go-pi"]),
])
def test_each_attribute_operator_selects_the_devices_it_names(db, condition, expected):
    with db.session() as s:
        _device(s, "go-pi", hardware=PI, status="online", agent_version="0.7.1")
        _device(s, "go-x86", hardware=X86, status="online", model="digits", version="1.0.0", agent_version="0.6.0")
        _device(s, "go-none")  # never reported its hardware: fails every test but !=
        _group(s, "q", {"where": [condition]})
        assert _ids(g.resolve(s, "q")) == expected


def test_all_parts_of_a_query_must_hold(db):
    with db.session() as s:
        _device(s, "gand-1", ["lab"], hardware=PI)
        _device(s, "gand-2", ["lab"], hardware=X86)
        _device(s, "gand-3", [], hardware=X86)
        _group(s, "lab-x86", {"tags_all": ["lab"], "devices": ["gand-2", "gand-3"],
                              "where": [{"field": "hardware.arch", "op": "==", "value": "x86_64"}]})
        assert _ids(g.resolve(s, "lab-x86")) == ["gand-2"]


def test_comparing_a_number_with_a_string_matches_nothing_instead_of_failing(db):
    with db.session() as s:
        _device(s, "gm-1", hardware={**PI, "ram_mb": "lots"})
        _group(s, "q", {"where": [{"field": "hardware.ram_mb", "op": ">", "value": 1}]})
        assert g.resolve(s, "q") == []


@pytest.mark.parametrize(("spec", "named"), [
    ({"name": "x", "query": {"where": [{"field": "hardware.gpu", "op": "==", "value": 1}]}}, "field"),
    ({"name": "x", "query": {"where": [{"field": "status", "op": "~=", "value": 1}]}}, "op"),
    ({"name": "x", "query": {"where": [{"field": "hardware.arch", "op": "in", "value": "x86_64"}]}}, "needs a list"),
    ({"name": "x", "query": {"labels": ["a"]}}, "labels"),
    ({"name": "x", "maintenance": [{"days": ["mon"], "start": "25:00", "end": "02:00"}]}, "HH:MM"),
    ({"name": "x", "maintenance": [{"days": ["monday"], "start": "01:00", "end": "02:00"}]}, "days"),
    ({"name": "bad name!"}, "group name"),
    ({"name": "x", "rate_limit_per_min": 0}, "rate_limit_per_min"),
])
def test_an_invalid_group_is_refused_naming_what_is_wrong(spec, named):
    with pytest.raises(InvalidRequestError, match=named):
        g.parse_spec(spec)


def test_group_names_are_unique(db):
    with db.session() as s:
        _group(s, "dup")
        with pytest.raises(ConflictError, match="PUT"):
            _group(s, "dup")


# -- maintenance windows ----------------------------------------------------------------------------


def _at(day: int, hhmm: str) -> datetime:
    """2026-11-23 is a Monday: day 0 = mon .. 6 = sun."""
    h, m = map(int, hhmm.split(":"))
    return datetime(2026, 11, 23 + day, h, m, tzinfo=timezone.utc)


def _windowed(*windows) -> Group:
    return Group(name="w", query={}, maintenance=list(windows))


def test_a_group_without_windows_is_always_in_its_window():
    assert g.in_window(_windowed(), _at(2, "13:37"))


def test_a_window_is_open_from_its_start_until_just_before_its_end_on_its_days():
    group = _windowed({"days": ["tue", "thu"], "start": "02:00", "end": "04:00"})
    assert g.in_window(group, _at(1, "02:00")) and g.in_window(group, _at(3, "03:59"))
    assert not g.in_window(group, _at(1, "04:00"))
    assert not g.in_window(group, _at(1, "01:59"))
    assert not g.in_window(group, _at(2, "03:00"))  # a wednesday


def test_a_window_that_ends_before_it_starts_runs_past_midnight_into_the_next_day():
    group = _windowed({"days": ["sat"], "start": "22:00", "end": "02:00"})
    assert g.in_window(group, _at(5, "23:30"))
    assert g.in_window(group, _at(6, "01:59"))  # sunday morning: still saturday's window
    assert not g.in_window(group, _at(6, "22:30"))  # sunday evening: no window starts on sunday
    assert not g.in_window(group, _at(0, "01:00"))


def test_windows_without_days_apply_every_day_and_times_are_taken_in_utc():
    from datetime import timedelta

    group = _windowed({"start": "12:00", "end": "13:00"})
    assert all(g.in_window(group, _at(d, "12:30")) for d in range(7))
    in_cet = datetime(2026, 11, 25, 13, 30, tzinfo=timezone(timedelta(hours=1)))  # 12:30 UTC
    assert g.in_window(group, in_cet)
    assert g.in_window(group, datetime(2026, 11, 25, 12, 30))  # naive: UTC


def test_the_next_window_start_is_found_for_a_rollout_that_must_wait():
    group = _windowed({"days": ["sun"], "start": "03:00", "end": "05:00"})
    assert g.next_window_start(group, _at(2, "10:00")) == _at(6, "03:00")
    assert g.next_window_start(group, _at(6, "04:00")) == _at(6, "04:00")
    assert g.next_window_start(_windowed(), _at(0, "00:00")) == _at(0, "00:00")


# -- REST -------------------------------------------------------------------------------------------


@pytest.fixture()
def client(tmp_path, keys_dir):
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    app = create_app(settings)
    with TestClient(app) as c:
        c.headers.update(admin_headers(settings.data_dir))
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def test_groups_are_created_listed_resolved_replaced_and_deleted_over_rest(client):
    with client.app_state.control.db.session() as s:
        _device(s, "gr-pi", ["site-a"], hardware=PI)
        _device(s, "gr-x86", ["site-a"], hardware=X86)
    body = {"name": "site-a-pi", "query": {"tags_all": ["site-a"], "where": [{"field": "hardware.arch", "op": "==", "value": "aarch64"}]},
            "maintenance": [{"days": ["sat", "sun"], "start": "22:00", "end": "04:00"}], "rate_limit_per_min": 30}
    r = client.post("/api/v1/groups", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["devices"] == 1 and r.json()["rate_limit_per_min"] == 30
    assert [d["id"] for d in client.get("/api/v1/groups/site-a-pi/devices").json()] == ["gr-pi"]
    assert [x["name"] for x in client.get("/api/v1/groups").json()] == ["site-a-pi"]

    body["query"]["where"][0]["value"] = "x86_64"
    r = client.put("/api/v1/groups/site-a-pi", json={k: v for k, v in body.items() if k != "name"})
    assert r.status_code == 200, r.text
    assert [d["id"] for d in client.get("/api/v1/groups/site-a-pi/devices").json()] == ["gr-x86"]

    assert client.delete("/api/v1/groups/site-a-pi").status_code == 204
    r = client.get("/api/v1/groups/site-a-pi")
    assert r.status_code == 404 and "POST /api/v1/groups" in r.json()["detail"]


def test_an_invalid_group_over_rest_is_a_422_naming_the_field(client):
    r = client.post("/api/v1/groups", json={"name": "g", "query": {"where": [{"field": "hardware.gpus", "op": "==", "value": 1}]}})
    assert r.status_code == 422
    assert "query.where.0.field" in r.json()["detail"] and "hardware.ram_mb" in r.json()["detail"]
    assert client.post("/api/v1/groups", json={"name": "g"}).status_code == 201
    assert client.post("/api/v1/groups", json={"name": "g"}).status_code == 409


def test_a_viewer_reads_groups_but_cannot_write_them(client):
    from edgewise.control.auth import create_api_token, create_user

    with client.app_state.control.db.session() as s:
        token = create_api_token(s, create_user(s, "gv", "correct horse battery", "viewer"), name="t")[0]
    viewer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/groups", headers=viewer).status_code == 200
    assert client.post("/api/v1/groups", json={"name": "nope"}, headers=viewer).status_code == 403


def test_the_query_rules_are_documented_by_runnable_examples():
    import doctest

    assert doctest.testmod(g).failed == 0


# -- CLI --------------------------------------------------------------------------------------------


def test_the_group_cli_creates_lists_and_resolves_groups_against_a_running_control_plane(tmp_path, keys_dir):
    from typer.testing import CliRunner

    from conftest import free_port
    from edgewise.cli.main import app
    from edgewise.control.server import ControlPlane

    cp = ControlPlane(ServerSettings(data_dir=tmp_path / "cp", port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"]))
    cp.start()
    try:
        with cp.services.db.session() as s:
            _device(s, "gc-pi", ["site-a"], hardware=PI)
            _device(s, "gc-x86", ["site-a"], hardware=X86)
        runner = CliRunner()
        common = ["--server", cp.url, "--api-token", cp.admin_token]
        r = runner.invoke(app, ["group", "create", "pis", "--tag-all", "site-a", "--where", "hardware.hardware_class in [\"rpi4\"]",
                                "--where", "hardware.ram_mb >= 512", "--window", "sat,sun 22:00-04:00", "--rate", "5", *common])
        assert r.exit_code == 0, r.output
        assert "1 devices match now" in r.output
        r = runner.invoke(app, ["group", "devices", "pis", *common])
        assert r.exit_code == 0 and r.output.startswith("gc-pi\t")
        r = runner.invoke(app, ["group", "list", "--json", *common])
        assert r.exit_code == 0 and '"rate_limit_per_min": 5' in r.output
        r = runner.invoke(app, ["group", "create", "bad", "--where", "hardware.ram_mb is big", *common])
        assert r.exit_code != 0 and "FIELD OP VALUE" in r.output
        r = runner.invoke(app, ["group", "create", "bad", "--where", "hardware.gpus == 1", *common])
        assert r.exit_code != 0 and "HTTP 422" in r.output and "query.where.0.field" in r.output
        assert runner.invoke(app, ["group", "delete", "pis", *common]).exit_code == 0
    finally:
        cp.stop()
