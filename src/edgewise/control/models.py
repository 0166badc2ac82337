"""The control plane's tables (SQLAlchemy 2.0 typed ORM).

Every schema change goes through an Alembic revision in ``migrations/versions``;
``tests/test_control_db.py`` checks that the migrations produce exactly these tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .timeutil import UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class Device(Base):
    """One device: what it reports it runs (actual) and what it should run (desired).

    ``desired_generation`` increases with every deployment to the device; the agent
    reports the generation it converged to as ``reported_generation``.
    """

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    hardware: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    agent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    # registered: known but never heard from; then whatever the device last said.
    status: Mapped[str] = mapped_column(String(16), default="registered")
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    reported_generation: Mapped[int | None] = mapped_column(Integer, default=None)
    desired_model: Mapped[str | None] = mapped_column(String(64), default=None)
    desired_version: Mapped[str | None] = mapped_column(String(128), default=None)
    desired_generation: Mapped[int] = mapped_column(Integer, default=0)
    desired_artifact: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    desired_issued_at: Mapped[float | None] = mapped_column(Float, default=None)
    desired_rollback: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_update: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    api_url: Mapped[str | None] = mapped_column(String(512), default=None)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_state_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Estimated server clock minus device clock, seconds (see ingest.update_clock_offset).
    clock_offset_s: Mapped[float | None] = mapped_column(Float, default=None)
    clock_offset_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class ModelVersion(Base):
    """An uploaded, verified bundle. Immutable: a name+version always means the same bytes."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(1024))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Deployment(Base):
    """A record of one "run this version there" decision and the devices it reached."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    target_kind: Mapped[str] = mapped_column(String(16))  # "device" | "tag"
    target_value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    device_count: Mapped[int] = mapped_column(Integer, default=0)
    # For a tag, the devices that had it at deployment time (later taggers are not included).
    device_ids: Mapped[list[str]] = mapped_column(JSON, default=list)


class TelemetryRow(Base):
    """One health sample. UNIQUE(device_id, seq) makes redelivery harmless."""

    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)  # device wall clock, may be skewed
    corrected_ts: Mapped[float | None] = mapped_column(Float, default=None)  # ts + the device's clock offset
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    uptime_s: Mapped[float] = mapped_column(Float, default=0.0)
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    window_inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    window_s: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    cpu_percent: Mapped[float | None] = mapped_column(Float, default=None)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    mem_percent: Mapped[float | None] = mapped_column(Float, default=None)
    outbox_pending: Mapped[int | None] = mapped_column(Integer, default=None)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)


class EventRow(Base):
    """Something that happened once on a device. UNIQUE(device_id, seq) as for telemetry."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_events_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)
    corrected_ts: Mapped[float | None] = mapped_column(Float, default=None)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SummaryRow(Base):
    """One per-interval aggregate from a device in summary bandwidth mode. UNIQUE(device_id, seq)."""

    __tablename__ = "summaries"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_summaries_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)
    corrected_ts: Mapped[float | None] = mapped_column(Float, default=None)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    window_s: Mapped[float] = mapped_column(Float, default=0.0)
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float, default=None)
    classes: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    confidence_bins: Mapped[list[float]] = mapped_column(JSON, default=list)
    confidence_hist: Mapped[list[int]] = mapped_column(JSON, default=list)


# -- provisioning (fleet CA, enrollment; migration 0004) -------------------------------------------


# -- access control (users, tokens, audit; migration 0005) -----------------------------------------
