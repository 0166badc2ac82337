"""Verify a bundle before anything in it is trusted. Auditable on its own.

Order matters: the signature over the archive bytes is checked first (one
streamed hash), and only then is any content used. When the signature fails we
look further, only to tell the user *what* was altered.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..security.keys import TrustedKeys
from . import format as fmt
from .errors import BundleFormatError, BundleManifestError, BundleMemberError, BundleSignatureError
from .manifest import MANIFEST_MEMBER, Manifest


@dataclass(frozen=True)
class SignatureInfo:
    key_id: str
    signature: bytes
    archive_sha256: str  # sha256 of the signed bytes (everything before the signature block)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and member hashes checked out.

    ``read_member`` re-checks the hash on every read, so swapping the file after
    verification cannot smuggle bytes in.
    """

    path: Path
    manifest: Manifest
    key_id: str
    sha256: str  # of the whole file, as TUF and the registry refer to it
    size: int

    def read_member(self, name: str) -> bytes:
        expected = self.manifest.members.get(name)
        if expected is None:
            raise BundleMemberError(f"{self.path.name}: no member {name!r} in the manifest")
        with zipfile.ZipFile(self.path) as zf:
            try:
                data = zf.read(name)
            except Exception as exc:
                raise BundleMemberError(f"{self.path.name}: member {name!r} cannot be read: {exc}") from None
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise BundleMemberError(f"{self.path.name}: member {name!r} changed after verification")
        return data

    def read_model(self) -> bytes:
        return self.read_member(self.manifest.model.path)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, but also struct/Unicode errors on mangled headers
        raise BundleFormatError(
            f"{path.name}: not a readable bundle archive ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from None


def _read_signature(path: Path) -> SignatureInfo:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BundleFormatError(f"cannot open bundle {path}: {exc.strerror}") from None
    with f:
        size = f.seek(0, 2)
        if size < fmt.BLOCK_LEN + fmt.EOCD_LEN:
            raise BundleFormatError(f"{path.name}: {size} bytes is too short to be a bundle")
        f.seek(size - fmt.BLOCK_LEN)
        parsed = fmt.unpack_block(f.read(fmt.BLOCK_LEN))
        if parsed is None or fmt.comment_length_field(f, size) != fmt.BLOCK_LEN:
            raise BundleSignatureError(
                f"{path.name}: no edgewise signature block at the end of the file "
                "(unsigned, truncated or not a bundle); sign it with `edgewise bundle create --key`"
            )
        digest = fmt.hash_prefix(f, size - fmt.BLOCK_LEN)
    return SignatureInfo(key_id=parsed[0], signature=parsed[1], archive_sha256=digest.hex())


def _parse_manifest(path: Path, zf: zipfile.ZipFile) -> Manifest:
    try:
        raw = zf.read(MANIFEST_MEMBER)
    except KeyError:
        raise BundleManifestError(f"{path.name}: {MANIFEST_MEMBER} is missing") from None
    except Exception as exc:
        raise BundleManifestError(f"{path.name}: {MANIFEST_MEMBER} is corrupt ({type(exc).__name__}: {exc})") from None
    try:
        return Manifest.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e.get("loc", ())) or "manifest"
            msg = f"{where}: {e.get('msg')}"
        else:
            msg = str(exc)
        raise BundleManifestError(f"{path.name}: {MANIFEST_MEMBER} is invalid: {msg}") from None


def _check_members(path: Path, zf: zipfile.ZipFile, manifest: Manifest) -> None:
    present = set(zf.namelist())
    for name, member in manifest.members.items():
        if name not in present:
            raise BundleMemberError(f"{path.name}: member {name!r} listed in the manifest is missing")
        h = hashlib.sha256()
        size = 0
        try:
            with zf.open(name) as src:
                while chunk := src.read(fmt.CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except Exception as exc:  # zipfile raises BadZipFile, EOFError, NotImplementedError, ...
            raise BundleMemberError(f"{path.name}: member {name!r} is corrupt ({type(exc).__name__}: {exc})") from None
        if size != member.size or h.hexdigest() != member.sha256:
            raise BundleMemberError(
                f"{path.name}: member {name!r} does not match the manifest "
                f"(sha256 {h.hexdigest()[:16]}…, {size} bytes; expected {member.sha256[:16]}…, {member.size} bytes)"
            )
    extra = sorted(present - set(manifest.members) - {MANIFEST_MEMBER})
    if extra:
        raise BundleMemberError(f"{path.name}: member(s) {extra} are not listed in the manifest")
    if manifest.model.path not in manifest.members:
        raise BundleManifestError(f"{path.name}: the model file {manifest.model.path!r} is not a member")


def verify_bundle(path: Path | str, trusted: TrustedKeys) -> VerifiedBundle:
    """Verify signature, manifest and every member; raise a BundleError naming what failed."""
    path = Path(path)
    sig = _read_signature(path)
    signed_ok = trusted.verify(sig.key_id, sig.signature, fmt.signed_message(bytes.fromhex(sig.archive_sha256)))
    if not signed_ok:
        # Find the most specific explanation before blaming the signature.
        with _open_zip(path) as zf:
            manifest = _parse_manifest(path, zf)
            _check_members(path, zf, manifest)
        if sig.key_id not in trusted:
            raise BundleSignatureError(
                f"{path.name}: signed by key {sig.key_id}, which is not trusted "
                f"(trusted: {', '.join(trusted.ids) or 'none'}); pass the right key with --trust"
            )
        raise BundleSignatureError(
            f"{path.name}: signature by key {sig.key_id} does not match the archive bytes: "
            "the bundle was altered after signing"
        )
    with _open_zip(path) as zf:
        manifest = _parse_manifest(path, zf)
        _check_members(path, zf, manifest)
    size = path.stat().st_size
    return VerifiedBundle(path=path, manifest=manifest, key_id=sig.key_id, sha256=_sha256_file(path), size=size)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(fmt.CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path | str) -> tuple[Manifest, SignatureInfo | None]:
    """Read a bundle's manifest WITHOUT trusting it (for ``inspect``)."""
    path = Path(path)
    try:
        sig: SignatureInfo | None = _read_signature(path)
    except BundleSignatureError:
        sig = None
    with _open_zip(path) as zf:
        return _parse_manifest(path, zf), sig


def sha256_file(path: Path | str) -> str:
    return _sha256_file(Path(path))
