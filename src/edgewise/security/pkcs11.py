"""The PKCS#11 keystore: keys generated inside a token (SoftHSM2, a TPM through tpm2-pkcs11, an HSM) that never leave it.

Every key this backend creates is a token object (``CKA_TOKEN``), private
(``CKA_PRIVATE``: only visible after login), sensitive (``CKA_SENSITIVE``: its
value cannot be read) and not extractable (``CKA_EXTRACTABLE`` false: it cannot
be wrapped out either). The token signs and encrypts; the host only ever sees
public keys, signatures and ciphertext.

- ``ec-p256``: ``CKM_EC_KEY_PAIR_GEN`` on P-256; signing hashes on the host
  (SHA-256) and runs ``CKM_ECDSA`` in the token, whose raw ``r||s`` is returned
  DER-encoded, the way ``cryptography``, OpenSSL and X.509 expect it.
- ``ed25519``: ``CKM_EC_EDWARDS_KEY_PAIR_GEN`` + ``CKM_EDDSA`` when the token
  lists them (SoftHSM2 2.6 built with OpenSSL 1.1.1+ does); otherwise refused,
  naming the mechanism that is missing.
- ``aes-256``: storage keys. ``wrap``/``unwrap`` run ``CKM_AES_GCM`` in the token
  with the caller's associated data; the wrapped form is ``nonce(12) || ciphertext || tag(16)``,
  the same layout as :class:`~edgewise.security.keystore.FileKeystore`.

The URL names the module, the token and where the PIN comes from; it never holds
the PIN itself (URLs end up in config files, process lists and logs)::

    pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=edgewise;pin-env=EDGEWISE_PKCS11_PIN
    pkcs11:module=/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so;token=edgewise;pin-file=/etc/edgewise/pin
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .keystore import KEY_KINDS, KeyKind, KeyNotFound, KeystoreError, NotExtractable

_WRAP_NONCE = 12
_ED25519_OID = "1.3.101.112"
_P256_OID = "1.2.840.10045.3.1.7"

# One loaded library per module path for the whole process: C_Initialize may run only once, and
# finalizing a library (which python-pkcs11 does when its ``lib`` object is collected) would close
# every other keystore's sessions on it.
_LIBS: dict[str, Any] = {}
_LIBS_LOCK = threading.Lock()


def _load_lib(module: str) -> Any:
    import pkcs11

    with _LIBS_LOCK:
        lib = _LIBS.get(module)
        if lib is None:
            try:
                lib = pkcs11.lib(module)
            except pkcs11.PKCS11Error as exc:
                raise KeystoreError(f"cannot load the PKCS#11 module {module}: {exc}") from None
            _LIBS[module] = lib
        return lib


def parse_url(url: str) -> dict[str, str]:
    """``pkcs11:k=v;k=v`` → dict, values percent-decoded. Accepts RFC 7512's ``module-path`` for ``module``."""
    if not url.startswith("pkcs11:"):
        raise KeystoreError(f"{url!r} is not a pkcs11: URL (pkcs11:module=...;token=...;pin-env=VAR)")
    params: dict[str, str] = {}
    for part in url[len("pkcs11:"):].split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise KeystoreError(f"pkcs11 URL: {part!r} is not key=value")
        key = key.strip().lower()
        params[{"module-path": "module", "token-label": "token"}.get(key, key)] = unquote(value.strip())
    known = {"module", "token", "pin-env", "pin-file"}
    if "pin-value" in params or "pin" in params:
        raise KeystoreError(
            "pkcs11 URL: a PIN in the URL is refused (URLs end up in config files, process lists and logs); "
            "use pin-env=VARIABLE or pin-file=/path/to/file"
        )
    unknown = sorted(set(params) - known)
    if unknown:
        raise KeystoreError(f"pkcs11 URL: unknown attribute(s) {unknown}; known: {sorted(known)}")
    return params


