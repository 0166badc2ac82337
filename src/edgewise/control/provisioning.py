"""Provisioning: enrollment tokens, certificate issue at enrollment, and revocation.

Plain functions over a session (the router is a thin wrapper), with the CA and the
broker around them in one :class:`Provisioning` object the services hold.

The flow (docs/security-identity.md has the commands):

1. an operator creates an enrollment token (single use, expiring, optionally bound to tags
   and to one device id) and hands it to whoever installs the device;
2. the device generates its key in its keystore and sends a CSR (CN = its device id) with
   the token to ``POST /api/v1/enroll``; the token is its only credential;
3. the control plane checks the token (known, unused, unexpired, bound id), the CSR (parses,
   self-signature valid, P-256, CN = the id), marks the token used, records the certificate,
   registers the device with the token's tags and returns the certificate, the CA certificate,
   the broker URL and a device API token;
4. revocation marks the device's certificates revoked, writes a new CRL, reloads the broker
   (SIGHUP to Mosquitto) and revokes the device's API tokens.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..security.ca import CAError, FleetCA, Revoked, certificate_fingerprint, pem
from . import auth
from .devices import check_device_id, check_tags, ensure_device
from .errors import ConflictError, ControlError, InvalidRequestError, NotFoundError
from .models import DeviceCertificate, EnrollmentToken
from .mosquitto import CONTROL_IDENTITY
from .timeutil import utcnow

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ewe_"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_TTL = timedelta(days=30)
RESERVED_IDS = frozenset({CONTROL_IDENTITY})


class EnrollmentRefused(ControlError):
    """The enrollment token is unknown (401), used (409), expired (410) or bound elsewhere (403)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class BadCSRError(InvalidRequestError):
    """The CSR is malformed, badly signed, the wrong key type, or names another device (422)."""


@dataclass
class Provisioning:
    """The fleet CA and what enrollment tells devices; ``reload_broker`` makes a new CRL take effect."""

    ca: FleetCA
    broker_url: str
    mosquitto_dir: Path | None = None
    reload_broker: Callable[[], bool] = field(default=lambda: False)

    def publish_crl(self, session: Session) -> bytes:
        """Write the current CRL (and the ACL denying revoked devices) where Mosquitto reads them; return the CRL."""
        data = current_crl(session, self.ca)
        if self.mosquitto_dir is not None:
            from .mosquitto import write_crl

            write_crl(self.mosquitto_dir, data, revoked_device_ids(session))
        return data


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CreatedToken:
    token: str  # shown once
    row: EnrollmentToken


def create_enrollment_token(
    session: Session, *, ttl: timedelta = DEFAULT_TOKEN_TTL, tags: Iterable[str] = (),
    device_id: str | None = None, created_by: str | None = None,
) -> CreatedToken:
    """A new single-use enrollment token. Commits; the plaintext is returned once, only its hash is kept."""
    if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
        raise InvalidRequestError(f"token lifetime {ttl} is out of range: give 1 s to {MAX_TOKEN_TTL.days} days")
    if device_id is not None:
        _check_enrollable_id(device_id)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = EnrollmentToken(
        token_hash=hash_token(token), prefix=token[:10], tags=check_tags(tags), device_id=device_id,
        created_by=created_by, expires_at=utcnow() + ttl,
    )
    session.add(row)
    session.commit()
    return CreatedToken(token, row)


def list_enrollment_tokens(session: Session) -> list[EnrollmentToken]:
    return list(session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id)).all())


def _check_enrollable_id(device_id: str) -> str:
    check_device_id(device_id)
    if device_id in RESERVED_IDS:
        raise InvalidRequestError(f"device id {device_id!r} is reserved for the control plane; choose another")
    return device_id


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    broker_url: str
    device_token: str
    tags: list[str]
    serial: str
    not_after: str


