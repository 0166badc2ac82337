"""Device identity: the fleet CA (file keystore and SoftHSM2), enrollment over real HTTP, revocation,
and the embedded broker's per-device topic access. Mosquitto with mTLS: test_security_identity_mosquitto.py."""

from __future__ import annotations

import secrets
import stat
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgewise import protocol as p
from edgewise.agent.enroll import EnrollError, enroll, link_security
from edgewise.agent.config import load_config
from edgewise.control.models import EnrollmentToken, TelemetryRow
from edgewise.control.server import ControlPlane
from edgewise.control.settings import ServerSettings
from edgewise.security.ca import CAError, FleetCA, Revoked, build_csr, parse_csr
from edgewise.security.keystore import FileKeystore, open_keystore


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _device_csr(tmp_path, device_id: str) -> bytes:
    ks = FileKeystore(tmp_path / f"ks-{device_id}")
    ks.create_key("device-identity", "ec-p256")
    return build_csr(ks, "device-identity", device_id)


# -- the CA ----------------------------------------------------------------------------------------


def test_ca_issues_a_client_certificate_with_the_device_id_as_cn_and_client_auth_only(tmp_path):
    ca = FleetCA.open(FileKeystore(tmp_path / "keys"), tmp_path / "ca")
    cert = ca.issue_client(_device_csr(tmp_path, "cam-1"), "cam-1")
    cert.verify_directly_issued_by(ca.certificate)
    assert _cn(cert) == "cam-1"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=300)


def test_ca_reopens_with_the_same_certificate_and_refuses_a_certificate_of_another_key(tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    first = FleetCA.open(ks, tmp_path / "ca")
    assert FleetCA.open(ks, tmp_path / "ca").fingerprint == first.fingerprint
    with pytest.raises(CAError, match="has no key 'fleet-ca'"):
        FleetCA.open(FileKeystore(tmp_path / "empty"), tmp_path / "ca")
    other = FileKeystore(tmp_path / "other")
    other.create_key("fleet-ca", "ec-p256")
    with pytest.raises(CAError, match="does not belong to the key"):
        FleetCA.open(other, tmp_path / "ca")


def test_ca_key_in_softhsm_signs_certificates_and_crls_that_verify_outside_the_token(tmp_path, softhsm):
    ks = open_keystore(softhsm["url"])
    label = f"ca-{secrets.token_hex(4)}"
    ca = FleetCA.open(ks, tmp_path / "ca", label=label)
    cert = ca.issue_client(_device_csr(tmp_path, "hsm-dev"), "hsm-dev")
    cert.verify_directly_issued_by(ca.certificate)  # cryptography, outside the token
    crl = x509.load_pem_x509_crl(ca.crl([Revoked(cert.serial_number, datetime.now(timezone.utc))]))
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_device_csr_can_be_signed_by_a_key_that_stays_in_softhsm(softhsm):
    ks = open_keystore(softhsm["url"])
    label = f"dev-{secrets.token_hex(4)}"
    ks.create_key(label, "ec-p256")
    csr = parse_csr(build_csr(ks, label, "hsm-device"))
    assert csr.is_signature_valid and csr.public_key() == ks.public_key(label)


def test_ca_refuses_a_csr_whose_signature_does_not_match_its_key(tmp_path):
    ca = FleetCA.open(FileKeystore(tmp_path / "keys"), tmp_path / "ca")
    der = bytearray(x509.load_pem_x509_csr(_device_csr(tmp_path, "cam-2")).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    with pytest.raises(CAError, match="signature"):
        ca.issue_client(bytes(der), "cam-2")


def test_ca_refuses_a_csr_for_a_non_p256_key(tmp_path):
    ca = FleetCA.open(FileKeystore(tmp_path / "keys"), tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-3")])).sign(key, hashes.SHA256()))
    with pytest.raises(CAError, match="P-256"):
        ca.issue_client(csr.public_bytes(serialization.Encoding.PEM), "cam-3")


def test_server_certificate_names_its_hosts_and_is_for_server_auth(tmp_path):
    ca = FleetCA.open(FileKeystore(tmp_path / "keys"), tmp_path / "ca")
    cert = ca.issue_server(ec.generate_private_key(ec.SECP256R1()).public_key(), ["localhost", "127.0.0.1"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]


# -- enrollment over HTTP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    """A control plane whose embedded broker admits only enrolled devices (mode 'devices')."""
    d = tmp_path_factory.mktemp("cp-identity")
    settings = ServerSettings(data_dir=d, port=0, embedded_broker_port=0, embedded_broker_auth="devices")
    with ControlPlane(settings) as plane:
        plane.admin = (d / "admin.token").read_text().strip()  # type: ignore[attr-defined]
        yield plane


def _new_token(cp, **body) -> str:
    r = httpx.post(cp.url + "/api/v1/enrollment-tokens", json=body, headers={"Authorization": f"Bearer {cp.admin}"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _enroll_raw(cp, token: str, device_id: str, csr: str) -> httpx.Response:
    return httpx.post(cp.url + "/api/v1/enroll", json={"token": token, "device_id": device_id, "csr": csr})


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def test_device_enrolls_with_a_token_and_gets_certificate_ca_broker_url_and_a_0600_device_token(cp, tmp_path):
    dev = _uid("enr")
    token = _new_token(cp, tags=["lab", "cam"])
    r = enroll(cp.url, token, tmp_path / dev, device_id=dev)
    cert = x509.load_pem_x509_certificate(r.certificate.read_bytes())
    ca = x509.load_pem_x509_certificate(r.ca_certificate.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert _cn(cert) == dev and r.tags == ["lab", "cam"]
    assert cert.public_key() == FileKeystore(tmp_path / dev / "keys").public_key("device-identity")
    assert stat.S_IMODE(r.token_file.stat().st_mode) == 0o600
    config = load_config(tmp_path / dev)
    assert config.device_id == dev and config.broker_url == r.broker_url == cp.broker_url
    device_token = r.token_file.read_text().strip()
    mine = httpx.get(f"{cp.url}/api/v1/devices/{dev}/certificates", headers={"Authorization": f"Bearer {device_token}"})
    assert mine.status_code == 200 and mine.json()[0]["serial"] == r.serial
    assert httpx.get(f"{cp.url}/api/v1/devices/{dev}", headers={"Authorization": f"Bearer {cp.admin}"}).json()["tags"] == ["lab", "cam"]


def test_enrollment_installs_the_control_planes_current_tuf_root_as_the_devices_update_trust_anchor(cp, tmp_path):
    dev = _uid("tuf")
    enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    root = tmp_path / dev / "trust" / "root.json"
    served = httpx.get(f"{cp.url}/api/v1/tuf/metadata/1.root.json", headers={"Authorization": f"Bearer {cp.admin}"})
    assert root.read_bytes() == served.content


def test_a_root_already_on_the_device_from_its_factory_image_is_not_replaced_at_enrollment(cp, tmp_path):
    dev = _uid("fac")
    root = tmp_path / dev / "trust" / "root.json"
    root.parent.mkdir(parents=True)
    root.write_bytes(b"factory root")
    enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    assert root.read_bytes() == b"factory root"


def test_enrolling_against_an_unreachable_server_says_to_check_the_server_url(tmp_path):
    from edgewise.agent.enroll import EnrollError

    with pytest.raises(EnrollError, match="cannot reach the control plane.*check --server"):
        enroll("http://127.0.0.1:9", "ewe_x", tmp_path / "dev", device_id="unreachable-1")


def test_a_device_can_enroll_a_key_kept_in_softhsm_but_its_mqtt_tls_link_then_says_it_needs_a_key_file(cp, tmp_path, softhsm):
    from edgewise.agent.enroll import LinkSecurityError

    dev = _uid("hsm")
    r = enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev, keystore_url=softhsm["url"])
    cert = x509.load_pem_x509_certificate(r.certificate.read_bytes())
    assert cert.public_key() == open_keystore(softhsm["url"]).public_key("device-identity")
    assert not (tmp_path / dev / "keys" / "device-identity.key").exists()
    config = load_config(tmp_path / dev, broker_url="mqtts://127.0.0.1:8883")
    with pytest.raises(LinkSecurityError, match="key file for the TLS handshake"):
        link_security(config)


def test_an_enrollment_token_is_single_use(cp, tmp_path):
    token = _new_token(cp)
    enroll(cp.url, token, tmp_path / "a", device_id=_uid("once"))
    with pytest.raises(EnrollError, match=r"\(409\).*already used"):
        enroll(cp.url, token, tmp_path / "b", device_id=_uid("twice"))


def test_an_unknown_token_is_refused_with_401(cp, tmp_path):
    dev = _uid("unk")
    r = _enroll_raw(cp, "ewe_not-a-token", dev, _device_csr(tmp_path, dev).decode())
    assert r.status_code == 401 and "unknown enrollment token" in r.json()["detail"]


def test_an_expired_token_is_refused_with_410(cp, tmp_path):
    token = _new_token(cp, ttl_s=60)
    with cp.services.db.session() as s:
        row = s.query(EnrollmentToken).order_by(EnrollmentToken.id.desc()).first()
        row.expires_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        s.commit()
    dev = _uid("exp")
    r = _enroll_raw(cp, token, dev, _device_csr(tmp_path, dev).decode())
    assert r.status_code == 410 and "expired" in r.json()["detail"]


def test_a_csr_naming_another_device_is_refused_with_422_and_the_token_stays_usable(cp, tmp_path):
    token = _new_token(cp)
    dev = _uid("cn")
    r = _enroll_raw(cp, token, dev, _device_csr(tmp_path, "someone-else").decode())
    assert r.status_code == 422 and "common name" in r.json()["detail"]
    assert _enroll_raw(cp, token, dev, _device_csr(tmp_path, dev).decode()).status_code == 201


def test_a_malformed_csr_is_refused_with_422(cp):
    r = _enroll_raw(cp, _new_token(cp), _uid("bad"), "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n")
    assert r.status_code == 422 and "malformed CSR" in r.json()["detail"]


def test_a_token_bound_to_a_device_id_refuses_other_ids_with_403(cp, tmp_path):
    bound = _uid("bound")
    token = _new_token(cp, device_id=bound)
    other = _uid("other")
    r = _enroll_raw(cp, token, other, _device_csr(tmp_path, other).decode())
    assert r.status_code == 403 and bound in r.json()["detail"]


def test_the_control_planes_own_identity_cannot_be_enrolled(cp, tmp_path):
    r = _enroll_raw(cp, _new_token(cp), "edgewise-control", _device_csr(tmp_path, "edgewise-control").decode())
    assert r.status_code == 422 and "reserved" in r.json()["detail"]


def test_creating_tokens_needs_a_user_and_revoking_is_refused_to_devices(cp, tmp_path):
    assert httpx.post(cp.url + "/api/v1/enrollment-tokens", json={}).status_code == 401
    dev = _uid("nopriv")
    r = enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    device = {"Authorization": f"Bearer {r.token_file.read_text().strip()}"}
    assert httpx.post(cp.url + "/api/v1/enrollment-tokens", json={}, headers=device).status_code == 403
    assert httpx.post(f"{cp.url}/api/v1/devices/{dev}/revoke", json={}, headers=device).status_code == 403


def test_revocation_puts_the_certificate_on_the_crl_and_ends_the_device_token(cp, tmp_path):
    dev = _uid("rev")
    r = enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    device = {"Authorization": f"Bearer {r.token_file.read_text().strip()}"}
    assert httpx.get(f"{cp.url}/api/v1/devices/{dev}/certificates", headers=device).status_code == 200
    out = httpx.post(f"{cp.url}/api/v1/devices/{dev}/revoke", json={"reason": "stolen"},
                     headers={"Authorization": f"Bearer {cp.admin}"})
    assert out.status_code == 200 and out.json()["serials"] == [r.serial] and out.json()["tokens_revoked"] == 1
    crl = x509.load_pem_x509_crl(httpx.get(cp.url + "/api/v1/crl.pem").content)
    ca = x509.load_pem_x509_certificate(httpx.get(cp.url + "/api/v1/ca.pem").content)
    assert crl.is_signature_valid(ca.public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(r.serial, 16)) is not None
    assert httpx.get(f"{cp.url}/api/v1/devices/{dev}/certificates", headers=device).status_code == 401


def test_a_device_re_enrolled_after_revocation_is_not_on_the_brokers_deny_list(cp, tmp_path):
    from edgewise.control.provisioning import revoked_device_ids

    dev = _uid("again")
    enroll(cp.url, _new_token(cp), tmp_path / "first", device_id=dev)
    httpx.post(f"{cp.url}/api/v1/devices/{dev}/revoke", json={}, headers={"Authorization": f"Bearer {cp.admin}"})
    with cp.services.db.session() as s:
        assert dev in revoked_device_ids(s)
    enroll(cp.url, _new_token(cp), tmp_path / "second", device_id=dev)
    with cp.services.db.session() as s:
        assert dev not in revoked_device_ids(s)


# -- the embedded broker: per-device access --------------------------------------------------------


def _mqtt(cp, client_id: str, credentials: tuple[str, str] | None):
    host, port = cp.broker_url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if credentials:
        c.username_pw_set(*credentials)
    ev: dict[str, object] = {"connected": threading.Event(), "suback": threading.Event(), "messages": []}

    def on_connect(_c, _u, _f, reason, _p):
        ev["reason"] = reason
        ev["connected"].set()  # type: ignore[attr-defined]

    def on_subscribe(_c, _u, _mid, reasons, _p):
        ev["granted"] = reasons
        ev["suback"].set()  # type: ignore[attr-defined]

    c.on_connect, c.on_subscribe = on_connect, on_subscribe
    c.on_message = lambda _c, _u, msg: ev["messages"].append(msg.topic)  # type: ignore[union-attr]
    c.connect(host, int(port))
    c.loop_start()
    assert ev["connected"].wait(5)  # type: ignore[attr-defined]
    return c, ev


def _enrolled(cp, tmp_path, prefix: str) -> tuple[str, str]:
    dev = _uid(prefix)
    r = enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    return dev, r.token_file.read_text().strip()


def _telemetry_count(cp, dev: str) -> int:
    with cp.services.db.session() as s:
        return s.query(TelemetryRow).filter(TelemetryRow.device_id == dev).count()


def _batch(dev: str, seq: int = 1) -> bytes:
    return p.encode(p.Batch(device_id=dev, items=[p.Telemetry(device_id=dev, seq=seq, ts=time.time())]))


def test_embedded_broker_lets_a_device_publish_only_under_its_own_topics(cp, tmp_path):
    dev, token = _enrolled(cp, tmp_path, "emb")
    victim, _ = _enrolled(cp, tmp_path, "victim")
    c, _ev = _mqtt(cp, dev, (dev, token))
    try:
        denied_before = cp.services.broker.access.denied
        c.publish(p.topics.telemetry(victim), _batch(victim), qos=1).wait_for_publish(5)
        c.publish(p.topics.telemetry(dev), _batch(dev), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while _telemetry_count(cp, dev) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _telemetry_count(cp, dev) == 1
        assert _telemetry_count(cp, victim) == 0 and cp.services.broker.access.denied == denied_before + 1
    finally:
        c.disconnect()
        c.loop_stop()


def test_embedded_broker_refuses_a_subscription_to_another_devices_desired_state(cp, tmp_path):
    dev, token = _enrolled(cp, tmp_path, "sub")
    c, ev = _mqtt(cp, dev, (dev, token))
    try:
        c.subscribe([(p.topics.desired("someone-else"), 1), (p.topics.desired(dev), 1)])
        assert ev["suback"].wait(5)  # type: ignore[attr-defined]
        assert [int(getattr(g, "value", g)) for g in ev["granted"]] == [0x80, 1]  # type: ignore[union-attr]
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("case", ["no credentials", "wrong token", "another device's client id"])
def test_embedded_broker_refuses_devices_without_valid_credentials(cp, tmp_path, case):
    dev, token = _enrolled(cp, tmp_path, "auth")
    client_id, creds = {
        "no credentials": (dev, None),
        "wrong token": (dev, (dev, "ewd_wrong")),
        "another device's client id": ("someone-else", (dev, token)),
    }[case]
    c, ev = _mqtt(cp, client_id, creds)
    try:
        assert getattr(ev["reason"], "is_failure", False), ev["reason"]
    finally:
        c.disconnect()
        c.loop_stop()


def test_an_enrolled_agent_logs_in_to_the_embedded_broker_with_its_device_token(cp, tmp_path, keys_dir):
    from test_agent_support import make_agent, wait_for

    dev = _uid("agent")
    enroll(cp.url, _new_token(cp), tmp_path / dev, device_id=dev)
    config = load_config(tmp_path / dev)
    assert link_security(config)[1] == (dev, (tmp_path / dev / "keys" / "device.token").read_text().strip())
    agent = make_agent(tmp_path / dev, keys_dir, encrypt_at_rest=False)
    try:
        agent.start()
        wait_for(lambda: _telemetry_count(cp, dev) > 0, 15, what="the agent's telemetry in the database")
        assert agent.link.protocol == mqtt.MQTTv311  # amqtt said "unsupported protocol version" to v5
    finally:
        agent.stop()


def test_the_cli_creates_an_enrollment_token_enrolls_with_it_and_revokes_the_device(cp, tmp_path):
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    runner = CliRunner()
    env = {"EDGEWISE_API_TOKEN": cp.admin}
    dev = _uid("cli")
    made = runner.invoke(app, ["device", "token", "--server", cp.url, "--tag", "cli", "--device-id", dev], env=env)
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    enrolled = runner.invoke(app, ["device", "enroll", "--server", cp.url, "--token", token,
                                   "--state-dir", str(tmp_path / dev), "--device-id", dev, "--json"])
    assert enrolled.exit_code == 0, enrolled.output
    device_token = (tmp_path / dev / "keys" / "device.token").read_text().strip()
    assert httpx.get(f"{cp.url}/api/v1/devices/{dev}", headers={"Authorization": f"Bearer {device_token}"}).status_code == 200
    revoked = runner.invoke(app, ["device", "revoke", dev, "--server", cp.url, "--reason", "stolen", "--json"], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert httpx.get(f"{cp.url}/api/v1/devices/{dev}", headers={"Authorization": f"Bearer {device_token}"}).status_code == 401
    again = runner.invoke(app, ["device", "revoke", dev, "--server", cp.url], env={"EDGEWISE_API_TOKEN": "ewt_wrong"})
    assert again.exit_code != 0 and "401" in again.output


def test_embedded_broker_never_replays_another_devices_retained_messages_to_a_connecting_device(cp, tmp_path):
    victim, victim_token = _enrolled(cp, tmp_path, "retv")
    dev, token = _enrolled(cp, tmp_path, "reta")
    v, vev = _mqtt(cp, victim, (victim, victim_token))
    try:  # the victim holds a subscription on its own desired state, which has a retained message
        v.subscribe(p.topics.desired(victim), 1)
        assert vev["suback"].wait(5)  # type: ignore[attr-defined]
        cp.services.bus.publish(p.topics.desired(victim), p.encode(p.DesiredState(device_id=victim, generation=1)), qos=1, retain=True)
        deadline = time.monotonic() + 5
        while not vev["messages"] and time.monotonic() < deadline:
            time.sleep(0.05)
        c, ev = _mqtt(cp, dev, (dev, token))
        try:
            c.subscribe(p.topics.desired(dev), 1)
            assert ev["suback"].wait(5)  # type: ignore[attr-defined]
            time.sleep(1.0)
            assert vev["messages"] and not [t for t in ev["messages"] if victim in t]  # type: ignore[union-attr]
        finally:
            c.disconnect()
            c.loop_stop()
    finally:
        v.disconnect()
        v.loop_stop()
