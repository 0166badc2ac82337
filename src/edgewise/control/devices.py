"""Device registry: register, find and list devices (plain functions over a session)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..protocol import ProtocolError, topics
from .db import insert_ignore
from .errors import DeviceNotFoundError, InvalidRequestError
from .models import Device
from .timeutil import utcnow

TAG_MAX = 64


def check_tags(tags: Iterable[str]) -> list[str]:
    """Tags are short labels (site, hardware class, ring); keep them unique and ordered."""
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip() or len(t) > TAG_MAX:
            raise InvalidRequestError(f"invalid tag {t!r}: use a non-empty string of at most {TAG_MAX} characters")
        t = t.strip()
        if t not in out:
            out.append(t)
    return out


def check_device_id(device_id: str) -> str:
    try:
        return topics.check_device_id(device_id)
    except ProtocolError as exc:
        raise InvalidRequestError(str(exc)) from None


def ensure_device(session: Session, device_id: str, tags: Iterable[str] = ()) -> tuple[Device, bool]:
    """Return the device, creating it if unknown; True when it was created just now.

    Creation is an insert-or-ignore so the API and the MQTT ingest thread can both
    meet a new device at the same moment without a duplicate-key error.
    """
    with session.no_autoflush:  # a lookup: pending changes (last_seen of this batch's devices) can wait for the commit
        known = session.get(Device, device_id)  # one primary-key read, or none when already in this session
    if known is not None:
        return known, False
    created = insert_ignore(
        session, Device.__table__, {"id": device_id, "tags": check_tags(tags), "registered_at": utcnow()}
    )
    device = session.get(Device, device_id, populate_existing=True)
    assert device is not None
    return device, created


def register_device(session: Session, device_id: str, tags: Iterable[str] = ()) -> tuple[Device, bool]:
    """Register a device (or replace the tags of a known one). Commits. True when created."""
    check_device_id(device_id)
    tags = check_tags(tags)
    device, created = ensure_device(session, device_id, tags)
    if not created:
        device.tags = tags
    session.commit()
    return device, created


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise DeviceNotFoundError(
            f"device {device_id!r} is not registered; register it (POST /api/v1/devices) or start its agent"
        )
    return device


def list_devices(session: Session, tag: str | None = None) -> list[Device]:
    devices = list(session.scalars(select(Device).order_by(Device.id)).all())
    if tag is not None:
        # Tags are a JSON list: filtered here, portable across SQLite and PostgreSQL.
        devices = [d for d in devices if tag in (d.tags or [])]
    return devices
