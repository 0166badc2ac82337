"""Groups: saved device queries (tags, ids, attribute conditions) with maintenance windows.

A group stores a *query*, never a member list: :func:`resolve` evaluates it against the devices
as they are now, so a device that starts matching later (it was tagged, or it reported 2 GB of
RAM) joins every later rollout to the group without anyone editing the group.

Query (all parts AND; an empty query matches every device)::

    {"tags_all": ["site-a"], "tags_any": ["canary", "ring0"], "devices": ["d1", "d2"],
     "where": [{"field": "hardware.ram_mb", "op": ">=", "value": 1024},
               {"field": "hardware.providers", "op": "contains", "value": "CPUExecutionProvider"}]}

Maintenance windows are UTC, ``{"days": ["mon", "tue"], "start": "22:00", "end": "02:00"}``; a
window whose end is not after its start runs past midnight (``days`` name the day it starts on);
``days`` empty means every day. No windows: any time is maintenance time.

Example (the evaluation is a plain function, no database needed):

>>> from edgewise.control.models import Device
>>> q = GroupQuery.model_validate({"tags_all": ["lab"], "where": [{"field": "hardware.ram_mb", "op": ">=", "value": 512}]})
>>> matches(Device(id="d1", tags=["lab"], hardware={"ram_mb": 1024}, status="online"), q)
True
>>> matches(Device(id="d2", tags=["lab"], hardware={"ram_mb": 256}, status="online"), q)
False
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import ConflictError, InvalidRequestError, NotFoundError
from .models import Device, Group
from .timeutil import utcnow

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

# Fields a condition may test: a device column, or a key of the hardware the agent reports.
DEVICE_FIELDS = ("agent_version", "status", "model", "version")
HARDWARE_FIELDS = ("ram_mb", "arch", "hardware_class", "cores", "providers", "isa", "disk_mb", "os", "runtime",
                   "temperature_c")
FIELDS = DEVICE_FIELDS + tuple(f"hardware.{k}" for k in HARDWARE_FIELDS)

Field_ = Literal[
    "agent_version", "status", "model", "version",
    "hardware.ram_mb", "hardware.arch", "hardware.hardware_class", "hardware.cores", "hardware.providers",
    "hardware.isa", "hardware.disk_mb", "hardware.os", "hardware.runtime", "hardware.temperature_c",
]
Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "contains"]


class GroupNotFoundError(NotFoundError):
    pass


class Condition(BaseModel):
    """One attribute test. ``in``: the attribute is one of ``value`` (a list); ``contains``: the attribute
    (a list such as providers or isa, or a string) contains ``value``. A device that did not report the
    attribute fails every test except ``!=``."""

    model_config = ConfigDict(extra="forbid")

    field: Field_
    op: Op
    value: Any

    @model_validator(mode="after")
    def _value_fits_op(self) -> "Condition":
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError(f"op 'in' needs a list value, e.g. [\"x86_64\", \"aarch64\"]; got {self.value!r}")
        if self.op in ("<", "<=", ">", ">=") and (isinstance(self.value, bool) or not isinstance(self.value, (int, float, str))):
            raise ValueError(f"op {self.op!r} needs a number or a string value; got {self.value!r}")
        if self.op != "in" and isinstance(self.value, (list, dict)):
            raise ValueError(f"op {self.op!r} needs a single value, not {type(self.value).__name__}; use 'in' for a list")
        return self


class GroupQuery(BaseModel):
    """Which devices a group holds: every listed part must hold (AND); empty parts are ignored."""

    model_config = ConfigDict(extra="forbid")

    tags_all: list[str] = Field(default_factory=list, description="The device has every one of these tags.")
    tags_any: list[str] = Field(default_factory=list, description="The device has at least one of these tags.")
    devices: list[str] = Field(default_factory=list, description="The device's id is one of these.")
    where: list[Condition] = Field(default_factory=list, description="Attribute conditions (all must hold).")


class Window(BaseModel):
    """A weekly UTC maintenance window."""

    model_config = ConfigDict(extra="forbid")

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=list, description="Days the window starts on; empty = every day.")
    start: str = Field(description="HH:MM, UTC.")
    end: str = Field(description="HH:MM, UTC; not after start = the window runs past midnight.")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"time {v!r} must be HH:MM (00:00 to 23:59, UTC)")
        return v

    def minutes(self) -> tuple[int, int]:
        (h1, m1), (h2, m2) = (map(int, self.start.split(":")), map(int, self.end.split(":")))
        return h1 * 60 + m1, h2 * 60 + m2


class GroupSpec(BaseModel):
    """What an operator writes to create or replace a group (the body of POST/PUT /api/v1/groups)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 letters, digits, '.', '_' or '-'.")
    description: str = ""
    query: GroupQuery = Field(default_factory=GroupQuery)
    maintenance: list[Window] = Field(default_factory=list)
    rate_limit_per_min: int | None = Field(default=None, ge=1, description="Devices a rollout may start per minute.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"group name {v!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return v


# -- evaluation (plain functions) -------------------------------------------------------------------


def attribute(device: Device, field: str) -> Any:
    """The value a condition tests: a device column or a key of its reported hardware (None if unreported)."""
    if field.startswith("hardware."):
        return (device.hardware or {}).get(field.split(".", 1)[1])
    return getattr(device, field, None)


def _holds(actual: Any, op: str, value: Any) -> bool:
    if op == "!=":
        return actual != value
    if actual is None:
        return False
    if op == "==":
        return actual == value
    if op == "in":
        return actual in value
    if op == "contains":
        if isinstance(actual, (list, tuple)):
            return value in actual
        return isinstance(actual, str) and isinstance(value, str) and value in actual
    numeric = isinstance(actual, (int, float)) and not isinstance(actual, bool) and isinstance(value, (int, float))
    if not numeric and not (isinstance(actual, str) and isinstance(value, str)):
        return False  # a number against a string: not comparable, the device does not match
    return {"<": actual < value, "<=": actual <= value, ">": actual > value, ">=": actual >= value}[op]


def matches(device: Device, query: GroupQuery) -> bool:
    """Whether ``device`` belongs to a group with ``query`` now."""
    tags = set(device.tags or [])
    if query.tags_all and not set(query.tags_all) <= tags:
        return False
    if query.tags_any and not tags.intersection(query.tags_any):
        return False
    if query.devices and device.id not in query.devices:
        return False
    return all(_holds(attribute(device, c.field), c.op, c.value) for c in query.where)


def query_of(group: Group) -> GroupQuery:
    return GroupQuery.model_validate(group.query or {})


def select_devices(devices: Iterable[Device], query: GroupQuery) -> list[Device]:
    return [d for d in devices if matches(d, query)]


def windows_of(group: Group) -> list[Window]:
    return [Window.model_validate(w) for w in (group.maintenance or [])]


def _window_open(w: Window, now: datetime) -> bool:
    start, end = w.minutes()
    minute = now.hour * 60 + now.minute
    today, yesterday = DAYS[now.weekday()], DAYS[(now.weekday() - 1) % 7]
    days = set(w.days) or set(DAYS)
    if start < end:
        return today in days and start <= minute < end
    # Past midnight (or a full 24 h when start == end): open from start today, or until end after yesterday's start.
    return (today in days and minute >= start) or (yesterday in days and minute < end)


def in_window(group: Group, now: datetime) -> bool:
    """True when ``now`` is inside one of the group's maintenance windows (always, when it has none).

    ``now`` is converted to UTC; a naive datetime is taken as UTC.
    """
    windows = windows_of(group)
    if not windows:
        return True
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    return any(_window_open(w, now) for w in windows)


def next_window_start(group: Group, now: datetime) -> datetime | None:
    """When the next maintenance window opens (``now`` if one is open; None if the group has no windows).

    For a rollout that must wait: the minute-resolution scan over the coming week is cheap and exact.
    """
    if in_window(group, now):
        return now
    if not group.maintenance:
        return None
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    t = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(8 * 24 * 60):
        if in_window(group, t):
            return t
        t += timedelta(minutes=1)
    return None


# -- storage ----------------------------------------------------------------------------------------


def parse_spec(data: dict[str, Any]) -> GroupSpec:
    """A GroupSpec from plain JSON, or an InvalidRequestError naming each wrong part."""
    try:
        return GroupSpec.model_validate(data)
    except ValidationError as exc:
        parts = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'group'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(f"invalid group: {parts} (fields a condition may test: {', '.join(FIELDS)})") from None


def get_group(session: Session, name: str) -> Group:
    group = session.scalar(select(Group).where(Group.name == name))
    if group is None:
        known = [g.name for g in list_groups(session)]
        hint = f"known groups: {', '.join(known)}" if known else "create one: POST /api/v1/groups"
        raise GroupNotFoundError(f"no group named {name!r}; {hint}")
    return group


def list_groups(session: Session) -> list[Group]:
    return list(session.scalars(select(Group).order_by(Group.name)).all())


def create_group(session: Session, spec: GroupSpec) -> Group:
    """Store a new group. Commits; a taken name is a ConflictError."""
    if session.scalar(select(Group.id).where(Group.name == spec.name)) is not None:
        raise ConflictError(f"group {spec.name!r} exists; replace it with PUT /api/v1/groups/{spec.name}")
    now = utcnow()
    group = Group(name=spec.name, created_at=now, updated_at=now)
    _apply(group, spec)
    session.add(group)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"group {spec.name!r} exists; replace it with PUT /api/v1/groups/{spec.name}") from None
    return group


def update_group(session: Session, name: str, spec: GroupSpec) -> Group:
    """Replace a group's query, windows and rate limit (and its name, when the spec renames it). Commits."""
    group = get_group(session, name)
    if spec.name != name and session.scalar(select(Group.id).where(Group.name == spec.name)) is not None:
        raise ConflictError(f"cannot rename group {name!r} to {spec.name!r}: that name is taken")
    group.name = spec.name
    _apply(group, spec)
    group.updated_at = utcnow()
    session.commit()
    return group


def delete_group(session: Session, name: str) -> None:
    session.delete(get_group(session, name))
    session.commit()


def _apply(group: Group, spec: GroupSpec) -> None:
    group.description = spec.description
    group.query = spec.query.model_dump(mode="json", exclude_defaults=False)
    group.maintenance = [w.model_dump(mode="json") for w in spec.maintenance]
    group.rate_limit_per_min = spec.rate_limit_per_min


def resolve(session: Session, group_name: str) -> list[Device]:
    """The devices the group holds now, ordered by id (evaluated at every call: groups are dynamic)."""
    query = query_of(get_group(session, group_name))
    # JSON columns (tags, hardware) are filtered here, portable across SQLite and PostgreSQL; only the
    # device-id part narrows the SQL query.
    stmt = select(Device).order_by(Device.id)
    if query.devices:
        stmt = stmt.where(Device.id.in_(query.devices))
    return select_devices(session.scalars(stmt).all(), query)


__all__ = [
    "Condition", "FIELDS", "GroupNotFoundError", "GroupQuery", "GroupSpec", "Window", "attribute", "create_group",
    "delete_group", "get_group", "in_window", "list_groups", "matches", "next_window_start", "parse_spec", "query_of",
    "resolve", "select_devices", "update_group",
]
