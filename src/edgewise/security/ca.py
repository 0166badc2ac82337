"""The fleet CA: certificates and revocation lists signed by a key that stays in a keystore.

cryptography's certificate builders want an in-memory private key; the CA's key may
live in a PKCS#11 token where it cannot be read out. So the to-be-signed structures
(TBSCertificate, TBSCertList, CertificationRequestInfo) are built with asn1crypto,
their DER bytes are signed through ``Keystore.sign`` (ECDSA P-256 with SHA-256) and
the results are loaded and checked with cryptography before anyone sees them.

What is issued:

- the CA's own self-signed certificate (``CA:TRUE, pathlen 0``, keyCertSign + cRLSign);
- device client certificates from a CSR: CN = device id, EKU clientAuth, the CSR's own
  signature checked, a random 128-bit serial;
- the broker's server certificate (EKU serverAuth, SAN with its host names and IPs);
- CRLs (v2, with CRL number and authority key id), what Mosquitto checks clients against.

Plain functions for the device side too: ``build_csr`` makes a CSR for a key in any
keystore (the device's identity key never leaves its token either).
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from asn1crypto import core as a_core
from asn1crypto import crl as a_crl
from asn1crypto import csr as a_csr
from asn1crypto import keys as a_keys
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..fsutil import atomic_write
from .keystore import Keystore

CA_LABEL = "fleet-ca"
CA_CERT_FILE = "ca.crt"
DEFAULT_CA_DAYS = 3650
DEFAULT_CLIENT_DAYS = 365
DEFAULT_SERVER_DAYS = 825
DEFAULT_CRL_DAYS = 30
CLOCK_SKEW = timedelta(minutes=5)  # certificates start a little in the past: device clocks drift


class CAError(ValueError):
    """A request the CA refuses (bad CSR, wrong name, wrong key type); the message says what to fix."""


@dataclass(frozen=True)
class Revoked:
    """One line of a CRL."""

    serial: int
    revoked_at: datetime


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def new_serial() -> int:
    """A random positive serial of 127 bits (RFC 5280: unique per CA, at most 20 octets)."""
    return secrets.randbits(127) | (1 << 126)


def _spki(public_key: object) -> a_keys.PublicKeyInfo:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]
    return a_keys.PublicKeyInfo.load(der)


def _key_id(public_key: object) -> bytes:
    """RFC 5280 method 1: SHA-1 of the subjectPublicKey bit string."""
    return hashlib.sha1(_spki(public_key)["public_key"].contents[1:]).digest()  # noqa: S324 - RFC 5280


def _name(common_name: str, organization: str | None = None) -> a_x509.Name:
    values: dict[str, str] = {"common_name": common_name}
    if organization:
        values["organization_name"] = organization
    return a_x509.Name.build(values, use_printable=False)


def _ext(name: str, value: object, critical: bool = False) -> dict[str, object]:
    return {"extn_id": name, "critical": critical, "extn_value": value}


def _check_ec_p256(public_key: object, what: str) -> None:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CAError(f"{what}: the key must be an ECDSA P-256 key (ec-p256), got {type(public_key).__name__}")


def _sign(keystore: Keystore, label: str, tbs: a_core.Asn1Value) -> bytes:
    return keystore.sign(label, tbs.dump())


_SIG_ALG = {"algorithm": "sha256_ecdsa"}


class FleetCA:
    """The control plane's certificate authority. The key is ``label`` in ``keystore``; the
    certificate is ``ca_dir/ca.crt`` (created with the key on first use, see :meth:`open`).

    >>> ca = FleetCA.open(FileKeystore(tmp / "keys"), tmp / "ca")          # doctest: +SKIP
    >>> cert = ca.issue_client(csr_pem, "dev1")                           # doctest: +SKIP
    """

    def __init__(self, keystore: Keystore, certificate: x509.Certificate, *, label: str = CA_LABEL) -> None:
        self.keystore = keystore
        self.label = label
        self.certificate = certificate

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, keystore: Keystore, ca_dir: Path | str, *, label: str = CA_LABEL,
        name: str = "edgewise fleet CA", days: int = DEFAULT_CA_DAYS,
    ) -> "FleetCA":
        """Load the CA, or create its key (in the keystore) and self-signed certificate the first time.

        A certificate whose public key is not the keystore's key is refused: that is a CA
        directory copied next to the wrong keystore, and every device would stop trusting us.
        """
        ca_dir = Path(ca_dir)
        cert_path = ca_dir / CA_CERT_FILE
        if not keystore.has_key(label):
            if cert_path.exists():
                raise CAError(
                    f"{cert_path} exists but keystore {keystore.url} has no key {label!r}: "
                    "point the control plane at the keystore that holds the fleet CA key"
                )
            keystore.create_key(label, "ec-p256")
        public = keystore.public_key(label)
        _check_ec_p256(public, f"fleet CA key {label!r} in {keystore.url}")
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != public:
                raise CAError(f"{cert_path} does not belong to the key {label!r} in {keystore.url}")
            return cls(keystore, cert, label=label)
        ca = cls(keystore, None, label=label)  # type: ignore[arg-type]
        ca.certificate = ca._self_signed(name, days)
        ca_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cert_path, ca.certificate_pem)
        return ca

    def _self_signed(self, name: str, days: int) -> x509.Certificate:
        public = self.keystore.public_key(self.label)
        subject = _name(name, "edgewise")
        ski = _key_id(public)
        now = _now()
        tbs = a_x509.TbsCertificate({
            "version": "v3",
            "serial_number": new_serial(),
            "signature": _SIG_ALG,
            "issuer": subject,
            "validity": {"not_before": _time(now - CLOCK_SKEW),
                         "not_after": _time(now + timedelta(days=days))},
            "subject": subject,
            "subject_public_key_info": _spki(public),
            "extensions": [
                _ext("basic_constraints", {"ca": True, "path_len_constraint": 0}, critical=True),
                _ext("key_usage", {"key_cert_sign", "crl_sign", "digital_signature"}, critical=True),
                _ext("key_identifier", ski),
            ],
        })
        return self._finish(tbs)

    # -- properties -------------------------------------------------------------------------------

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (hex): what an operator compares out of band."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    def _issuer(self) -> a_x509.Name:
        return a_x509.Name.load(self.certificate.subject.public_bytes())

    def _aki(self) -> dict[str, object]:
        return _ext("authority_key_identifier", {"key_identifier": _key_id(self.certificate.public_key())})

    # -- issuing ----------------------------------------------------------------------------------

    def _leaf(
        self, public_key: object, common_name: str, *, eku: str, days: int,
        san: list[a_x509.GeneralName] | None = None, serial: int | None = None,
    ) -> x509.Certificate:
        _check_ec_p256(public_key, f"certificate for {common_name!r}")
        now = _now()
        not_after = min(now + timedelta(days=days), self.certificate.not_valid_after_utc)
        extensions = [
            _ext("basic_constraints", {"ca": False}, critical=True),
            _ext("key_usage", {"digital_signature"}, critical=True),
            _ext("extended_key_usage", [eku]),
            _ext("key_identifier", _key_id(public_key)),
            self._aki(),
        ]
        if san:
            extensions.append(_ext("subject_alt_name", san))
        tbs = a_x509.TbsCertificate({
            "version": "v3",
            "serial_number": serial or new_serial(),
            "signature": _SIG_ALG,
            "issuer": self._issuer(),
            "validity": {"not_before": _time(now - CLOCK_SKEW), "not_after": _time(not_after)},
            "subject": _name(common_name, "edgewise"),
            "subject_public_key_info": _spki(public_key),
            "extensions": extensions,
        })
        return self._finish(tbs)

    def issue_client(self, csr_pem: bytes | str, device_id: str, *, days: int = DEFAULT_CLIENT_DAYS) -> x509.Certificate:
        """A TLS client certificate for ``device_id`` from its CSR.

        The CSR must parse, carry a valid signature by its own key (proof the requester holds
        the private key), be an ECDSA P-256 key, and name exactly ``device_id`` as its CN.
        Only the key and the CN are taken from it: every extension is the CA's choice.
        """
        csr = parse_csr(csr_pem)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value) if names else None
        if cn != device_id:
            raise CAError(f"the CSR's common name is {cn!r} but the device enrolls as {device_id!r}; "
                          "the CN must be the device id")
        return self._leaf(csr.public_key(), device_id, eku="client_auth", days=days)

    def issue_client_for_key(self, public_key: object, common_name: str, *, days: int = DEFAULT_CLIENT_DAYS) -> x509.Certificate:
        """A client certificate for a key the control plane holds itself (its own MQTT identity)."""
        return self._leaf(public_key, common_name, eku="client_auth", days=days)

    def issue_server(
        self, public_key: object, hostnames: Iterable[str], *, days: int = DEFAULT_SERVER_DAYS,
    ) -> x509.Certificate:
        """A TLS server certificate (the broker's). ``hostnames`` may mix DNS names and IP addresses."""
        names = list(dict.fromkeys(h for h in hostnames if h))
        if not names:
            raise CAError("a server certificate needs at least one host name or IP address")
        san: list[a_x509.GeneralName] = []
        for host in names:
            try:
                ipaddress.ip_address(host)
                san.append(a_x509.GeneralName(name="ip_address", value=host))
            except ValueError:
                san.append(a_x509.GeneralName(name="dns_name", value=host))
        return self._leaf(public_key, names[0], eku="server_auth", days=days, san=san)

    def crl(self, revoked: Iterable[Revoked], *, number: int = 1, days: int = DEFAULT_CRL_DAYS) -> bytes:
        """A signed CRL (PEM) listing ``revoked``; valid for ``days`` (reissue before then)."""
        now = _now()
        entries = [
            {"user_certificate": r.serial, "revocation_date": _time(r.revoked_at.astimezone(timezone.utc).replace(microsecond=0))}
            for r in sorted(revoked, key=lambda r: r.serial)
        ]
        tbs = a_crl.TbsCertList({
            "version": "v2",
            "signature": _SIG_ALG,
            "issuer": self._issuer(),
            "this_update": _time(now - CLOCK_SKEW),
            "next_update": _time(now + timedelta(days=days)),
            "revoked_certificates": entries or None,
            "crl_extensions": [
                {"extn_id": "crl_number", "critical": False, "extn_value": number},
                {"extn_id": "authority_key_identifier", "critical": False,
                 "extn_value": {"key_identifier": _key_id(self.certificate.public_key())}},
            ],
        })
        if not entries:
            del tbs["revoked_certificates"]
        signed = a_crl.CertificateList({
            "tbs_cert_list": tbs, "signature_algorithm": _SIG_ALG,
            "signature": _sign(self.keystore, self.label, tbs),
        })
        crl = x509.load_der_x509_crl(signed.dump())
        if not crl.is_signature_valid(self.certificate.public_key()):  # type: ignore[arg-type]
            raise CAError(f"the CRL signature made with {self.label!r} in {self.keystore.url} does not verify")
        return crl.public_bytes(serialization.Encoding.PEM)

    def _finish(self, tbs: a_x509.TbsCertificate) -> x509.Certificate:
        """Sign ``tbs`` in the keystore and check the result with cryptography before returning it."""
        signed = a_x509.Certificate({
            "tbs_certificate": tbs, "signature_algorithm": _SIG_ALG,
            "signature_value": _sign(self.keystore, self.label, tbs),
        })
        cert = x509.load_der_x509_certificate(signed.dump())
        issuer_key = self.certificate.public_key() if self.certificate is not None else self.keystore.public_key(self.label)
        try:
            issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
        except InvalidSignature:
            raise CAError(f"the signature made with {self.label!r} in {self.keystore.url} does not verify") from None
        return cert

    def verify_issued(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` was signed by this CA (signature only; the caller checks dates and revocation)."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _time(when: datetime) -> a_x509.Time:
    """UTCTime up to 2049, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    if when.year < 2050:
        return a_x509.Time({"utc_time": when})
    return a_x509.Time({"general_time": when})


def parse_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM (or DER) CSR and check its self-signature; :class:`CAError` otherwise."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CAError(f"malformed CSR ({exc}); send a PEM 'CERTIFICATE REQUEST' made with the device key") from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # noqa: BLE001 - unsupported algorithms raise various types
        raise CAError(f"cannot check the CSR's signature ({exc}); use an ECDSA P-256 key") from None
    if not valid:
        raise CAError("the CSR's signature does not verify: it was not signed by the key it carries")
    _check_ec_p256(csr.public_key(), "CSR")
    return csr


def build_csr(keystore: Keystore, label: str, common_name: str) -> bytes:
    """A PEM CSR for the ``ec-p256`` key ``label`` in ``keystore``, signed inside the keystore."""
    public = keystore.public_key(label)
    _check_ec_p256(public, f"key {label!r} in {keystore.url}")
    info = a_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": _name(common_name, "edgewise"),
        "subject_pk_info": _spki(public),
        "attributes": [],
    })
    req = a_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": _SIG_ALG,
        "signature": keystore.sign(label, info.dump()),
    })
    csr = x509.load_der_x509_csr(req.dump())
    if not csr.is_signature_valid:
        raise CAError(f"the CSR signature made with {label!r} in {keystore.url} does not verify")
    return csr.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
