"""Encryption at rest: models in chunked AES-256-GCM files, outbox rows sealed one by one.

A stolen SD card must give away neither the models a device runs nor the data it
has not sent yet. Both use a random 256-bit *data key* per file (per outbox),
wrapped by the keystore's ``aes-256`` storage key, so the storage key can stay in
a token (PKCS#11: the wrap runs in the token) while bulk data is encrypted on the
host at memory speed.

Sealed file format, version 1 (all integers big-endian)::

    header:
      magic        5  b"EWENC"
      version      1  1
      flags        1  0 (reserved)
      chunk_size   4  plaintext bytes per chunk (the last chunk may be shorter)
      size         8  plaintext bytes in total
      nonce_prefix 8  random, per file
      label_len    1  + label      the storage key's label in the keystore (utf-8)
      context_len  2  + context    what this file is for, e.g. "model;device=dev1;slot=a" (utf-8)
      wrapped_len  2  + wrapped    the data key wrapped by the storage key, AAD = b"edgewise-data-key/1\\0" + context
      header_tag  16  AES-GCM tag (data key, nonce = prefix || 0xFFFFFFFF, empty plaintext) over every header byte before it
    chunks, n = max(1, ceil(size / chunk_size)):
      ciphertext || tag(16), nonce = nonce_prefix || index (4 bytes),
      AAD = sha256(header) || index (4) || final (1: 1 for the last chunk, else 0)

Every chunk carries the header's digest, its own position and whether it is the
last one, so flipping a bit anywhere, cutting the file (inside a chunk or at a
chunk boundary), moving chunks around, splicing chunks from another file or
editing the header all fail authentication. When something fails we look
further (only then) to say *what*: which chunk, truncated where, which chunk was
moved to which position.

Decryption is into memory only: :func:`open_sealed` returns bytes; nothing
writes plaintext to disk.

Outbox rows (:class:`RowSealer`): ``0xC1 || nonce(12) || ciphertext || tag(16)``
with AAD = ``b"edgewise-outbox-row/1\\0" + device_id + b"\\0" + seq (8 bytes)``.
0xC1 is the one byte msgpack never uses, so a sealed row can never be mistaken
for a plaintext (pre-encryption) row and both can sit in the same outbox.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..fsutil import atomic_write, fsync_dir
from .keystore import Keystore, KeystoreError

MAGIC = b"EWENC"
VERSION = 1
TAG = 16
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 64 << 20
_FIXED = struct.Struct(">5sBBIQ8s")  # magic, version, flags, chunk_size, size, nonce_prefix
_HEADER_COUNTER = 0xFFFFFFFF
_KEY_AAD = b"edgewise-data-key/1\0"
_HEADER_AAD = b"edgewise-header/1\0"
ROW_MARK = b"\xc1"
_ROW_AAD = b"edgewise-outbox-row/1\0"
_ROW_NONCE = 12


class EncryptionError(ValueError):
    """Sealed data that cannot be opened; the message says what happened (altered, truncated, reordered, wrong key)."""


@dataclass(frozen=True)
class SealedHeader:
    """A sealed file's header, parsed but not yet authenticated (see :func:`open_sealed`)."""

    chunk_size: int
    size: int
    nonce_prefix: bytes
    key_label: str
    context: str
    wrapped_key: bytes
    tag: bytes
    raw: bytes  # every header byte, tag included

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @property
    def sealed_size(self) -> int:
        """The length a complete sealed file has."""
        return len(self.raw) + self.size + TAG * self.chunks


def _key_aad(context: str) -> bytes:
    return _KEY_AAD + context.encode("utf-8")


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(4, "big")


def _chunk_aad(digest: bytes, index: int, final: bool) -> bytes:
    return digest + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _build_header(chunk_size: int, size: int, prefix: bytes, label: str, context: str, wrapped: bytes, aes: AESGCM) -> bytes:
    lab, ctx = label.encode("utf-8"), context.encode("utf-8")
    if len(lab) > 255 or len(ctx) > 65535 or len(wrapped) > 65535:
        raise EncryptionError("key label (max 255 bytes) or context (max 65535 bytes) too long")
    body = (
        _FIXED.pack(MAGIC, VERSION, 0, chunk_size, size, prefix)
        + bytes([len(lab)]) + lab
        + struct.pack(">H", len(ctx)) + ctx
        + struct.pack(">H", len(wrapped)) + wrapped
    )
    tag = aes.encrypt(_nonce(prefix, _HEADER_COUNTER), b"", _HEADER_AAD + body)
    return body + tag


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise EncryptionError(f"chunk size {chunk_size} must be between 1 and {MAX_CHUNK} bytes")