def enroll(session: Session, prov: Provisioning, *, token: str, device_id: str, csr_pem: str) -> Enrollment:
    """Exchange an enrollment token and a CSR for a client certificate and a device API token.

    Every refusal names what was wrong; the token is consumed only by a successful enrollment,
    so a device whose CSR was refused can retry with the same token.
    """
    _check_enrollable_id(device_id)
    row = session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)).with_for_update())
    if row is None:
        raise EnrollmentRefused("unknown enrollment token: check for typos, or ask an operator for a new one "
                                "(edgewise device token create)", 401)
    if row.used_at is not None:
        raise EnrollmentRefused(f"enrollment token {row.prefix}… was already used (by {row.used_by!r} at "
                                f"{row.used_at:%Y-%m-%d %H:%M:%S} UTC); tokens are single use: ask for a new one", 409)
    if row.expires_at <= utcnow():
        raise EnrollmentRefused(f"enrollment token {row.prefix}… expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                                "ask an operator for a new one", 410)
    if row.device_id is not None and row.device_id != device_id:
        raise EnrollmentRefused(f"enrollment token {row.prefix}… is bound to device {row.device_id!r}, "
                                f"not {device_id!r}; enroll with --device-id {row.device_id}", 403)
    try:
        cert = prov.ca.issue_client(csr_pem, device_id)
    except CAError as exc:
        raise BadCSRError(f"certificate request refused: {exc}") from None
    now = utcnow()
    # Single use even under concurrent requests: the UPDATE only matches a still-unused row.
    claimed = session.execute(
        EnrollmentToken.__table__.update()
        .where(EnrollmentToken.id == row.id, EnrollmentToken.used_at.is_(None))
        .values(used_at=now, used_by=device_id)
    ).rowcount
    if claimed != 1:
        session.rollback()
        raise EnrollmentRefused("enrollment token was used by a concurrent request; ask for a new one", 409)
    serial = format(cert.serial_number, "x")
    session.add(DeviceCertificate(
        serial=serial, device_id=device_id, fingerprint=certificate_fingerprint(cert),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, issued_at=now,
    ))
    device, created = ensure_device(session, device_id, row.tags or [])
    if not created and row.tags:
        device.tags = check_tags([*(device.tags or []), *row.tags])
    device_token = auth.issue_device_token(session, device_id)  # commits everything above in one go
    log.info("enrolled device %s (certificate serial %s, token %s…)", device_id, serial, row.prefix)
    return Enrollment(
        device_id=device_id, certificate_pem=pem(cert).decode(), ca_certificate_pem=prov.ca.certificate_pem.decode(),
        broker_url=prov.broker_url, device_token=device_token, tags=list(device.tags or []), serial=serial,
        not_after=cert.not_valid_after_utc.isoformat(),
    )


def current_crl(session: Session, ca: FleetCA) -> bytes:
    """The CRL of every revoked certificate that has not expired yet (expired ones fail validation anyway)."""
    now = utcnow()
    rows = session.scalars(
        select(DeviceCertificate).where(DeviceCertificate.revoked_at.is_not(None), DeviceCertificate.not_after > now)
    ).all()
    revoked = [Revoked(int(r.serial, 16), r.revoked_at) for r in rows if r.revoked_at is not None]
    return ca.crl(revoked, number=int(time.time()))


def revoked_device_ids(session: Session) -> list[str]:
    """Devices with a revoked certificate and no live one (a device re-enrolled after revocation is not listed)."""
    now = utcnow()
    rows = session.execute(select(DeviceCertificate.device_id, DeviceCertificate.revoked_at, DeviceCertificate.not_after)).all()
    revoked = {d for d, r, _ in rows if r is not None}
    live = {d for d, r, na in rows if r is None and na > now}
    return sorted(revoked - live)


@dataclass(frozen=True)
class Revocation:
    device_id: str
    serials: list[str]
    tokens_revoked: int
    broker_reloaded: bool


def revoke_device(session: Session, prov: Provisioning, device_id: str, *, reason: str = "") -> Revocation:
    """Revoke every certificate and API token of ``device_id``, publish the CRL, reload the broker.

    Idempotent: revoking again rewrites the CRL and reloads (useful after restoring a broker).
    """
    check_device_id(device_id)
    certs = session.scalars(select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)).all()
    if not certs:
        raise NotFoundError(f"device {device_id!r} has no certificate from this fleet CA (was it enrolled?); "
                            "nothing to revoke")
    now = utcnow()
    for c in certs:
        if c.revoked_at is None:
            c.revoked_at = now
            c.revoke_reason = reason[:256] or None
    session.flush()
    tokens = auth.revoke_device_tokens(session, device_id)  # commits
    session.commit()
    prov.publish_crl(session)
    try:
        reloaded = prov.reload_broker()
    except Exception as exc:  # noqa: BLE001 - the revocation is recorded; say what is left to do
        raise ConflictError(f"device {device_id!r} is revoked and the CRL written, but the broker could not be "
                            f"reloaded ({exc}); reload it by hand (kill -HUP <mosquitto pid>)") from None
    log.warning("revoked device %s: certificates %s, %d token(s); broker reloaded: %s",
                device_id, ", ".join(c.serial for c in certs), tokens, reloaded)
    return Revocation(device_id, [c.serial for c in certs], tokens, reloaded)


def device_certificates(session: Session, device_id: str) -> list[DeviceCertificate]:
    return list(session.scalars(
        select(DeviceCertificate).where(DeviceCertificate.device_id == device_id).order_by(DeviceCertificate.issued_at)
    ).all())
