"""Device identity on a real Mosquitto started from the configuration the control plane writes:
mutual TLS, per-device ACL with MQTT v5 reason codes, client-id fencing, revocation with SIGHUP."""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import free_port
from edgewise import protocol as p
from edgewise.agent.config import load_config
from edgewise.agent.enroll import enroll
from edgewise.agent.link import Link
from edgewise.control.models import TelemetryRow
from edgewise.control.mosquitto import acl_text
from edgewise.control.server import ControlPlane
from edgewise.control.settings import ServerSettings
from edgewise.security.ca import FleetCA, pem
from edgewise.security.keystore import FileKeystore


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    """A control plane that writes a Mosquitto config (TLS, ACL, CRL), runs Mosquitto from it, and enrolls devices."""
    d = tmp_path_factory.mktemp("cp-mosquitto")
    settings = ServerSettings(data_dir=d, port=0, mosquitto=True, mosquitto_port=free_port())
    with ControlPlane(settings) as plane:
        plane.admin = (d / "admin.token").read_text().strip()  # type: ignore[attr-defined]
        yield plane


@pytest.fixture(scope="module")
def devices(cp, tmp_path_factory):
    """Enroll devices on demand: devices("cam") -> (device id, state dir)."""
    root = tmp_path_factory.mktemp("devices")

    def make(prefix: str):  # type: ignore[no-untyped-def]
        dev = f"{prefix}-{secrets.token_hex(3)}"
        r = httpx.post(cp.url + "/api/v1/enrollment-tokens", json={}, headers={"Authorization": f"Bearer {cp.admin}"})
        enroll(cp.url, r.json()["token"], root / dev, device_id=dev)
        return dev, root / dev

    return make


def _port(cp) -> int:
    return int(cp.broker_url.rsplit(":", 1)[1])


def _files(state):  # type: ignore[no-untyped-def]
    k = state / "keys"
    return str(k / "ca.crt"), str(k / "device.crt"), str(k / "device-identity.key")


class Client:
    """A bare MQTT v5 client with whatever certificate it is given; records what the broker says."""

    def __init__(self, cp, client_id: str, ca: str, cert: str | None = None, key: str | None = None) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.reason = None
        self.acks: dict[int, object] = {}
        self.messages: list[str] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.gone.set()
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        self.c.on_message = lambda _c, _u, msg: self.messages.append(msg.topic)
        self.error: Exception | None = None
        try:
            self.c.connect("127.0.0.1", _port(cp))
        except (ssl.SSLError, OSError) as exc:  # the TLS handshake itself refused us
            self.error = exc
            return
        self.c.loop_start()

    def _on_connect(self, _c, _u, _f, reason, _p) -> None:  # type: ignore[no-untyped-def]
        self.reason = reason
        if not getattr(reason, "is_failure", True):
            self.connected.set()

    def refused(self, timeout: float = 5.0) -> bool:
        if self.error is not None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return False
            if self.gone.is_set():
                return True
            time.sleep(0.02)
        return not self.connected.is_set()

    def close(self) -> None:
        if self.error is None:
            self.c.disconnect()
            self.c.loop_stop()


def _telemetry_count(cp, dev: str) -> int:
    with cp.services.db.session() as s:
        return s.query(TelemetryRow).filter(TelemetryRow.device_id == dev).count()


def _wait(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _batch(dev: str) -> bytes:
    return p.encode(p.Batch(device_id=dev, items=[p.Telemetry(device_id=dev, seq=1, ts=time.time())]))


def test_generated_config_requires_certificates_and_fences_devices_with_pattern_rules(cp):
    conf = (cp.settings.mosquitto_dir / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "crlfile ", "acl_file "):
        assert line in conf
    acl = acl_text()
    assert "pattern write edgewise/devices/%u/telemetry/#" in acl and "pattern read edgewise/devices/%u/desired" in acl
    assert "user edgewise-control\ntopic readwrite edgewise/#" in acl


def test_an_enrolled_agent_connects_with_mtls_and_its_telemetry_reaches_the_control_plane(cp, devices, keys_dir):
    from test_agent_support import make_agent

    dev, state = devices("mtls")
    config = load_config(state)
    assert config.broker_url == cp.broker_url and config.broker_url.startswith("mqtts://")
    agent = make_agent(state, keys_dir, encrypt_at_rest=False)
    try:
        agent.start()
        _wait(lambda: _telemetry_count(cp, dev) > 0, 15, "the agent's telemetry in the database")
        assert agent.link.protocol == mqtt.MQTTv5
    finally:
        agent.stop()


def test_a_publish_to_another_devices_topic_is_refused_with_a_reason_code_that_is_logged_and_counted(cp, devices, caplog):
    dev, state = devices("intruder")
    victim, _ = devices("victim")
    link = Link(dev, "127.0.0.1", _port(cp), tls=True, tls_files=_files(state),
                on_desired=lambda d: None, on_bad_message=lambda t, r: None,
                state=lambda: p.DeviceState(device_id=dev), backoff_base=0.05, backoff_cap=0.2)
    link.start()
    try:
        assert link.wait_connected(10)
        with caplog.at_level(logging.WARNING, logger="edgewise.agent.link"):
            assert link.publish(p.topics.telemetry(victim), _batch(victim)) is False
        assert link.publish_denied == 1 and "Not authorized" in (link.last_denial or "")
        assert "0x87" in caplog.text and p.topics.telemetry(victim) in caplog.text
        assert link.publish(p.topics.telemetry(dev), _batch(dev)) is True
        _wait(lambda: _telemetry_count(cp, dev) == 1, 10, "the device's own telemetry")
        assert _telemetry_count(cp, victim) == 0
    finally:
        link.stop()


def test_a_device_never_receives_another_devices_desired_state(cp, devices):
    dev, state = devices("peek")
    victim, _ = devices("target")
    ca, cert, key = _files(state)
    c = Client(cp, dev, ca, cert, key)
    try:
        assert c.connected.wait(5)
        c.c.subscribe([(p.topics.desired(victim), 1), (p.topics.desired(dev), 1)])
        time.sleep(0.3)
        cp.services.bus.publish(p.topics.desired(victim), b"secret", retain=True)
        cp.services.bus.publish(p.topics.desired(dev), b"mine", retain=False)
        _wait(lambda: p.topics.desired(dev) in c.messages, 10, "the device's own desired state")
        time.sleep(0.3)
        assert p.topics.desired(victim) not in c.messages
    finally:
        cp.services.bus.publish(p.topics.desired(victim), b"", retain=True)
        c.close()


def test_a_client_without_a_certificate_is_refused(cp, devices):
    _dev, state = devices("nocert")
    c = Client(cp, "anon", _files(state)[0])
    try:
        assert c.refused()
    finally:
        c.close()


def test_a_client_with_a_certificate_from_another_ca_is_refused(cp, devices, tmp_path):
    _dev, state = devices("foreign")
    rogue = FleetCA.open(FileKeystore(tmp_path / "rogue"), tmp_path / "rogue-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (tmp_path / "c.pem").write_bytes(pem(rogue.issue_client_for_key(key.public_key(), "edgewise-control")))
    c = Client(cp, "edgewise-control", _files(state)[0], str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    try:
        assert c.refused()
    finally:
        c.close()


def test_a_revoked_device_cannot_connect_after_sighup_nor_use_its_open_session_while_others_still_can(cp, devices):
    bad, bad_state = devices("stolen")
    good, good_state = devices("honest")
    first = Client(cp, bad, *_files(bad_state))
    assert first.connected.wait(5)
    r = httpx.post(f"{cp.url}/api/v1/devices/{bad}/revoke", json={"reason": "stolen"},
                   headers={"Authorization": f"Bearer {cp.admin}"})
    assert r.status_code == 200 and r.json()["broker_reloaded"] is True
    crl = x509.load_pem_x509_crl((cp.settings.mosquitto_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(r.json()["serials"][0], 16)) is not None
    time.sleep(0.5)  # Mosquitto handles SIGHUP in its main loop
    info = first.c.publish(p.topics.state(bad), b"x", qos=1)  # the session open before the revocation
    _wait(lambda: info.mid in first.acks, 5, "the PUBACK")
    assert getattr(first.acks[info.mid], "is_failure", False)  # cut off by the ACL's deny for revoked devices
    first.close()
    again, other = Client(cp, bad, *_files(bad_state)), Client(cp, good, *_files(good_state))
    try:
        assert again.refused()
        assert other.connected.wait(5)
    finally:
        again.close()
        other.close()


def test_a_device_cannot_take_another_devices_client_id(cp, devices):
    a, a_state = devices("owner")
    b, b_state = devices("thief")
    owner = Client(cp, a, *_files(a_state))
    assert owner.connected.wait(5)
    thief = Client(cp, a, *_files(b_state))  # asks for a's client id
    try:
        assert thief.connected.wait(5)
        time.sleep(0.5)
        assert not owner.gone.is_set()  # the owner's session was not taken over
        info = thief.c.publish(p.topics.state(a), b"x", qos=1)
        info.wait_for_publish(5)
        _wait(lambda: info.mid in thief.acks, 5, "the PUBACK")
        assert getattr(thief.acks[info.mid], "is_failure", False)  # the thief is still b, not a
    finally:
        owner.close()
        thief.close()