def seal_stream(
    src: BinaryIO, size: int, out: BinaryIO, *, keystore: Keystore, key_label: str, context: str, chunk_size: int = DEFAULT_CHUNK
) -> int:
    """Encrypt exactly ``size`` bytes read from ``src`` into ``out`` (streamed, one chunk in memory); return bytes written."""
    _check_chunk_size(chunk_size)
    data_key = AESGCM.generate_key(bit_length=256)
    aes = AESGCM(data_key)
    prefix = os.urandom(8)
    try:
        wrapped = keystore.wrap(key_label, data_key, _key_aad(context))
    except KeystoreError as exc:
        raise EncryptionError(f"cannot seal {context!r}: {exc}") from None
    header = _build_header(chunk_size, size, prefix, key_label, context, wrapped, aes)
    digest = hashlib.sha256(header).digest()
    out.write(header)
    written = len(header)
    n = max(1, -(-size // chunk_size))
    for i in range(n):
        want = min(chunk_size, size - i * chunk_size)
        block = src.read(want) if want else b""
        if len(block) != want:
            raise EncryptionError(f"cannot seal {context!r}: the source ended after {i * chunk_size + len(block)} of {size} bytes")
        ct = aes.encrypt(_nonce(prefix, i), block, _chunk_aad(digest, i, i == n - 1))
        out.write(ct)
        written += len(ct)
    return written


def seal_bytes(data: bytes, *, keystore: Keystore, key_label: str, context: str, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    """Seal ``data`` in memory (see the module docstring for the format)."""
    import io

    out = io.BytesIO()
    seal_stream(io.BytesIO(data), len(data), out, keystore=keystore, key_label=key_label, context=context, chunk_size=chunk_size)
    return out.getvalue()


def seal_file(
    src: Path | str, dest: Path | str, *, keystore: Keystore, key_label: str, context: str, chunk_size: int = DEFAULT_CHUNK
) -> None:
    """Encrypt the file ``src`` into ``dest`` durably (``dest.part``, fsync, rename, fsync dir), mode 0600."""
    src, dest = Path(src), Path(dest)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        with open(src, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                seal_stream(f, size, out, keystore=keystore, key_label=key_label, context=context, chunk_size=chunk_size)
                out.flush()
                os.fsync(out.fileno())
        os.replace(part, dest)
        fsync_dir(dest.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def is_sealed(data_or_path: bytes | Path | str) -> bool:
    """True when the bytes (or the file) start with the sealed-file magic."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path[: len(MAGIC)]) == MAGIC
    try:
        with open(data_or_path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def parse_header(data: bytes, *, name: str = "sealed data") -> SealedHeader:
    """Parse (not authenticate) the header at the start of ``data`` (which may hold more than the header)."""
    if len(data) < _FIXED.size or not data.startswith(MAGIC):
        raise EncryptionError(f"{name}: not an edgewise encrypted file (no {MAGIC.decode()} header)")
    magic, version, _flags, chunk_size, size, prefix = _FIXED.unpack_from(data, 0)
    if version != VERSION:
        raise EncryptionError(f"{name}: encrypted-file version {version} is not supported (this agent reads version {VERSION}); upgrade the agent")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise EncryptionError(f"{name}: header altered: chunk size {chunk_size} is out of range")
    pos = _FIXED.size
    try:
        n = data[pos]
        label = data[pos + 1 : pos + 1 + n].decode("utf-8")
        pos += 1 + n
        (n,) = struct.unpack_from(">H", data, pos)
        context = data[pos + 2 : pos + 2 + n].decode("utf-8")
        pos += 2 + n
        (n,) = struct.unpack_from(">H", data, pos)
        wrapped = bytes(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
        tag = bytes(data[pos : pos + TAG])
        pos += TAG
    except (IndexError, struct.error, UnicodeDecodeError):
        raise EncryptionError(f"{name}: the header is truncated or altered (cannot parse it)") from None
    if len(tag) != TAG or pos > len(data):
        raise EncryptionError(f"{name}: truncated inside the header ({len(data)} bytes)")
    return SealedHeader(chunk_size, size, prefix, label, context, wrapped, tag, bytes(data[:pos]))


def _unlock(hdr: SealedHeader, keystore: Keystore, context: str, name: str) -> AESGCM:
    if hdr.context != context:
        raise EncryptionError(
            f"{name}: sealed for {hdr.context!r}, not {context!r}: the file was moved from another device, slot or purpose"
        )
    try:
        data_key = keystore.unwrap(hdr.key_label, hdr.wrapped_key, _key_aad(context))
    except KeystoreError as exc:
        raise EncryptionError(
            f"{name}: wrong key: the storage key {hdr.key_label!r} in {keystore.url} cannot unwrap this file's data key "
            f"(the key was replaced or the file was sealed on another device, or the wrapped key was altered) [{exc}]"
        ) from None
    aes = AESGCM(data_key)
    body = hdr.raw[: -TAG]
    try:
        aes.decrypt(_nonce(hdr.nonce_prefix, _HEADER_COUNTER), hdr.tag, _HEADER_AAD + body)
    except InvalidTag:
        raise EncryptionError(f"{name}: header altered (its tag does not match; chunk size, size or nonce were changed)") from None
    return aes


def _diagnose_chunk(aes: AESGCM, hdr: SealedHeader, digest: bytes, index: int, chunk: bytes, name: str, offset: int) -> EncryptionError:
    """Chunk ``index`` failed: was it moved from another position, or altered?"""
    n = hdr.chunks
    for j in range(n):
        if j == index:
            continue
        try:
            aes.decrypt(_nonce(hdr.nonce_prefix, j), chunk, _chunk_aad(digest, j, j == n - 1))
        except InvalidTag:
            continue
        return EncryptionError(f"{name}: chunks reordered: chunk #{index} holds chunk #{j}'s data")
    if index == n - 1:
        try:
            aes.decrypt(_nonce(hdr.nonce_prefix, index), chunk, _chunk_aad(digest, index, False))
            return EncryptionError(f"{name}: truncated: chunk #{index} is not marked as the last one, chunks after it are missing")
        except InvalidTag:
            pass
    return EncryptionError(
        f"{name}: bit flip or tampering in chunk #{index} (0-based) of {n} (file bytes {offset}-{offset + len(chunk) - 1}) failed authentication: "
        "the data was altered"
    )


_LARGE = 4 << 20


def _plain_buffer(size: int) -> "bytearray | mmap.mmap":
    """Where plaintext goes: a bytearray, or for large data an anonymous private map (RAM, never a file).

    Faulting 50 MB of fresh memory in 4 KiB pages cost more than decrypting it (~20 ms of a ~26 ms decrypt
    into memory). The map is backed by transparent huge pages where the kernel offers them (``madvise``
    or ``always`` mode): 2 MiB pages, ~25 faults instead of ~12,800. Without THP the small pages are faulted
    in as chunks are decrypted, while the second core hashes the ones before (MAP_POPULATE up front was
    faster for a bare decrypt but serialised the faults before the hashing: 57 ms against 37 ms with the
    hash). Anonymous memory can be swapped like any other memory (see docs)."""
    import mmap

    if size < _LARGE or not hasattr(mmap, "MAP_ANONYMOUS"):
        return bytearray(size)
    if huge_pages_available():
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
            return m
        except OSError:  # the kernel refuses the advice: small pages
            m.close()
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


_THP: bool | None = None


def huge_pages_available() -> bool:
    """True when ``madvise(MADV_HUGEPAGE)`` gives anonymous memory 2 MiB pages (Linux THP not ``never``)."""
    global _THP
    if _THP is None:
        import mmap

        try:
            mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        except OSError:
            mode = "[never]"
        _THP = hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode
    return _THP


_CTYPES: tuple | None = None


def _bytes_api() -> tuple:
    """CPython's PyBytes_FromStringAndSize/PyBytes_AsString and libc's madvise, through ctypes (looked up once)."""
    global _CTYPES
    if _CTYPES is None:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
        addr = ctypes.pythonapi.PyBytes_AsString
        addr.restype, addr.argtypes = ctypes.c_void_p, [ctypes.py_object]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.restype, madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _CTYPES = (ctypes, new, addr, madvise)
    return _CTYPES


def copy_to_bytes(data: "bytes | bytearray | memoryview | mmap.mmap") -> bytes:
    """``bytes(data)``, with the 50 MB of a model copied into huge pages (~7 ms instead of ~29 ms).

    ONNX Runtime's Python API takes a model only as ``bytes``, and a ``bytes`` object owns its storage, so the
    model member of a decrypted bundle must be copied once. What makes that copy slow is not the copy but
    faulting in ~12,800 fresh 4 KiB pages; so for a large buffer the new, still unshared ``bytes`` object is
    made uninitialised (``PyBytes_FromStringAndSize(NULL, n)``, what C extensions do), its storage advised
    into transparent huge pages, then filled. Anything unusual (no THP, not CPython, no libc) falls back to
    ``bytes(data)``: same result, slower.
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    n = view.nbytes
    if n < _LARGE or not huge_pages_available() or not view.c_contiguous:
        return bytes(view)
    try:
        ctypes, new, addr_of, madvise = _bytes_api()
    except (AttributeError, OSError):  # not CPython, or no libc to ask
        return bytes(view)
    import mmap

    out = new(None, n)  # a fresh object: no one else can see it until we return it
    start = addr_of(out)
    page = 2 << 20
    lo, hi = (start + page - 1) & ~(page - 1), (start + n) & ~(page - 1)
    if hi > lo:
        madvise(lo, hi - lo, mmap.MADV_HUGEPAGE)  # advice only: a refusal just means small pages
    target = memoryview((ctypes.c_char * n).from_address(start)).cast("B")
    try:
        target[:] = view
    finally:
        target.release()
    return out


def _open_buffer(
    buf: memoryview, *, keystore: Keystore, context: str, name: str, digest_tail: int | None = None
) -> tuple[memoryview, "Future[hashlib._Hash] | None"]:
    """Decrypt sealed bytes in ``buf`` (bytes or a read-only mmap of the file: no copy of the ciphertext)."""
    total = len(buf)
    hdr = parse_header(bytes(buf[: _FIXED.size + 1 + 255 + 2 + 65535 + 2 + 65535 + TAG]), name=name)
    aes = _unlock(hdr, keystore, context, name)
    expected = hdr.sealed_size
    if total < expected:
        missing_from = total - len(hdr.raw)
        cut_chunk = max(0, missing_from) // (hdr.chunk_size + TAG)
        where = "at a chunk boundary" if missing_from % (hdr.chunk_size + TAG) == 0 else "inside a chunk"
        raise EncryptionError(
            f"{name}: truncated {where}: {total} of {expected} bytes; chunks from #{cut_chunk} (0-based) of {hdr.chunks} are missing or cut"
        )
    if total > expected:
        raise EncryptionError(f"{name}: {total - expected} unexpected bytes after the last chunk (data appended)")
    digest = hashlib.sha256(hdr.raw).digest()
    n = hdr.chunks
    out = _plain_buffer(hdr.size)  # decrypted in place: no per-chunk objects, no join
    view = memoryview(out)
    hasher = hashlib.sha256() if digest_tail is not None else None
    hash_end = max(0, hdr.size - (digest_tail or 0))
    pool = None
    if hasher is not None and hdr.size >= 4 * hdr.chunk_size:
        # sha256 releases the GIL: a second core hashes chunk i while the next ones are decrypted, and goes on
        # hashing after we return (the digest is a future) while the caller already parses and copies
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgewise-digest")
    done = False
    try:
        offset = len(hdr.raw)
        for i in range(n):
            start = i * hdr.chunk_size
            plain = min(hdr.chunk_size, hdr.size - start)
            chunk = buf[offset : offset + plain + TAG]
            try:
                aes.decrypt_into(_nonce(hdr.nonce_prefix, i), chunk, _chunk_aad(digest, i, i == n - 1), view[start : start + plain])
            except InvalidTag:
                raise _diagnose_chunk(aes, hdr, digest, i, bytes(chunk), name, offset) from None
            finally:
                chunk.release()
            if hasher is not None and start < hash_end:
                part = view[start : min(start + plain, hash_end)]
                if pool is not None:
                    pool.submit(hasher.update, part)  # one worker: updates run in order
                else:
                    hasher.update(part)
            offset += plain + TAG
        result: "Future[hashlib._Hash] | None" = None
        if hasher is not None:
            if pool is not None:
                result = pool.submit(lambda: hasher)
            else:
                result = Future()
                result.set_result(hasher)
        done = True
    finally:
        if pool is not None:
            pool.shutdown(wait=not done)  # on success the worker finishes the queued hashing by itself
    return memoryview(out), result


def open_sealed(source: bytes | Path | str, *, keystore: Keystore, context: str, name: str | None = None) -> memoryview:
    """Authenticate and decrypt sealed data (bytes or a file) into memory; raise :class:`EncryptionError` naming what failed.

    ``context`` must be the one the data was sealed with (device, slot, purpose): a
    file copied to another slot or device is refused even with the right key.
    Returns a memoryview of the plaintext (compares equal to bytes; ``bytes(...)`` copies it out); it was
    decrypted in place into one buffer, so a large model is not copied on the way.
    """
    return open_sealed_digest(source, keystore=keystore, context=context, name=name)[0]


def open_sealed_digest(
    source: bytes | Path | str, *, keystore: Keystore, context: str, name: str | None = None, digest_tail: int | None = None
) -> tuple[memoryview, "Future[hashlib._Hash] | None"]:
    """Like :func:`open_sealed`, plus the sha256 of every plaintext byte but the last ``digest_tail`` ones, computed
    while decrypting, on a second core: a signed bundle's signature covers exactly such a prefix. The digest is a
    future (``.result()`` waits for it), so the caller can parse and copy while the hash finishes."""
    import mmap

    if isinstance(source, (bytes, bytearray, memoryview)):
        with memoryview(source) as buf:
            return _open_buffer(buf, keystore=keystore, context=context, name=name or "sealed data", digest_tail=digest_tail)
    path = Path(source)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise EncryptionError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise EncryptionError(f"{path.name}: empty file: not an edgewise encrypted file")
        # the ciphertext is read where the page cache has it, its pages mapped in one call
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        try:
            with memoryview(mapped) as buf:
                return _open_buffer(buf, keystore=keystore, context=context, name=name or path.name, digest_tail=digest_tail)
        finally:
            mapped.close()


def iter_chunks(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of each chunk (tag included) in sealed ``data``: for tools and tests."""
    hdr = parse_header(data)
    pos = len(hdr.raw)
    for i in range(hdr.chunks):
        end = pos + min(hdr.chunk_size, hdr.size - i * hdr.chunk_size) + TAG
        yield pos, end
        pos = end


# -- outbox rows ----------------------------------------------------------------------------------


def _row_aad(device_id: str, seq: int) -> bytes:
    return _ROW_AAD + device_id.encode("utf-8") + b"\0" + seq.to_bytes(8, "big", signed=True)


def is_sealed_row(payload: bytes) -> bool:
    return payload[:1] == ROW_MARK


class RowSealer:
    """Seals outbox rows with one data key, each bound to (device id, sequence number).

    A row copied to another sequence number or another device's outbox, or
    altered in any bit, fails to open. Nonces are random (96 bits): fine for the
    ~2^32 rows one key may seal; a fresh outbox key comes with every new outbox.
    """

    def __init__(self, key: bytes, device_id: str, *, encrypt: bool = True) -> None:
        if len(key) != 32:
            raise EncryptionError("an outbox row key is 32 bytes (AES-256)")
        self._aes = AESGCM(key)
        self.device_id = device_id
        self.encrypt = encrypt  # False: open sealed rows still there, store new ones in plaintext

    def seal(self, seq: int, payload: bytes) -> bytes:
        nonce = os.urandom(_ROW_NONCE)
        return ROW_MARK + nonce + self._aes.encrypt(nonce, payload, _row_aad(self.device_id, seq))

    def open(self, seq: int, sealed: bytes) -> bytes:
        if not is_sealed_row(sealed) or len(sealed) < 1 + _ROW_NONCE + TAG:
            raise EncryptionError(f"outbox row seq {seq}: not a sealed row")
        try:
            return self._aes.decrypt(sealed[1 : 1 + _ROW_NONCE], sealed[1 + _ROW_NONCE :], _row_aad(self.device_id, seq))
        except InvalidTag:
            raise EncryptionError(
                f"outbox row seq {seq} of device {self.device_id!r} failed authentication: it was altered, swapped with "
                "another row (other sequence number or device), or sealed with another key"
            ) from None


def load_data_key(keystore: Keystore, key_label: str, path: Path, context: str) -> bytes:
    """The data key wrapped in ``path`` (created, wrapped and written 0600 on first use).

    A key that no longer unwraps (the storage key was replaced) is moved aside
    to ``<path>.unreadable-<UTC time>`` and a new one is made, so the caller keeps
    working; what the old key protected is lost, and the returned flag says so.
    """
    return load_or_replace_data_key(keystore, key_label, path, context)[0]


def load_or_replace_data_key(keystore: Keystore, key_label: str, path: Path, context: str) -> tuple[bytes, Path | None]:
    """Like :func:`load_data_key`; also returns where an unreadable old key was moved (None if none was)."""
    path = Path(path)
    aad = _key_aad(context)
    moved: Path | None = None
    if path.exists():
        try:
            return keystore.unwrap(key_label, path.read_bytes(), aad), None
        except KeystoreError as exc:
            moved = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(path, moved)
            import logging

            logging.getLogger("edgewise.security").critical(
                "%s cannot be unwrapped with storage key %r (%s); moved it to %s and made a new key: "
                "data sealed with the old key cannot be read", path, key_label, exc, moved.name,
            )
    key = AESGCM.generate_key(bit_length=256)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, keystore.wrap(key_label, key, aad), mode=0o600)
    return key, moved
