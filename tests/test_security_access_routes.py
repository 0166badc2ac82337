"""Every route of the app against every kind of caller, derived from the route table.

A route added without an access rule fails here (and is refused at runtime); a route whose
handler lets through someone its rule does not allow fails here too.
"""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise.control import ServerSettings, create_app
from edgewise.control.auth import (
    ANONYMOUS, PUBLIC_FRAMEWORK_PATHS, Principal, create_api_token, create_user,
    issue_device_token, rule_of,
)
from edgewise.control.devices import register_device

DEVICE_A, DEVICE_B, DEVICE_C = "acl-dev-a", "acl-dev-b", "acl-dev-c"
PLACEHOLDERS = {"name": "nomodel", "version": "9.9.9", "username": "nobody-here", "token_id": "999999"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys_dir):
    """A running app with one user per role and a device token for device A."""
    data_dir = tmp_path_factory.mktemp("acl") / "cp"
    settings = ServerSettings(data_dir=data_dir, port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])
    app = create_app(settings)
    with TestClient(app) as client:
        tokens: dict[str, str | None] = {"anonymous": None}
        with app.state.control.db.session() as s:
            for role in ("viewer", "operator", "admin"):
                user = create_user(s, f"acl-{role}", "correct horse battery", role)
                tokens[role] = create_api_token(s, user, name=f"{role} test")[0]
            for d in (DEVICE_A, DEVICE_B):
                register_device(s, d, [])
            s.commit()
            tokens["device"] = issue_device_token(s, DEVICE_A)
        yield app, client, tokens


def _principal(who: str) -> Principal:
    if who == "anonymous":
        return ANONYMOUS
    if who.startswith("device"):
        return Principal("device", DEVICE_A)
    return Principal("user", f"acl-{who}", who)  # type: ignore[arg-type]


# (caller, device_id placed in the path): device A on its own resource and on B's; users on a third device.
CALLERS = [("anonymous", DEVICE_A), ("device-own", DEVICE_A), ("device-other", DEVICE_B),
           ("viewer", DEVICE_C), ("operator", DEVICE_C), ("admin", DEVICE_C)]


def _path(template: str, device_id: str) -> str:
    values = {**PLACEHOLDERS, "device_id": device_id}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "x"), template)


def test_every_route_declares_an_access_rule(fleet):
    app, _client, _tokens = fleet
    missing = []
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute):
            if rule_of(route.original_route) is None:
                missing.append(f"{sorted(route.methods)} {route.path}")
        elif route.path not in PUBLIC_FRAMEWORK_PATHS:
            missing.append(f"{type(route.original_route).__name__} {route.path} (not an APIRoute with a rule)")
    assert not missing, "routes without an access rule: " + "; ".join(missing)


def test_every_route_answers_each_caller_exactly_as_its_rule_says(fleet):
    app, client, tokens = fleet
    wrong = []
    checked = 0
    for route in [r for r in iter_route_contexts(app.routes) if isinstance(r.original_route, APIRoute)]:
        rule = rule_of(route.original_route)  # what the runtime check sees too (scope["route"])
        assert rule is not None
        for method in sorted(route.methods - {"HEAD"}):
            for caller, device_id in CALLERS:
                path = _path(route.path, device_id)
                token = tokens["device" if caller.startswith("device") else caller]
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                kwargs = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
                r = client.request(method, path, headers=headers, **kwargs)
                params = {"device_id": device_id}
                allowed = rule.allows(_principal(caller), params)
                if allowed:
                    ok = r.status_code not in (401, 403)
                elif caller == "anonymous":
                    ok = r.status_code == 401 and r.headers.get("content-type", "").startswith("application/json")
                else:
                    ok = r.status_code == 403
                checked += 1
                if not ok:
                    wrong.append(f"{caller} {method} {path} -> {r.status_code} (rule: {rule.describe()}) {r.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert checked > 100


def test_a_device_reads_its_own_record_but_not_another_devices_or_the_fleet_list(fleet):
    _app, client, tokens = fleet
    h = {"Authorization": f"Bearer {tokens['device']}"}
    assert client.get(f"/api/v1/devices/{DEVICE_A}", headers=h).status_code == 200
    assert client.get(f"/api/v1/devices/{DEVICE_A}/events", headers=h).status_code == 200
    assert client.get(f"/api/v1/devices/{DEVICE_B}", headers=h).status_code == 403
    assert client.get(f"/api/v1/devices/{DEVICE_B}/telemetry", headers=h).status_code == 403
    assert client.get("/api/v1/devices", headers=h).status_code == 403
    assert client.get("/api/v1/telemetry/latest", headers=h).status_code == 403


def test_a_route_added_without_a_rule_is_refused_at_runtime_and_reported(tmp_path, keys_dir):
    app = create_app(ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0))

    @app.get("/api/v1/forgotten")
    def forgotten() -> dict[str, str]:
        return {"secret": "fleet data"}

    route = next(r for r in iter_route_contexts(app.routes) if r.path == "/api/v1/forgotten")
    assert rule_of(route.original_route) is None
    with TestClient(app) as client:
        r = client.get("/api/v1/forgotten", headers=admin_headers(tmp_path / "cp"))
    assert r.status_code == 403
    assert "declares no access rule" in r.json()["detail"]
