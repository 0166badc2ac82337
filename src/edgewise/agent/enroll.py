"""Enrollment: the device's side of provisioning, and the TLS material the link uses afterwards.

``enroll`` generates the device's identity key (``ec-p256``, label ``device-identity``) in
its keystore (a file under ``state/keys`` or a PKCS#11 token), sends a CSR whose CN is the
device id together with the operator's enrollment token, and stores what comes back:

    state/keys/device.crt     client certificate (CN = device id), issued by the fleet CA
    state/keys/ca.crt         the fleet CA certificate (the only issuer trusted for the broker)
    state/keys/device.token   the device's API token (0600), sent as Authorization: Bearer
    state/config.toml         device_id, server_url and broker_url updated

The token is the only credential the device needs for this one request; it is single use.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write
from ..protocol import topics
from ..security.keystore import FileKeystore, Keystore, open_keystore
from .config import CONFIG_FILE, AgentConfig, default_device_id, write_toml

log = logging.getLogger("edgewise.agent.enroll")

IDENTITY_LABEL = "device-identity"
ENROLL_PATH = "/api/v1/enroll"
ENROLL_TIMEOUT_S = 30.0


class EnrollError(RuntimeError):
    """Enrollment failed; the message carries the control plane's reason and what to do."""


@dataclass(frozen=True)
class EnrollResult:
    device_id: str
    state_dir: Path
    broker_url: str
    certificate: Path
    ca_certificate: Path
    token_file: Path
    serial: str
    not_after: str
    tags: list[str]