def _read_pin(params: dict[str, str]) -> str:
    if "pin-env" in params:
        var = params["pin-env"]
        pin = os.environ.get(var)
        if not pin:
            raise KeystoreError(f"pkcs11 keystore: the PIN variable ${var} is not set (pin-env={var}); export it before starting")
        return pin
    if "pin-file" in params:
        path = Path(params["pin-file"])
        try:
            pin = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeystoreError(f"pkcs11 keystore: cannot read the PIN file {path}: {exc.strerror or exc}") from None
        if not pin:
            raise KeystoreError(f"pkcs11 keystore: the PIN file {path} is empty")
        return pin
    raise KeystoreError("pkcs11 URL names no PIN source: add pin-env=VARIABLE or pin-file=/path/to/file")


class Pkcs11Keystore:
    """Keys in a PKCS#11 token. Thread-safe: one logged-in session, calls serialized (tokens are slow anyway)."""

    def __init__(self, module: str, token_label: str, pin: str, *, url: str | None = None) -> None:
        import pkcs11
        from pkcs11 import exceptions as pe

        if not Path(module).exists():
            raise KeystoreError(
                f"PKCS#11 module {module} does not exist; install it (SoftHSM2: apt-get install softhsm2; "
                "TPM: apt-get install libtpm2-pkcs11-1) or fix module= in the keystore URL"
            )
        self._url = url or f"pkcs11:module={module};token={token_label}"
        lib = _load_lib(module)
        try:
            token = lib.get_token(token_label=token_label)
        except pe.NoSuchToken:
            labels = sorted({t.label for t in lib.get_tokens()} - {""})  # an uninitialized slot has no label
            raise KeystoreError(
                f"{self._url}: no token labelled {token_label!r} (tokens: {labels or 'none'}); "
                f"create it, e.g. softhsm2-util --init-token --free --label {token_label}"
            ) from None
        except pe.MultipleTokensReturned:
            raise KeystoreError(f"{self._url}: several tokens are labelled {token_label!r}; give each a unique label") from None
        try:
            try:
                self._session = token.open(rw=True, user_pin=pin)
            except pe.UserAlreadyLoggedIn:
                # PKCS#11 logins are per application: another keystore in this process is logged in already.
                self._session = token.open(rw=True)
        except (pe.PinIncorrect, pe.PinInvalid, pe.PinLenRange):
            raise KeystoreError(f"{self._url}: the token refused the PIN; check the PIN source named in the URL") from None
        except pe.PinLocked:
            raise KeystoreError(f"{self._url}: the token's user PIN is locked (too many wrong PINs); unlock it with the SO PIN") from None
        except pe.PKCS11Error as exc:
            raise KeystoreError(f"{self._url}: cannot open a session: {type(exc).__name__} {exc}") from None
        self._pkcs11 = pkcs11
        self._errors = pe
        self._lock = threading.RLock()
        self._mechanisms = set(token.slot.get_mechanisms())
        self.token_label = token_label
        self.module = module

    @classmethod
    def from_url(cls, url: str) -> "Pkcs11Keystore":
        """Open the token a ``pkcs11:module=...;token=...;pin-env=VAR`` (or ``pin-file=PATH``) URL names."""
        params = parse_url(url)
        for required in ("module", "token"):
            if not params.get(required):
                raise KeystoreError(f"pkcs11 URL {url!r} has no {required}=; e.g. pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=edgewise;pin-env=EDGEWISE_PKCS11_PIN")
        return cls(params["module"], params["token"], _read_pin(params), url=url)

    @property
    def url(self) -> str:
        return self._url

    def close(self) -> None:
        with self._lock:
            try:
                self._session.close()
            except self._errors.PKCS11Error:
                pass

    # -- lookup ---------------------------------------------------------------------------------

    def _objects(self, label: str, object_class: Any = None) -> list[Any]:
        from pkcs11 import Attribute

        attrs: dict[Any, Any] = {Attribute.LABEL: label}
        if object_class is not None:
            attrs[Attribute.CLASS] = object_class
        return list(self._session.get_objects(attrs))

    def has_key(self, label: str) -> bool:
        with self._lock:
            return bool(self._objects(label))

    def _find(self, label: str, object_class: Any) -> Any:
        objs = self._objects(label, object_class)
        if not objs:
            if self._objects(label):
                raise KeystoreError(f"{self.url}: key {label!r} is not of the kind this operation needs")
            raise KeyNotFound(f"{self.url}: no key {label!r} in token {self.token_label!r} (create it first)")
        if len(objs) > 1:
            raise KeystoreError(f"{self.url}: {len(objs)} objects are labelled {label!r}; remove the duplicates")
        return objs[0]

    def kind(self, label: str) -> KeyKind:
        """What kind of key ``label`` is, read from the token's attributes."""
        from pkcs11 import KeyType, ObjectClass

        with self._lock:
            objs = self._objects(label)
            if not objs:
                raise KeyNotFound(f"{self.url}: no key {label!r} in token {self.token_label!r}")
            for obj in objs:
                if obj.object_class == ObjectClass.SECRET_KEY:
                    return "aes-256"
                if obj.object_class == ObjectClass.PRIVATE_KEY:
                    return "ed25519" if obj.key_type == KeyType.EC_EDWARDS else "ec-p256"
        raise KeystoreError(f"{self.url}: {label!r} is neither a key pair nor a storage key")

    # -- creation -------------------------------------------------------------------------------

    def _need(self, kind: str, *mechanisms: Any) -> None:
        missing = [m for m in mechanisms if m not in self._mechanisms]
        if missing:
            names = ", ".join(getattr(m, "name", hex(int(m))) for m in missing)
            raise KeystoreError(
                f"{self.url}: token {self.token_label!r} cannot make {kind} keys: it does not offer {names} "
                "(check its mechanism list with pkcs11-tool --list-mechanisms)"
            )

    def create_key(self, label: str, kind: KeyKind) -> None:
        """Generate ``label`` inside the token: token object, private, sensitive, never extractable."""
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
        from pkcs11.util.ec import encode_named_curve_parameters

        if kind not in KEY_KINDS:
            raise KeystoreError(f"unknown key kind {kind!r}; one of {', '.join(KEY_KINDS)}")
        if not label or not label.isprintable():
            raise KeystoreError(f"invalid key label {label!r}")
        locked = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        with self._lock:
            if self._objects(label):
                raise KeystoreError(f"{self.url}: key {label!r} already exists")
            try:
                if kind == "aes-256":
                    self._need(kind, Mechanism.AES_KEY_GEN, Mechanism.AES_GCM)
                    self._session.generate_key(
                        KeyType.AES, 256, label=label, store=True,
                        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT, template=locked,
                    )
                    return
                if kind == "ec-p256":
                    self._need(kind, Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA)
                    key_type, oid = KeyType.EC, _P256_OID
                else:
                    self._need(kind, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA)
                    key_type, oid = KeyType.EC_EDWARDS, _ED25519_OID
                params = self._session.create_domain_parameters(
                    key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True
                )
                params.generate_keypair(
                    label=label, store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
                    private_template=locked,
                )
            except self._errors.PKCS11Error as exc:
                raise KeystoreError(f"{self.url}: the token cannot generate {kind} key {label!r}: {type(exc).__name__} {exc}") from None

    # -- key pairs ------------------------------------------------------------------------------

    def public_key(self, label: str):  # type: ignore[no-untyped-def]
        """The public half as a ``cryptography`` object (EllipticCurvePublicKey or Ed25519PublicKey)."""
        from asn1crypto.core import OctetString
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_der_public_key
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        with self._lock:
            pub = self._find(label, ObjectClass.PUBLIC_KEY)
            if pub.key_type == KeyType.EC_EDWARDS:
                point = pub[Attribute.EC_POINT]
                raw = bytes(OctetString.load(point)) if len(point) != 32 else bytes(point)
                return Ed25519PublicKey.from_public_bytes(raw)
            return load_der_public_key(encode_ec_public_key(pub))

    def sign(self, label: str, data: bytes) -> bytes:
        """ECDSA-SHA256 (DER) for ``ec-p256``, Ed25519 for ``ed25519``; computed in the token."""
        from pkcs11 import KeyType, Mechanism, ObjectClass
        from pkcs11.util.ec import encode_ecdsa_signature

        with self._lock:
            priv = self._find(label, ObjectClass.PRIVATE_KEY)
            try:
                if priv.key_type == KeyType.EC_EDWARDS:
                    return bytes(priv.sign(data, mechanism=Mechanism.EDDSA))
                raw = priv.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
            except self._errors.PKCS11Error as exc:
                raise KeystoreError(f"{self.url}: the token cannot sign with {label!r}: {type(exc).__name__} {exc}") from None
        return encode_ecdsa_signature(bytes(raw))

    def private_key(self, label: str) -> Any:
        """Always refused: asks the token for the key's value (``CKA_VALUE``) and reports its refusal.

        Kept so code written for :class:`FileKeystore` fails with a clear message instead of an AttributeError.
        """
        from pkcs11 import Attribute, ObjectClass

        with self._lock:
            objs = self._objects(label, ObjectClass.PRIVATE_KEY) or self._objects(label, ObjectClass.SECRET_KEY)
            if not objs:
                raise KeyNotFound(f"{self.url}: no key {label!r} in token {self.token_label!r}")
            try:
                objs[0][Attribute.VALUE]
            except (self._errors.AttributeSensitive, self._errors.AttributeTypeInvalid):
                raise NotExtractable(
                    f"{self.url}: {label!r} lives in the token and is sensitive and not extractable; "
                    "use sign()/wrap()/unwrap() instead of reading the key"
                ) from None
        raise KeystoreError(f"{self.url}: the token revealed the value of {label!r}: it is not protected; recreate it with create_key")

    def protection(self, label: str) -> dict[str, bool]:
        """The token's own word on how ``label`` is protected (TOKEN, PRIVATE, SENSITIVE, EXTRACTABLE, ...)."""
        from pkcs11 import Attribute, ObjectClass

        names = ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE")
        with self._lock:
            objs = self._objects(label, ObjectClass.PRIVATE_KEY) or self._objects(label, ObjectClass.SECRET_KEY)
            if not objs:
                raise KeyNotFound(f"{self.url}: no key {label!r} in token {self.token_label!r}")
            return {n.lower(): bool(objs[0][getattr(Attribute, n)]) for n in names}

    # -- storage keys ---------------------------------------------------------------------------

    def _secret(self, label: str) -> Any:
        from pkcs11 import ObjectClass

        try:
            return self._find(label, ObjectClass.SECRET_KEY)
        except KeyNotFound:
            raise
        except KeystoreError:
            raise KeystoreError(f"{self.url}: {label!r} is not a storage (aes-256) key") from None

    def wrap(self, label: str, key: bytes, aad: bytes) -> bytes:
        """AES-256-GCM in the token over ``key``, bound to ``aad``: ``nonce || ciphertext || tag``."""
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        nonce = os.urandom(_WRAP_NONCE)
        with self._lock:
            secret = self._secret(label)
            try:
                ct = secret.encrypt(bytes(key), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, bytes(aad), 128))
            except self._errors.PKCS11Error as exc:
                raise KeystoreError(f"{self.url}: the token cannot wrap with {label!r}: {type(exc).__name__} {exc}") from None
        return nonce + bytes(ct)

    def unwrap(self, label: str, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`wrap`; a wrong key, altered bytes or other ``aad`` fail the tag check in the token."""
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        if len(wrapped) < _WRAP_NONCE + 16:
            raise KeystoreError(f"{self.url}: cannot unwrap with {label!r}: {len(wrapped)} bytes is too short to be a wrapped key")
        with self._lock:
            secret = self._secret(label)
            try:
                return bytes(secret.decrypt(
                    bytes(wrapped[_WRAP_NONCE:]), mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(bytes(wrapped[:_WRAP_NONCE]), bytes(aad), 128),
                ))
            except self._errors.PKCS11Error:
                raise KeystoreError(
                    f"{self.url}: cannot unwrap with {label!r}: wrong key, or the wrapped key or its context was altered"
                ) from None
