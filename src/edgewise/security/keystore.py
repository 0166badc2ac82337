"""Where private keys live: one interface, two backends (files, PKCS#11 tokens).

Callers never hold private key material when they do not have to: they ask the
keystore to *sign* with a label, or to *wrap/unwrap* a data key with a storage
key. That is what lets the same code run with keys in 0600 files on a laptop and
with keys in a TPM or HSM (through PKCS#11) on a device, where the private half
cannot be read out at all.

Key kinds:

- ``ec-p256``: ECDSA over P-256 with SHA-256, signatures DER-encoded. Device
  identity (TLS client certificates) and the fleet CA: every TPM and HSM has it.
- ``ed25519``: bundle and metadata signing (what ``security.keys`` uses).
- ``aes-256``: storage keys. They never encrypt bulk data themselves; they wrap
  per-file data keys (AES-256-GCM, with associated data naming what is wrapped).

A keystore is named by a URL (``open_keystore``):

- ``file:/path/to/dir`` (or a plain path): one PEM/raw file per label, mode 0600.
- ``pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=edgewise;pin-env=EDGEWISE_PKCS11_PIN``:
  see ``security.pkcs11`` (keys generated in the token, not extractable).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..fsutil import atomic_write

KeyKind = Literal["ec-p256", "ed25519", "aes-256"]
KEY_KINDS: tuple[str, ...] = ("ec-p256", "ed25519", "aes-256")
_WRAP_NONCE = 12


class KeystoreError(RuntimeError):
    """A keystore that cannot do what was asked; the message names the keystore and the label."""


class KeyNotFound(KeystoreError):
    pass


class NotExtractable(KeystoreError):
    """The private key lives in hardware (or is marked sensitive) and cannot be read out."""


@runtime_checkable
class Keystore(Protocol):
    """What every backend offers. Labels are short names such as ``device-identity`` or ``storage``."""

    @property
    def url(self) -> str: ...

    def has_key(self, label: str) -> bool: ...

    def create_key(self, label: str, kind: KeyKind) -> None:
        """Generate a new key inside the store; refuses to overwrite an existing label."""
        ...

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey | object:
        """The public half (a ``cryptography`` public key object) of an ``ec-p256``/``ed25519`` key."""
        ...

    def sign(self, label: str, data: bytes) -> bytes:
        """ECDSA-SHA256 (DER) for ``ec-p256``, raw Ed25519 for ``ed25519``."""
        ...

    def wrap(self, label: str, key: bytes, aad: bytes) -> bytes:
        """Encrypt a data key with the ``aes-256`` storage key ``label``, bound to ``aad``."""
        ...

    def unwrap(self, label: str, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of ``wrap``; raises ``KeystoreError`` if anything (key, data, aad) does not match."""
        ...


class FileKeystore:
    """Keys in files under one folder, each 0600; the folder 0700. The default on workstations and the demo."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return f"file:{self.root}"

    def _path(self, label: str) -> Path:
        if not label or "/" in label or label.startswith("."):
            raise KeystoreError(f"invalid key label {label!r}: use letters, digits, '-' and '_'")
        return self.root / f"{label}.key"

    def has_key(self, label: str) -> bool:
        return self._path(label).exists()

    def create_key(self, label: str, kind: KeyKind) -> None:
        path = self._path(label)
        if path.exists():
            raise KeystoreError(f"{self.url}: key {label!r} already exists")
        if kind == "aes-256":
            data = b"aes-256:" + AESGCM.generate_key(bit_length=256).hex().encode()
        elif kind in ("ec-p256", "ed25519"):
            key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec-p256" else Ed25519PrivateKey.generate()
            data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        else:
            raise KeystoreError(f"unknown key kind {kind!r}; one of {', '.join(KEY_KINDS)}")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        atomic_write(path, data, mode=0o600)

    def _read(self, label: str) -> bytes:
        path = self._path(label)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFound(f"{self.url}: no key {label!r} (create it first)") from None

    def private_key(self, label: str):  # type: ignore[no-untyped-def]
        """The private key object (file backend only: what TLS libraries that need a key file use)."""
        data = self._read(label)
        if data.startswith(b"aes-256:"):
            raise KeystoreError(f"{self.url}: {label!r} is a storage key, not a key pair")
        return serialization.load_pem_private_key(data, password=None)

    def private_key_path(self, label: str) -> Path:
        """Where the PEM lives (for ``ssl.SSLContext.load_cert_chain``)."""
        self._read(label)
        return self._path(label)

    def public_key(self, label: str):  # type: ignore[no-untyped-def]
        return self.private_key(label).public_key()

    def sign(self, label: str, data: bytes) -> bytes:
        key = self.private_key(label)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        return key.sign(data)

    def _aes(self, label: str) -> AESGCM:
        data = self._read(label)
        if not data.startswith(b"aes-256:"):
            raise KeystoreError(f"{self.url}: {label!r} is not a storage (aes-256) key")
        return AESGCM(bytes.fromhex(data[8:].decode()))

    def wrap(self, label: str, key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_WRAP_NONCE)
        return nonce + self._aes(label).encrypt(nonce, key, aad)

    def unwrap(self, label: str, wrapped: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aes(label).decrypt(wrapped[:_WRAP_NONCE], wrapped[_WRAP_NONCE:], aad)
        except (InvalidTag, ValueError):
            raise KeystoreError(
                f"{self.url}: cannot unwrap with {label!r}: wrong key, or the wrapped key or its context was altered"
            ) from None


def open_keystore(url: str | Path) -> Keystore:
    """``file:/dir`` or a path → ``FileKeystore``; ``pkcs11:...`` → ``security.pkcs11.Pkcs11Keystore``."""
    text = str(url)
    if text.startswith("pkcs11:"):
        from .pkcs11 import Pkcs11Keystore

        return Pkcs11Keystore.from_url(text)
    if text.startswith("file:"):
        text = text[5:]
    return FileKeystore(Path(text))
