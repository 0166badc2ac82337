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
    # The variant of desired_model/desired_version chosen for this device (migration 0009, issue 7 TARGET).
    desired_variant: Mapped[str | None] = mapped_column(String(64), default=None)
    desired_issued_at: Mapped[float | None] = mapped_column(Float, default=None)
    desired_rollback: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The agent release the device should run ({version, artifact, target}; migration 0006); None: leave it.
    desired_agent: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Sample capture for this device (migration 0008): False = off (privacy), True = allowed, None = its own config.
    desired_capture: Mapped[bool | None] = mapped_column(Boolean, default=None, nullable=True)
    # A candidate to run in shadow mode ({model, version, artifact, target, sample_every}; migration 0010, ROLLOUT).
    desired_shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None, nullable=True)
    # Models hosted besides the primary one ([ModelPlacement + variant, needed_mb]; migration 0012, HOST) and what the
    # agent last reported of them (DeviceState.hosted).
    desired_placements: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None, nullable=True)
    hosted: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None, nullable=True)
    # Telemetry privacy for this device (protocol TelemetryPrivacy as JSON; migration 0015, issue 8 FL2); None: off.
    desired_privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None, nullable=True)
    # Device clock time (DeviceState.ts) of the newest state applied (migration 0016): an older state delivered later
    # (several ingest workers share the stream) is not applied over it.
    last_state_ts: Mapped[float | None] = mapped_column(Float, default=None, nullable=True)
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
    # Several variants (fp32, int8, ...) of one name+version (migration 0009, issue 7 TARGET).
    __table_args__ = (UniqueConstraint("name", "version", "variant", name="uq_model_versions_name_version_variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(128))
    # The manifest's variant name; "default" for a bundle built without --variant-of.
    variant: Mapped[str] = mapped_column(String(64), default="default", server_default="default")
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
    # Device id -> the model variant it was given (migration 0009, issue 7 TARGET); {} for agent-only deployments.
    variants: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, server_default="{}")


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
    (kind, model, version, device_id) is open (``firing`` or ``acknowledged``) at a time: it is opened when the condition starts
    and ``resolved`` when it stops, so a condition that persists raises one alert, not one per check.
    No foreign key to ``devices``: the alert history outlives a deleted device.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    status: Mapped[str] = mapped_column(String(16), default="firing", index=True)  # firing | acknowledged | resolved
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    version: Mapped[str | None] = mapped_column(String(128), default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Alerting (migration 0011, issue 7 MONITOR): the rule that raised it (None: drift or the device itself), what it
    # is about ("device:d1", "group:canary", "fleet", "model:digits@1.0.0"), who acknowledged it, and the last status
    # the notifier sent out (differs from ``status`` while a webhook/log notification is due).
    rule_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    subject: Mapped[str | None] = mapped_column(String(160), default=None)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    acknowledged_by: Mapped[str | None] = mapped_column(String(160), default=None)
    notified_status: Mapped[str | None] = mapped_column(String(16), default=None)


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


# -- TARGET (issue 7): groups as saved device queries, per-device variant overrides; migration 0009 --


class Group(Base):
    """A saved device query (tags, ids, attribute conditions), evaluated whenever it is used.

    ``query`` is ``control.groups.GroupQuery`` as JSON; ``maintenance`` a list of UTC windows
    ``{"days": ["mon", ...], "start": "HH:MM", "end": "HH:MM"}`` (empty: any time);
    ``rate_limit_per_min`` caps how many devices a rollout starts per minute (None: no cap).
    """

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    query: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    maintenance: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    rate_limit_per_min: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VariantOverride(Base):
    """An operator's choice of variant for one model on one device, overriding the automatic choice."""

    __tablename__ = "variant_overrides"

    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(160), default=None)


# -- staged rollouts (part ROLLOUT, issue 7; migration 0010) ----------------------------------------


class RolloutRow(Base):
    """One staged rollout of ``model`` ``version``: its spec (waves, gates), its state, where it stands.

    Everything the engine needs lives here and in the three tables below, so a control plane that
    restarts mid-rollout picks up exactly where it stopped (see ``control.rollout_engine``).
    """

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    target_kind: Mapped[str] = mapped_column(String(16))  # "group" | "tag" | "devices"
    target_value: Mapped[str] = mapped_column(String(512))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(24), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str | None] = mapped_column(String(160), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class RolloutCohortRow(Base):
    """Where one hardware class (cohort) of a rollout stands: its current wave and phase, last figures."""

    __tablename__ = "rollout_cohorts"
    __table_args__ = (UniqueConstraint("rollout_id", "cohort", name="uq_rollout_cohorts_rollout_cohort"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    cohort: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer, default=0)
    # start | shadow | installing | soaking | waiting_approval | completed | halted | aborted
    phase: Mapped[str] = mapped_column(String(24), default="start")
    phase_started_at: Mapped[float] = mapped_column(Float, default=0.0)  # epoch seconds, server clock
    note: Mapped[str] = mapped_column(Text, default="")
    figures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RolloutDeviceRow(Base):
    """One device of a rollout: its wave and cohort, the version it ran before, and where its data starts.

    ``since_*_id`` are the highest telemetry/summary/event row ids when the device was started: its
    health "since it started the candidate" is every row above them (row ids, not clocks, so a skewed
    device clock or a restarted control plane cannot move the window). ``baseline`` holds the previous
    version's figures on this device (p95, confidence, error counters) measured at that moment.
    """

    __tablename__ = "rollout_devices"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer)
    cohort: Mapped[str] = mapped_column(String(64))
    # pending | shadow | started | reverted
    status: Mapped[str] = mapped_column(String(16), default="pending")
    previous_model: Mapped[str | None] = mapped_column(String(64), default=None)
    previous_version: Mapped[str | None] = mapped_column(String(128), default=None)
    shadow_at: Mapped[float | None] = mapped_column(Float, default=None)
    started_at: Mapped[float | None] = mapped_column(Float, default=None)
    reverted_at: Mapped[float | None] = mapped_column(Float, default=None)
    since_telemetry_id: Mapped[int] = mapped_column(BigInteger, default=0)
    since_summary_id: Mapped[int] = mapped_column(BigInteger, default=0)
    since_event_id: Mapped[int] = mapped_column(BigInteger, default=0)
    baseline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RolloutDecisionRow(Base):
    """One decision the engine (or an operator) took, with the figures that led to it."""

    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    wave: Mapped[int | None] = mapped_column(Integer, default=None)
    cohort: Mapped[str | None] = mapped_column(String(64), default=None)
    decision: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    figures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str | None] = mapped_column(String(160), default=None)


