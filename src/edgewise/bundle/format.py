"""The container: a plain ZIP (stored, not compressed) that any unzip tool can open,
with a fixed-size signature block as the archive comment, i.e. the last bytes of the file.

The Ed25519 signature covers sha256 of every byte before the block: the manifest
(which lists the sha256 of every member) and all of the archive's own structure,
so a flipped byte anywhere in the file fails verification. Members are stored
uncompressed with fixed timestamps, so the same inputs give the same file.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
from typing import BinaryIO

MAGIC = b"EWSIG1"
KEY_ID_LEN = 16
SIG_LEN = 64
BLOCK_LEN = len(MAGIC) + KEY_ID_LEN + SIG_LEN  # 86 bytes
DOMAIN = b"edgewise-bundle/1\n"  # domain separation: this key's signature means "a bundle"
EOCD_LEN = 22
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
CHUNK = 1 << 20


def zipinfo(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    zi.compress_type = zipfile.ZIP_STORED
    zi.external_attr = 0o644 << 16
    zi.create_system = 3
    return zi


def signed_message(prefix_sha256: bytes) -> bytes:
    return DOMAIN + prefix_sha256


def pack_block(key_id: str, signature: bytes) -> bytes:
    kid = key_id.encode("ascii")
    if len(kid) != KEY_ID_LEN or len(signature) != SIG_LEN:
        raise ValueError("signature block needs a 16-character key id and a 64-byte signature")
    return MAGIC + kid + signature


def unpack_block(block: bytes) -> tuple[str, bytes] | None:
    if len(block) != BLOCK_LEN or not block.startswith(MAGIC):
        return None
    kid = block[len(MAGIC) : len(MAGIC) + KEY_ID_LEN]
    try:
        kid_s = kid.decode("ascii")
    except UnicodeDecodeError:
        kid_s = kid.hex()
    return kid_s, block[len(MAGIC) + KEY_ID_LEN :]


def hash_prefix(f: BinaryIO, length: int) -> bytes:
    """sha256 of the first ``length`` bytes, streamed (models can be large)."""
    h = hashlib.sha256()
    f.seek(0)
    remaining = length
    while remaining:
        chunk = f.read(min(CHUNK, remaining))
        if not chunk:
            break
        h.update(chunk)
        remaining -= len(chunk)
    return h.digest()


def comment_length_field(f: BinaryIO, size: int) -> int:
    """The archive-comment length as written in the end-of-central-directory record."""
    f.seek(size - BLOCK_LEN - 2)
    return struct.unpack("<H", f.read(2))[0]
