"""Ed25519 signing keys kept in files (the PKCS#11 backend plugs in behind ``Signer``).

Key ids are the first 16 hex digits of sha256 over the raw public key, so a
verifier can say *which* key signed something it does not trust.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyFileError(ValueError):
    """A key file that cannot be used (missing, wrong format, wrong type)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer(Protocol):
    """Anything that can sign: a key file today, a PKCS#11 token tomorrow."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class FileSigner:
    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


def generate_keypair(private_path: Path, public_path: Path | None = None, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair (private key mode 0600); return its key id."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise KeyFileError(f"{p} already exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_id(key.public_key())


def load_signer(path: Path) -> FileSigner:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}; edgewise signs with Ed25519 (run `edgewise keys generate`)")
    return FileSigner(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        # Accept a private key file too: its public half is what we need.
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


class TrustedKeys:
    """The set of public keys a verifier accepts, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> "TrustedKeys":
        keys: list[Ed25519PublicKey] = []
        for p in paths:
            p = Path(p)
            if p.is_dir():
                keys.extend(load_public_key(f) for f in sorted(p.iterdir()) if f.suffix in (".pub", ".pem"))
            else:
                keys.append(load_public_key(p))
        return cls(keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, kid: str, signature: bytes, data: bytes) -> bool:
        """True if the key ``kid`` is trusted and signed ``data``."""
        key = self._keys.get(kid)
        if key is None:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys
