"""Access control on the control plane: bootstrap, passwords, tokens, sessions and CSRF, audit, HTTPS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import stat

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from conftest import admin_headers
from edgewise.control import ServerSettings, create_app
from edgewise.control.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, create_user
from edgewise.control.models import ApiToken, User
from edgewise.control.server import ControlPlane
from edgewise.control.services import ControlStartError
from edgewise.sim.fleet import http_json

PASSWORD = "correct horse battery staple"


@pytest.fixture()
def settings(tmp_path, keys_dir):
    return ServerSettings(data_dir=tmp_path / "cp", port=0, embedded_broker_port=0, trust=[keys_dir / "signing.pub"])


@pytest.fixture()
def app_client(settings):
    app = create_app(settings)
    with TestClient(app) as client:
        yield app, client


def _user(app, name: str, role: str) -> None:
    with app.state.control.db.session() as s:
        create_user(s, name, PASSWORD, role)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token_for(client, admin: dict[str, str], username: str, **extra) -> str:
    r = client.post("/api/v1/tokens", json={"name": f"{username}-script", "username": username, **extra}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["token"]


# -- bootstrap -------------------------------------------------------------------------------------


def test_first_start_creates_admin_with_a_0600_token_file_and_logs_where_not_what(settings, caplog):
    caplog.set_level(logging.WARNING, logger="edgewise.control.auth")
    with TestClient(create_app(settings)) as client:
        token_file = settings.data_dir / "admin.token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((settings.data_dir / "initial-admin-password").stat().st_mode) == 0o600
        assert client.get("/api/v1/auth/me", headers=_bearer(token)).json() == {
            "kind": "user", "name": "admin", "role": "admin", "via": "bearer"}
    log = caplog.text
    assert str(token_file) in log and token not in log
    assert (settings.data_dir / "initial-admin-password").read_text().strip() not in log


def test_a_second_start_keeps_the_users_and_does_not_rewrite_the_token(settings):
    with TestClient(create_app(settings)):
        first = (settings.data_dir / "admin.token").read_text()
    with TestClient(create_app(settings)) as client:
        assert (settings.data_dir / "admin.token").read_text() == first
        assert [u["username"] for u in client.get("/api/v1/users", headers=admin_headers(settings.data_dir)).json()] == ["admin"]


def test_control_plane_admin_token_reads_the_bootstrap_token(settings):
    with ControlPlane(settings) as cp:
        assert http_json("GET", f"{cp.url}/api/v1/auth/me", token=cp.admin_token)["role"] == "admin"


# -- passwords and sign-in -------------------------------------------------------------------------


def test_passwords_are_stored_as_argon2id_hashes(app_client):
    app, _client = app_client
    _user(app, "alice", "viewer")
    with app.state.control.db.session() as s:
        stored = s.query(User).filter_by(username="alice").one().password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert "m=65536" in stored  # memory-hard: 64 MiB


def test_login_sets_an_httponly_samesite_strict_session_cookie(app_client):
    app, client = app_client
    _user(app, "alice", "operator")
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200, r.text
    cookies = r.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in session and "SameSite=strict" in session
    assert client.get("/api/v1/auth/me").json()["name"] == "alice"
    assert client.get("/api/v1/devices").status_code == 200


def test_wrong_password_is_401_and_recorded_as_a_failed_login(app_client, settings):
    app, client = app_client
    _user(app, "alice", "viewer")
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": "not it at all"})
    assert r.status_code == 401 and "wrong username or password" in r.json()["detail"]
    entries = client.get("/api/v1/audit", headers=admin_headers(settings.data_dir)).json()
    assert entries[0]["action"] == "login.failed" and entries[0]["actor"] == "user:alice"
    assert entries[0]["remote"] == "testclient"


def test_a_change_with_the_session_cookie_but_without_the_csrf_header_is_refused(app_client):
    app, client = app_client
    _user(app, "olga", "operator")
    login = client.post("/api/v1/auth/login", json={"username": "olga", "password": PASSWORD})
    r = client.post("/api/v1/devices", json={"id": "csrf-dev", "tags": []})
    assert r.status_code == 403 and CSRF_HEADER in r.json()["detail"]
    r = client.post("/api/v1/devices", json={"id": "csrf-dev", "tags": []},
                    headers={CSRF_HEADER: client.cookies[CSRF_COOKIE]})
    assert r.status_code == 201, r.text
    assert client.cookies[CSRF_COOKIE] == login.json()["csrf_token"]


def test_logout_ends_the_session(app_client):
    app, client = app_client
    _user(app, "alice", "viewer")
    csrf = client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}).json()["csrf_token"]
    session_token = client.cookies[SESSION_COOKIE]
    assert client.post("/api/v1/auth/logout", headers={CSRF_HEADER: csrf}).status_code == 204
    client.cookies.set(SESSION_COOKIE, session_token)  # replaying the old cookie
    r = client.get("/api/v1/devices")
    assert r.status_code == 401 and "sign in again" in r.json()["detail"]


# -- tokens ----------------------------------------------------------------------------------------


def test_api_tokens_are_shown_once_and_stored_only_as_sha256(app_client, settings):
    app, client = app_client
    admin = admin_headers(settings.data_dir)
    created = client.post("/api/v1/tokens", json={"name": "ci"}, headers=admin).json()
    token = created["token"]
    listed = client.get("/api/v1/tokens", headers=admin).json()
    assert all("token" not in t for t in listed) and any(t["id"] == created["id"] for t in listed)
    with app.state.control.db.session() as s:
        row = s.get(ApiToken, created["id"])
        import hashlib

        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in (row.token_hash, row.prefix)


def test_a_revoked_or_expired_token_is_401(app_client, settings):
    app, client = app_client
    admin = admin_headers(settings.data_dir)
    _user(app, "bob", "viewer")
    token = _token_for(client, admin, "bob")
    assert client.get("/api/v1/devices", headers=_bearer(token)).status_code == 200
    token_id = next(t["id"] for t in client.get("/api/v1/tokens?all=true", headers=admin).json() if t["owner"] == "user:bob")
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=admin).status_code == 200
    r = client.get("/api/v1/devices", headers=_bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]

    expiring = _token_for(client, admin, "bob", expires_in_days=1)
    with app.state.control.db.session() as s:
        row = s.query(ApiToken).filter(ApiToken.name == "bob-script", ApiToken.revoked_at.is_(None)).one()
        row.expires_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        s.commit()
    assert client.get("/api/v1/devices", headers=_bearer(expiring)).status_code == 401


def test_a_token_acts_with_its_users_current_role(app_client, settings):
    app, client = app_client
    admin = admin_headers(settings.data_dir)
    _user(app, "carol", "viewer")
    token = _token_for(client, admin, "carol")
    assert client.post("/api/v1/devices", json={"id": "role-dev"}, headers=_bearer(token)).status_code == 403
    assert client.patch("/api/v1/users/carol", json={"role": "operator"}, headers=admin).status_code == 200
    assert client.post("/api/v1/devices", json={"id": "role-dev"}, headers=_bearer(token)).status_code == 201
    assert client.patch("/api/v1/users/carol", json={"disabled": True}, headers=admin).status_code == 200
    assert client.get("/api/v1/devices", headers=_bearer(token)).status_code == 401


def test_only_admins_create_tokens_for_other_users(app_client, settings):
    app, client = app_client
    _user(app, "vic", "viewer")
    token = _token_for(client, admin_headers(settings.data_dir), "vic")
    r = client.post("/api/v1/tokens", json={"name": "escalate", "username": "admin"}, headers=_bearer(token))
    assert r.status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "mine"}, headers=_bearer(token)).status_code == 201


def test_the_last_admin_cannot_be_demoted_or_deleted(app_client, settings):
    _app, client = app_client
    admin = admin_headers(settings.data_dir)
    r = client.patch("/api/v1/users/admin", json={"role": "viewer"}, headers=admin)
    assert r.status_code == 409 and "last enabled admin" in r.json()["detail"]
    assert client.delete("/api/v1/users/admin", headers=admin).status_code == 409


def test_a_revoked_device_token_no_longer_downloads(app_client, settings):
    _app, client = app_client
    admin = admin_headers(settings.data_dir)
    token = client.post("/api/v1/devices/dev-rv/token", headers=admin).json()["token"]
    assert client.get("/api/v1/devices/dev-rv/events", headers=_bearer(token)).status_code == 404  # allowed, unknown yet
    assert client.delete("/api/v1/devices/dev-rv/token", headers=admin).json() == {"device_id": "dev-rv", "revoked": 1}
    assert client.get("/api/v1/devices/dev-rv/events", headers=_bearer(token)).status_code == 401


# -- audit -----------------------------------------------------------------------------------------


def test_a_deployment_shows_up_in_the_audit_log_with_its_actor(app_client, settings, bundles):
    app, client = app_client
    admin = admin_headers(settings.data_dir)
    _user(app, "dora", "operator")
    dora = _bearer(_token_for(client, admin, "dora"))
    r = client.post("/api/v1/models", content=bundles["1.0.0"].read_bytes(),
                    headers={**dora, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert client.post("/api/v1/devices", json={"id": "aud-1", "tags": ["site-x"]}, headers=dora).status_code == 201
    r = client.post("/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "tag": "site-x"}, headers=dora)
    assert r.status_code == 201, r.text

    entries = client.get("/api/v1/audit?action=deployments", headers=dora).json()
    [deploy] = entries
    assert deploy["actor"] == "token:dora-script (user:dora)" and deploy["role"] == "operator"
    assert deploy["action"] == "POST /api/v1/deployments" and deploy["target"] == "tag:site-x"
    assert deploy["detail"] == {"deployment": r.json()["id"], "model": "digits", "version": "1.0.0",
                                "rollback": False, "devices": 1}
    assert deploy["status"] == 201 and deploy["remote"] == "testclient"
    actions = [e["action"] for e in client.get("/api/v1/audit", headers=admin).json()]
    assert "POST /api/v1/models" in actions and "POST /api/v1/tokens" in actions


def test_reads_and_refused_changes_are_not_audited(app_client, settings):
    app, client = app_client
    admin = admin_headers(settings.data_dir)
    before = len(client.get("/api/v1/audit", headers=admin).json())
    client.get("/api/v1/devices", headers=admin)
    client.post("/api/v1/deployments", json={"model": "nope", "version": "1.0.0", "tag": "x"}, headers=admin)  # 404
    client.post("/api/v1/devices", json={"id": "x"})  # 401
    assert len(client.get("/api/v1/audit", headers=admin).json()) == before


def test_viewers_cannot_read_the_audit_log(app_client, settings):
    app, client = app_client
    _user(app, "val", "viewer")
    token = _token_for(client, admin_headers(settings.data_dir), "val")
    assert client.get("/api/v1/audit", headers=_bearer(token)).status_code == 403


# -- HTTPS -----------------------------------------------------------------------------------------


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cp.crt", tmp_path / "cp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_control_plane_serves_https_with_the_configured_certificate(tmp_path, settings):
    cert, key = _self_signed(tmp_path)
    with ControlPlane(settings.model_copy(update={"tls_cert": cert, "tls_key": key})) as cp:
        assert cp.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(cp.url + "/api/v1/auth/me", headers=_bearer(cp.admin_token), verify=ctx, timeout=10)
        assert r.status_code == 200 and r.json()["role"] == "admin"
        assert http_json("GET", cp.url + "/api/v1/devices", token=cp.admin_token, context=ctx) == []
        login = httpx.post(cp.url + "/api/v1/auth/login", verify=ctx, timeout=10,
                           json={"username": "admin", "password": (settings.data_dir / "initial-admin-password").read_text().strip()})
        assert "Secure" in next(c for c in login.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
        with pytest.raises(httpx.HTTPError):
            httpx.get(cp.url.replace("https://", "http://") + "/api/v1/health", timeout=5)


def test_plain_http_on_a_non_loopback_address_is_refused_unless_insecure_http(settings):
    exposed = settings.model_copy(update={"host": "0.0.0.0"})
    with pytest.raises(ControlStartError, match="refusing plain HTTP on 0.0.0.0.*--tls-cert.*--insecure-http"):
        ControlPlane(exposed).start()
    exposed.model_copy(update={"insecure_http": True}).check_transport()  # allowed when said explicitly
    settings.check_transport()  # loopback: the demo's plain HTTP is fine


def test_a_certificate_without_its_key_is_refused(tmp_path, settings):
    cert, _key = _self_signed(tmp_path)
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        settings.model_copy(update={"tls_cert": cert}).check_transport()


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_adds_a_user_and_creates_a_token_that_the_api_accepts(settings):
    from typer.testing import CliRunner

    from edgewise.cli.main import app as cli

    with TestClient(create_app(settings)) as client:  # first start creates the database
        runner = CliRunner()
        d = ["--data-dir", str(settings.data_dir)]
        r = runner.invoke(cli, ["user", "add", "ci-bot", "--role", "operator", "--password-stdin", *d], input=PASSWORD + "\n")
        assert r.exit_code == 0, r.output
        r = runner.invoke(cli, ["token", "create", "--user", "ci-bot", "--name", "pipeline", *d])
        assert r.exit_code == 0, r.output
        token = r.output.strip().splitlines()[-1]
        assert client.get("/api/v1/auth/me", headers=_bearer(token)).json()["role"] == "operator"
        audit = client.get("/api/v1/audit", headers=admin_headers(settings.data_dir)).json()
        assert [e["action"] for e in audit[:2]] == ["token.create", "user.create"]
        assert audit[0]["actor"].startswith("cli:")


def test_cli_refuses_a_short_password_saying_why(settings):
    from typer.testing import CliRunner

    from edgewise.cli.main import app as cli

    with TestClient(create_app(settings)):
        pass
    r = CliRunner().invoke(cli, ["user", "add", "shorty", "--password-stdin", "--data-dir", str(settings.data_dir)],
                           input="short\n")
    assert r.exit_code == 1 and "at least 10 characters" in r.output


def test_a_stale_session_cookie_does_not_block_signing_in_again(app_client):
    app, client = app_client
    _user(app, "alice", "viewer")
    client.cookies.set(SESSION_COOKIE, "ews_expired-or-forged")
    assert client.get("/api/v1/auth/me").json()["kind"] == "anonymous"
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200, r.text


def test_a_successful_sign_in_is_audited_as_login(app_client, settings):
    app, client = app_client
    _user(app, "alice", "viewer")
    client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    [entry] = client.get("/api/v1/audit?action=login", headers=admin_headers(settings.data_dir)).json()
    assert (entry["action"], entry["actor"], entry["status"]) == ("login", "user:alice", 200)
