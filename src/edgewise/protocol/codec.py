"""msgpack on the wire, zstd for payloads big enough to gain from it.

``decode`` never raises anything but :class:`ProtocolError`, whatever bytes it
is handed, so a hostile or corrupt payload costs a counter increment and a log
line on either side, never a crash.
"""

from __future__ import annotations

from typing import Any

import msgpack
import zstandard
from pydantic import TypeAdapter, ValidationError

from . import topics
from .errors import ProtocolError
from .messages import CHANNEL_TYPES, SCHEMA_VERSION, Message

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_PAYLOAD = 4 * 1024 * 1024  # decoded size limit: refuses decompression bombs
COMPRESS_ABOVE = 512  # bytes of msgpack below which zstd does not pay

_adapter: TypeAdapter[Any] = TypeAdapter(Message)
_zc = zstandard.ZstdCompressor(level=3)


def encode(msg: Any, *, compress: bool | None = None) -> bytes:
    """Encode a message; ``compress=None`` compresses only when it is worth it."""
    raw = msgpack.packb(msg.model_dump(mode="json", exclude_none=False), use_bin_type=True)
    if compress is None:
        compress = len(raw) > COMPRESS_ABOVE
    if compress:
        packed = _zc.compress(raw)
        if len(packed) < len(raw):
            return packed
    return raw


def decode(payload: bytes) -> Any:
    """Decode and validate one payload into a message model."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if not payload:
        raise ProtocolError("empty payload")
    if payload[:4] == ZSTD_MAGIC:
        try:
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_PAYLOAD)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"zstd frame does not decompress: {exc}") from None
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit", reason="too_large")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"payload is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"payload must be a map, got {type(obj).__name__}")
    v = obj.get("v", SCHEMA_VERSION)
    if not isinstance(v, int) or v > SCHEMA_VERSION:
        raise ProtocolError(f"schema version {v!r} is newer than this side understands ({SCHEMA_VERSION}); upgrade", reason="newer_schema")
    try:
        return _adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise ProtocolError(
            f"invalid {obj.get('type', 'message')!r} message: {where}: {first.get('msg')}", reason="invalid_fields"
        ) from None


def decode_for_topic(topic: str, payload: bytes) -> tuple[topics.Topic, Any]:
    """Decode a payload and check that it belongs on ``topic``.

    A message naming another device than its topic is refused: a device can
    speak only for itself (the broker's ACL enforces the topic; this enforces
    the body).
    """
    t = topics.parse(topic)
    msg = decode(payload)
    allowed = CHANNEL_TYPES.get(t.channel, ())
    if not isinstance(msg, allowed):
        raise ProtocolError(f"topic {topic!r}: a {msg.type!r} message does not belong on channel {t.channel!r}", reason="wrong_channel")
    if getattr(msg, "device_id", t.device_id) != t.device_id:
        raise ProtocolError(f"topic {topic!r}: message claims device {msg.device_id!r}", reason="device_mismatch")
    items = getattr(msg, "items", None)
    if items is not None and any(i.device_id != t.device_id for i in items):
        raise ProtocolError(f"topic {topic!r}: batch holds records of another device", reason="device_mismatch")
    return t, msg
