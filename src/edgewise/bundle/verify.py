"""Verify a bundle before anything in it is trusted. Auditable on its own.

Order matters: the signature over the archive bytes is checked first (one
streamed hash), and only then is any content used. When the signature fails we
look further, only to tell the user *what* was altered.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

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
    verification cannot smuggle bytes in. A bundle verified from memory
    (``data`` set: decrypted from an encrypted slot) is read from those bytes
    only; its plaintext never goes to disk.
    """

    path: Path
    manifest: Manifest
    key_id: str
    sha256: str  # of the whole file, as TUF and the registry refer to it
    size: int
    data: bytes | bytearray | memoryview | None = field(default=None, repr=False, compare=False)

    def _zip(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(_MemoryFile(self.data) if self.data is not None else self.path)

    def read_member(self, name: str) -> bytes:
        expected = self.manifest.members.get(name)
        if expected is None:
            raise BundleMemberError(f"{self.path.name}: no member {name!r} in the manifest")
        if self.data is not None:
            # Verified from memory: the buffer the signature was checked over is held by this object alone and
            # never written to, so the member is sliced out of it (one copy, no re-hash: 50 MB models load faster;
            # the copy goes into huge pages, see copy_to_bytes).
            with self._zip() as zf:
                view = _stored_member(self.data, zf, name)
                if view is not None:
                    from ..security.encryption import copy_to_bytes

                    return copy_to_bytes(view)
        with self._zip() as zf:
            try:
                data = zf.read(name)
            except Exception as exc:
                raise BundleMemberError(f"{self.path.name}: member {name!r} cannot be read: {exc}") from None
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise BundleMemberError(f"{self.path.name}: member {name!r} changed after verification")
        return data

    def read_model(self) -> bytes:
        return self.read_member(self.manifest.model.path)


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a buffer without copying it (``io.BytesIO`` copies a bytearray)."""

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(buf)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return out

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _stored_member(buf: bytes | bytearray | memoryview, zf: zipfile.ZipFile, name: str) -> memoryview | None:
    """The bytes of a stored (uncompressed) member, as a view into ``buf``; None when it is compressed or malformed."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    view = memoryview(buf)
    head = bytes(view[info.header_offset : info.header_offset + 30])
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        return None
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if start + info.file_size > len(view):
        return None
    return view[start : start + info.file_size]


@runtime_checkable
class PlaintextSource(Protocol):
    """A bundle stored encrypted (an agent slot): it decrypts itself into memory, raising on any tampering."""

    name: str

    def read_plaintext(self) -> bytes: ...


def _open_zip(path: Path, data: bytes | None = None) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(_MemoryFile(data) if data is not None else path)
    except Exception as exc:  # BadZipFile, but also struct/Unicode errors on mangled headers
        raise BundleFormatError(
            f"{path.name}: not a readable bundle archive ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from None


def _read_signature(path: Path, data: bytes | None = None) -> SignatureInfo:
    if data is not None:
        return _read_signature_from(io.BytesIO(data), len(data), path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BundleFormatError(f"cannot open bundle {path}: {exc.strerror}") from None
    with f:
        return _read_signature_from(f, f.seek(0, 2), path)


def _read_signature_from(f: BinaryIO, size: int, path: Path) -> SignatureInfo:
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


def verify_bundle(path: Path | str | PlaintextSource, trusted: TrustedKeys) -> VerifiedBundle:
    """Verify signature, manifest and every member; raise a BundleError naming what failed.

    ``path`` may also be a :class:`PlaintextSource` (an encrypted agent slot): it is
    decrypted into memory and verified from there (see :func:`verify_bundle_bytes`).
    """
    if isinstance(path, PlaintextSource) and callable(getattr(path, "read_plaintext", None)):
        from ..security.encryption import EncryptionError

        try:
            digest_read = getattr(path, "read_plaintext_digest", None)
            if digest_read is not None:  # the signature's hash is computed while decrypting, on a second core
                data, prefix = digest_read(fmt.BLOCK_LEN)
            else:
                data, prefix = path.read_plaintext(), None
        except EncryptionError as exc:
            raise BundleFormatError(f"cannot decrypt the stored bundle: {exc}") from None
        return _verify_memory(Path(path), trusted, data, prefix)  # type: ignore[arg-type]
    path = Path(path)
    if _is_sealed(path):
        raise BundleFormatError(
            f"{path.name} is encrypted at rest (an agent slot): it opens only with that device's storage key, through the agent"
        )
    return _verify(path, trusted, None)


def verify_bundle_bytes(data: bytes | bytearray, trusted: TrustedKeys, *, path: Path | str = "bundle.ewb") -> VerifiedBundle:
    """Verify a bundle held in memory (``path`` only names it in messages); members are read from ``data``.

    The caller must not modify ``data`` afterwards: members are sliced from it without being hashed again.
    """
    return _verify_memory(Path(path), trusted, data, None)


def _verify_memory(path: Path, trusted: TrustedKeys, data: bytes | bytearray | memoryview, prefix: Any = None) -> VerifiedBundle:
    """Like ``_verify`` on a buffer: no copies of it, one hash pass.

    ``prefix``: the sha256 of all but the signature block, computed by the caller while it produced the
    buffer (a hash object, or a future of one that finishes on another core).

    Once the signature over every archive byte holds, member contents are checked by size and listing only:
    the manifest (with their hashes) and the member bytes are both inside the signed bytes, so a second hash
    pass could only catch a bundle its trusted signer built wrong. When the signature fails, every member is
    hashed to say what was altered.
    """
    view = memoryview(data)
    size = len(view)
    if size < fmt.BLOCK_LEN + fmt.EOCD_LEN:
        raise BundleFormatError(f"{path.name}: {size} bytes is too short to be a bundle")
    parsed = fmt.unpack_block(bytes(view[size - fmt.BLOCK_LEN :]))
    comment_len = int.from_bytes(view[size - fmt.BLOCK_LEN - 2 : size - fmt.BLOCK_LEN], "little")
    if parsed is None or comment_len != fmt.BLOCK_LEN:
        raise BundleSignatureError(
            f"{path.name}: no edgewise signature block at the end of the file "
            "(unsigned, truncated or not a bundle); sign it with `edgewise bundle create --key`"
        )
    key_id, signature = parsed
    with _open_zip(path, data) as zf:
        if prefix is not None and hasattr(prefix, "result"):
            prefix = prefix.result()  # the zip's directory was read meanwhile
        h = prefix if prefix is not None else hashlib.sha256(view[: size - fmt.BLOCK_LEN])
        whole = h.copy()
        whole.update(view[size - fmt.BLOCK_LEN :])
        signed_ok = trusted.verify(key_id, signature, fmt.signed_message(h.digest()))
        manifest = _parse_manifest(path, zf)
        if not signed_ok:
            _check_members(path, zf, manifest)
            _signature_failure(path, key_id, trusted)
        _check_listing(path, zf, manifest)
    return VerifiedBundle(path=path, manifest=manifest, key_id=key_id, sha256=whole.hexdigest(), size=size, data=data)


def _check_listing(path: Path, zf: zipfile.ZipFile, manifest: Manifest) -> None:
    """Every manifest member present with its size, nothing unlisted, the model among them (no content hashing)."""
    infos = {i.filename: i for i in zf.infolist()}
    for name, member in manifest.members.items():
        info = infos.get(name)
        if info is None:
            raise BundleMemberError(f"{path.name}: member {name!r} listed in the manifest is missing")
        if info.file_size != member.size:
            raise BundleMemberError(f"{path.name}: member {name!r} is {info.file_size} bytes, the manifest says {member.size}")
    extra = sorted(set(infos) - set(manifest.members) - {MANIFEST_MEMBER})
    if extra:
        raise BundleMemberError(f"{path.name}: member(s) {extra} are not listed in the manifest")
    if manifest.model.path not in manifest.members:
        raise BundleManifestError(f"{path.name}: the model file {manifest.model.path!r} is not a member")


def _signature_failure(path: Path, key_id: str, trusted: TrustedKeys) -> None:
    if key_id not in trusted:
        raise BundleSignatureError(
            f"{path.name}: signed by key {key_id}, which is not trusted "
            f"(trusted: {', '.join(trusted.ids) or 'none'}); pass the right key with --trust"
        )
    raise BundleSignatureError(
        f"{path.name}: signature by key {key_id} does not match the archive bytes: "
        "the bundle was altered after signing"
    )


def _is_sealed(path: Path) -> bool:
    from ..security.encryption import is_sealed

    return is_sealed(path)


def _verify(path: Path, trusted: TrustedKeys, data: bytes | None) -> VerifiedBundle:
    """The file path: signature (one streamed hash), then manifest and every member hashed again."""
    sig = _read_signature(path, data)
    signed_ok = trusted.verify(sig.key_id, sig.signature, fmt.signed_message(bytes.fromhex(sig.archive_sha256)))
    if not signed_ok:
        # Find the most specific explanation before blaming the signature.
        with _open_zip(path, data) as zf:
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
    with _open_zip(path, data) as zf:
        manifest = _parse_manifest(path, zf)
        _check_members(path, zf, manifest)
    if data is not None:
        return VerifiedBundle(path=path, manifest=manifest, key_id=sig.key_id, sha256=hashlib.sha256(data).hexdigest(),
                              size=len(data), data=data)
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


def sha256_file(path: Path | str | PlaintextSource) -> str:
    """sha256 of a bundle file; of its plaintext for an encrypted agent slot (what slot records name)."""
    if isinstance(path, PlaintextSource) and callable(getattr(path, "read_plaintext", None)):
        return hashlib.sha256(path.read_plaintext()).hexdigest()
    return _sha256_file(Path(path))