def _keys_dir(state_dir: Path) -> Path:
    d = state_dir / "keys"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def enroll(
    server_url: str, token: str, state_dir: Path | str, *, device_id: str | None = None,
    keystore_url: str | None = None, verify: bool | str = True, timeout: float = ENROLL_TIMEOUT_S,
) -> EnrollResult:
    """Enroll this device with the control plane at ``server_url`` using enrollment ``token``.

    The device id is, in order: ``device_id``, the one already in ``state_dir/config.toml``,
    or a new one (hostname + random suffix). An existing identity key is reused (re-enrolling
    after a certificate expired or the CA changed); it is never overwritten.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    conf_path = state_dir / CONFIG_FILE
    existing: dict[str, Any] = {}
    if conf_path.exists():
        try:
            existing = tomllib.loads(conf_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise EnrollError(f"{conf_path} is not valid TOML ({exc}); fix or delete it") from None
    if device_id and existing.get("device_id") and existing["device_id"] != device_id:
        raise EnrollError(f"{conf_path} says this device is {existing['device_id']!r}, not {device_id!r}: "
                          "use another --state-dir, or drop --device-id to enroll as the configured id")
    device_id = device_id or existing.get("device_id") or default_device_id()
    try:
        topics.check_device_id(device_id)
    except ValueError as exc:
        raise EnrollError(str(exc)) from None
    keys = _keys_dir(state_dir)
    # Not the agent's keystore_url (storage keys): the MQTT TLS handshake needs the identity key as a
    # file, so it lives in the file keystore unless --keystore says otherwise (see tls_key_file).
    keystore = open_keystore(keystore_url or f"file:{keys}")
    if not keystore.has_key(IDENTITY_LABEL):
        keystore.create_key(IDENTITY_LABEL, "ec-p256")
        log.info("created the device identity key %r in %s", IDENTITY_LABEL, keystore.url)
    from ..security.ca import build_csr  # asn1crypto: only enrollment needs it, not a running agent

    csr = build_csr(keystore, IDENTITY_LABEL, device_id)

    url = server_url.rstrip("/") + ENROLL_PATH
    body = _post_json(url, {"token": token, "device_id": device_id, "csr": csr.decode()}, verify=verify, timeout=timeout)

    cert_path, ca_path, token_path = keys / "device.crt", keys / "ca.crt", keys / "device.token"
    atomic_write(cert_path, body["certificate"].encode(), mode=0o644)
    atomic_write(ca_path, body["ca_certificate"].encode(), mode=0o644)
    atomic_write(token_path, (body["device_token"] + "\n").encode(), mode=0o600)
    updated = {**existing, "device_id": device_id, "server_url": server_url.rstrip("/"), "broker_url": body["broker_url"]}
    if body.get("tags") and not existing.get("tags"):
        updated["tags"] = body["tags"]
    updated.pop("state_dir", None)
    write_toml(conf_path, updated)
    root = state_dir / "trust" / "root.json"
    if body.get("tuf_root") and not root.exists():
        # A root from the factory image (already there) wins: it came out of band. Otherwise the one from this
        # token-authenticated exchange anchors updates (compare its keys with `edgewise tuf status` if in doubt).
        from .tuf_client import install_root_bytes

        try:
            install_root_bytes(body["tuf_root"].encode(), root)
        except ValueError as exc:
            raise EnrollError(f"the control plane sent a TUF root that is not valid: {exc}") from None
    log.info("enrolled as %s (certificate serial %s, valid until %s); broker %s",
             device_id, body["serial"], body["not_after"], body["broker_url"])
    return EnrollResult(device_id, state_dir, body["broker_url"], cert_path, ca_path, token_path,
                        body["serial"], body["not_after"], list(body.get("tags") or []))


def _post_json(url: str, payload: dict[str, Any], *, verify: bool | str, timeout: float) -> dict[str, Any]:
    """POST JSON with the standard library (the agent does not ship an HTTP client library)."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    context = None
    if url.startswith("https:"):
        if verify is False:
            context = ssl._create_unverified_context()  # explicit opt-out for a lab setup (--insecure)
        else:
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "edgewise-agent"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")
        raise EnrollError(f"enrollment refused ({exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise EnrollError(f"cannot reach the control plane at {url} ({reason}); check --server and the network") from None


class LinkSecurityError(RuntimeError):
    """The agent has an mqtts:// broker but not what mutual TLS needs; the message says what to do."""


def tls_key_file(keystore: Keystore, label: str = IDENTITY_LABEL) -> str:
    """The identity key as a file, which is what Python's ``ssl`` (and so paho) needs for the handshake.

    A PKCS#11 key cannot be handed to ``ssl``: see docs/security-identity.md, "Limitations".
    """
    if isinstance(keystore, FileKeystore):
        return str(keystore.private_key_path(label))
    raise LinkSecurityError(
        f"the identity key is in {keystore.url}, and Python's ssl module can only use a key file for the TLS "
        "handshake: enroll this device without --keystore (the identity key then lives in <state_dir>/keys, 0600), "
        "or use the embedded broker's device-token login"
    )


def link_security(config: AgentConfig) -> tuple[tuple[str, str, str] | None, tuple[str, str] | None]:
    """What the MQTT link presents: ``(tls_files, credentials)``.

    - mqtts:// broker: the fleet CA, the device certificate and the identity key file (mutual TLS);
      a clear error if the device is not enrolled yet;
    - mqtt:// broker and a device token on disk: username = device id, password = the token
      (the embedded broker's per-device login);
    - otherwise nothing (an open broker, e.g. a test Mosquitto).
    """
    addr = config.broker_address()
    if addr is None:
        return None, None
    _host, _port, tls = addr
    if tls:
        missing = [p for p in (config.device_cert_path, config.ca_cert_path) if not p.exists()]
        if missing:
            raise LinkSecurityError(
                f"broker {config.broker_url} needs a client certificate but {', '.join(map(str, missing))} "
                "does not exist: enroll first (edgewise device enroll --server URL --token T --state-dir DIR)"
            )
        keys = FileKeystore(config.state_dir / "keys")
        if not keys.has_key(IDENTITY_LABEL):
            raise LinkSecurityError(
                f"{config.device_cert_path} exists but its key is not in {keys.url} (enrolled with --keystore pkcs11:...?): "
                "Python's ssl can only use a key file for the TLS handshake; re-enroll without --keystore"
            )
        return (str(config.ca_cert_path), str(config.device_cert_path), tls_key_file(keys)), None
    token_file = config.device_token_path
    if token_file.exists():
        token = token_file.read_text(encoding="utf-8").strip()
        if token:
            return None, (config.device_id, token)
    return None, None
