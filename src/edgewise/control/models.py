"""The control plane's tables (SQLAlchemy 2.0 typed ORM).

Every schema change goes through an Alembic revision in ``migrations/versions``;
``tests/test_control_db.py`` checks that the migrations produce exactly these tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, false
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
    # The agent release the device should run ({version, artifact, target}; migration 0006); None: leave it.
    desired_agent: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Sample capture for this device (migration 0008): False = off (privacy), True = allowed, None = its own config.
    desired_capture: Mapped[bool | None] = mapped_column(Boolean, default=None, nullable=True)
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
    model: Mapped[str | None] = mapped_column(String(64))  # None: an agent-only deployment (0006)
    version: Mapped[str | None] = mapped_column(String(128))
    agent_version: Mapped[str | None] = mapped_column(String(64), default=None)  # agent release deployed (0006)
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
    # Model health (migration 0011, issue 7): drift score, temperature, shadow-mode comparison in the window.
    drift_score: Mapped[float | None] = mapped_column(Float, default=None)
    temperature_c: Mapped[float | None] = mapped_column(Float, default=None)
    shadow_version: Mapped[str | None] = mapped_column(String(128), default=None)
    shadow_compared: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_agreed: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_errors: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    shadow_committed_latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)


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
    # Model health (migration 0011, issue 7): drift score, temperature, shadow-mode comparison in the window.
    drift_score: Mapped[float | None] = mapped_column(Float, default=None)
    temperature_c: Mapped[float | None] = mapped_column(Float, default=None)
    shadow_version: Mapped[str | None] = mapped_column(String(128), default=None)
    shadow_compared: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_agreed: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_errors: Mapped[int | None] = mapped_column(Integer, default=None)
    shadow_latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    shadow_committed_latency_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)


# -- provisioning (fleet CA, enrollment; migration 0004) -------------------------------------------


class EnrollmentToken(Base):
    """A single-use, expiring secret an operator hands to one device so it can obtain its certificate.

    Only the sha256 of the token is stored (256-bit random). ``tags`` are given to the device that
    uses it; ``device_id``, when set, is the only id that may enroll with it.
    """

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(160), default=None)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    used_by: Mapped[str | None] = mapped_column(String(64), default=None)


class DeviceCertificate(Base):
    """Every client certificate the fleet CA issued (serial in hex), and whether it is revoked.

    No foreign key to ``devices``: a revoked certificate must stay on the CRL even after its
    device row is deleted.
    """

    __tablename__ = "device_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoke_reason: Mapped[str | None] = mapped_column(String(256), default=None)


# -- access control (users, tokens, audit; migration 0005) -----------------------------------------


class User(Base):
    """A person (or script owner) who signs in. ``role`` is admin, operator or viewer (see ``auth.ROLES``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, PHC string
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token: an API token or a dashboard session of a user, or a device token.

    Only the sha256 of the token is stored (tokens are 256-bit random, so a fast hash is enough);
    ``prefix`` (its first characters) lets people tell tokens apart in listings.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))  # "api" | "session" | "device"
    name: Mapped[str] = mapped_column(String(128), default="")
    user_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("users.id", ondelete="CASCADE"), default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class AuditEntry(Base):
    """One change or sign-in: who (actor), what (action, target, status), when (at), from where (remote)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(160))  # "user:alice", "token:ci (user:alice)", "device:d1", "anonymous"
    role: Mapped[str | None] = mapped_column(String(16), default=None)
    action: Mapped[str] = mapped_column(String(64))  # "POST /api/v1/deployments", "login", "login.failed", ...
    target: Mapped[str] = mapped_column(String(512), default="")
    status: Mapped[int] = mapped_column(Integer, default=0)
    remote: Mapped[str | None] = mapped_column(String(64), default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


# -- agent releases distributed by the control plane (migration 0006) -------------------------------


class AgentRelease(Base):
    """An uploaded, verified signed agent release (``.ewr``). Immutable: a version always means the same bytes."""

    __tablename__ = "agent_releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the bundles directory
    target: Mapped[str] = mapped_column(String(256))  # its TUF target name: agent/edgewise-agent-<version>.ewr
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)  # release.json without its file list
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# -- fleet drift (drift sketches merged per device per hour, alerts; migration 0007) ------------------


class DriftSketchRow(Base):
    """The drift sketches one device sent in one hour for one model version, added together.

    Sketches are counts, so adding them at ingest loses nothing the fleet comparison needs while
    keeping one row per device per hour (not one per telemetry interval). ``hour`` is the start of
    the hour (epoch seconds, on the server's estimate of the device clock); ``reference`` is the
    sketch's reference fingerprint ("" when the agent sent none). Only newly stored records are
    added, so a redelivered Summary or Telemetry is not counted twice.
    """

    __tablename__ = "drift_sketches"
    __table_args__ = (
        UniqueConstraint("device_id", "model", "version", "reference", "hour", name="uq_drift_sketches_bucket"),
        Index("ix_drift_sketches_model_version_hour", "model", "version", "hour"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    reference: Mapped[str] = mapped_column(String(64), default="")
    hour: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    sketches: Mapped[int] = mapped_column(Integer, default=0)  # how many device sketches were added
    window_start: Mapped[float] = mapped_column(Float, default=0.0)
    window_end: Mapped[float] = mapped_column(Float, default=0.0)
    features: Mapped[dict[str, list[int]]] = mapped_column(JSON, default=dict)
    missing: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    confidence_bins: Mapped[list[float]] = mapped_column(JSON, default=list)
    confidence_hist: Mapped[list[int]] = mapped_column(JSON, default=list)
    classes: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AlertRow(Base):
    """A condition the control plane noticed (the minimal alert store; issue 7 builds alerting on it).

    ``kind`` names the condition ("drift.peer_outlier", "drift.fleet_shift"); at most one alert per
    (kind, model, version, device_id) is ``open`` at a time: it is opened when the condition starts
    and ``resolved`` when it stops, so a condition that persists raises one alert, not one per check.
    No foreign key to ``devices``: the alert history outlives a deleted device.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)  # "open" | "resolved"
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


# -- captured samples for retraining (agent.capture; migration 0008) --------------------------------


class SampleRow(Base):
    """One input a device served and captured (low confidence, drift window, random), for retraining.

    UNIQUE(device_id, seq) as for telemetry: a redelivered sample is stored once. ``inputs`` lists
    each input's name, dtype and shape; ``data`` is their C-order little-endian bytes concatenated
    in that order (``control.samples.arrays_of`` splits them back).
    """

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_samples_device_seq"),
        Index("ix_samples_model_version", "model", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)  # device wall clock when the prediction was served
    corrected_ts: Mapped[float | None] = mapped_column(Float, default=None)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    reason: Mapped[str] = mapped_column(String(32))
    top1: Mapped[int | None] = mapped_column(Integer, default=None)
    confidence: Mapped[float | None] = mapped_column(Float, default=None)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