# -- MONITOR (issue 7): per-minute series rollups, alert rules, the rollup cursor (migration 0011) ----


class SeriesMinute(Base):
    """One device's health figures in one minute, summed so later records merge in without re-reading.

    Filled from raw telemetry and summaries by ``control.series.roll_up`` (kept ``rollup_retention``;
    raw rows only ``raw_retention``). ``minute`` is the start of the minute in epoch seconds on the
    device clock as corrected by the server. Averages are ``*_sum / *_n``; ``online`` is the link state
    the monitor sampled in that minute (1 online, 0 offline, None not sampled).
    """

    __tablename__ = "series_minutes"
    __table_args__ = (
        UniqueConstraint("device_id", "minute", name="uq_series_minutes_device_minute"),
        Index("ix_series_minutes_minute", "minute"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    minute: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(Integer, default=0)
    inferences: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    window_s: Mapped[float] = mapped_column(Float, default=0.0)
    latency_n: Mapped[int] = mapped_column(Integer, default=0)
    latency_p50_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p95_max: Mapped[float | None] = mapped_column(Float, default=None)
    cpu_n: Mapped[int] = mapped_column(Integer, default=0)
    cpu_sum: Mapped[float] = mapped_column(Float, default=0.0)
    mem_n: Mapped[int] = mapped_column(Integer, default=0)
    mem_sum: Mapped[float] = mapped_column(Float, default=0.0)
    rss_max: Mapped[int | None] = mapped_column(BigInteger, default=None)
    temperature_n: Mapped[int] = mapped_column(Integer, default=0)
    temperature_sum: Mapped[float] = mapped_column(Float, default=0.0)
    temperature_max: Mapped[float | None] = mapped_column(Float, default=None)
    drift_n: Mapped[int] = mapped_column(Integer, default=0)
    drift_sum: Mapped[float] = mapped_column(Float, default=0.0)
    drift_max: Mapped[float | None] = mapped_column(Float, default=None)
    outbox_max: Mapped[int | None] = mapped_column(Integer, default=None)
    dropped_max: Mapped[int | None] = mapped_column(BigInteger, default=None)
    shadow_compared: Mapped[int] = mapped_column(Integer, default=0)
    shadow_agreed: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    confidence_hist: Mapped[list[int]] = mapped_column(JSON, default=list)
    online: Mapped[int | None] = mapped_column(Integer, default=None)


class MonitorCursor(Base):
    """How far ``roll_up`` has read a raw table (its highest row id), so each record is rolled up once."""

    __tablename__ = "monitor_cursors"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AlertRule(Base):
    """A condition the monitor checks every tick (see ``control.alerts``).

    ``kind``: ``threshold`` (``metric op threshold`` on each device in scope, held for ``for_s``),
    ``fleet_offline`` (the offline fraction of the scope above ``threshold`` for ``for_s``) or
    ``absence`` (a device in scope not heard from for ``for_s``). Scope: ``device_id``, else
    ``group_name``, else ``tag``, else every device.
    """

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str | None] = mapped_column(String(32), default=None)
    op: Mapped[str | None] = mapped_column(String(2), default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    for_s: Mapped[float] = mapped_column(Float, default=0.0)
    group_name: Mapped[str | None] = mapped_column(String(64), default=None)
    tag: Mapped[str | None] = mapped_column(String(64), default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None)
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    webhook_url: Mapped[str | None] = mapped_column(String(1024), default=None)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# -- federated learning (issue 8, part FL-SYSTEM; migration 0013; control.fl) ------------------------------


class FLJob(Base):
    """A federated job: its spec (the JOB.toml, validated), where it is, the head it has learned so far.

    ``weights`` is an ``.npz`` of the current head (initializer name -> array); ``weights_version`` counts the
    aggregations applied (an update's ``base_version`` is measured against it for staleness); ``privacy`` holds the
    (q, z) of every released round so the accountant can be rebuilt after a restart."""

    __tablename__ = "fl_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(128))
    base_version: Mapped[str] = mapped_column(String(64))
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    weights_version: Mapped[int] = mapped_column(Integer, default=0)
    noise_multiplier: Mapped[float | None] = mapped_column(Float, default=None)
    privacy: Mapped[list[Any]] = mapped_column(JSON, default=list)
    epsilon: Mapped[float | None] = mapped_column(Float, default=None)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    base_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    result_version: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class FLRound(Base):
    """One round of a job: who was asked, when it closes, what came of it (state open | closed | skipped)."""

    __tablename__ = "fl_rounds"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_fl_rounds_job_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("fl_jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="open")
    cohort: Mapped[list[str]] = mapped_column(JSON, default=list)
    population: Mapped[int] = mapped_column(Integer, default=0)
    base_version: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    used: Mapped[int] = mapped_column(Integer, default=0)
    late: Mapped[int] = mapped_column(Integer, default=0)  # of ``used``: updates trained for an earlier round
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    clipped: Mapped[int] = mapped_column(Integer, default=0)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    epsilon: Mapped[float | None] = mapped_column(Float, default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class FLUpdateRow(Base):
    """Every update that arrived for a job, once per (job, device, round): accepted ones wait to be counted in a
    round (``counted_in``, set once: never counted twice), rejected and stale ones keep their reason."""

    __tablename__ = "fl_updates"
    __table_args__ = (UniqueConstraint("job_id", "device_id", "round", name="uq_fl_updates_job_device_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    device_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    base_version: Mapped[int] = mapped_column(Integer, default=0)
    num_samples: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    status: Mapped[str] = mapped_column(String(16), index=True)  # accepted | used | rejected | stale
    reason: Mapped[str] = mapped_column(Text, default="")
    counted_in: Mapped[int | None] = mapped_column(Integer, default=None)
    delta: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FLDeviceKey(Base):
    """The public key a device signs its updates with, pinned at its first signed update (``source`` first-use) or
    taken from its enrollment certificate (``certificate``)."""

    __tablename__ = "fl_device_keys"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    pinned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# -- issue 9, part SCALE: leases (one engines holder per fleet; see control/lease.py, docs/scale-out.md) ----------


class LeaseRow(Base):
    """Who runs a once-per-fleet job (``engines``, ``drift-judge``) until when. Taken and renewed by one conditional
    UPDATE (``WHERE holder = me OR expires_at < now``), so it works the same on SQLite and PostgreSQL."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
