"""Request and response shapes of the REST API (the boundary; ORM rows never leave through it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .deployments import desired_state
from .ingest import IngestStats
from .models import Deployment, Device, EventRow, ModelVersion, SummaryRow, TelemetryRow
from .registry import bundle_url
from .telemetry import inference_rate


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- devices ---------------------------------------------------------------------------------------


class DeviceRegister(BaseModel):
    id: str = Field(description="Device id: 1-64 letters, digits, '.', '_' or '-'.", examples=["cam-042"])
    tags: list[str] = Field(default_factory=list, examples=[["site-a", "ring-canary"]])


class TelemetryOut(_Out):
    device_id: str
    seq: int
    ts: float = Field(description="Device wall clock, seconds since the epoch (may be skewed).")
    corrected_ts: float | None = Field(default=None, description="ts + the device's estimated clock offset at ingest.")
    received_at: datetime
    model: str | None
    version: str | None
    uptime_s: float
    inferences: int = Field(description="Cumulative since the agent started.")
    errors: int
    window_s: float
    window_inferences: int
    inference_rate: float | None = Field(description="Inferences per second over the last window.")
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    mem_percent: float | None
    outbox_pending: int | None
    dropped: int

    @classmethod
    def of(cls, row: TelemetryRow) -> "TelemetryOut":
        return cls.model_validate({**_columns(row), "inference_rate": inference_rate(row)})


class ArtifactOut(BaseModel):
    url: str
    sha256: str
    size: int


class DesiredOut(BaseModel):
    model: str | None
    version: str | None
    generation: int
    artifact: ArtifactOut | None
    rollback: bool = Field(default=False, description="The device may install this version below the highest it committed.")
    issued_at: float
    variant: str | None = Field(default=None, description="Variant of the version chosen for this device (issue 7).")


class DeviceOut(BaseModel):
    id: str
    tags: list[str]
    status: str = Field(description="registered (never heard from), online, offline, updating or degraded.")
    model: str | None = Field(description="Actual model, as the device reports it.")
    version: str | None = Field(description="Actual version, as the device reports it.")
    generation: int | None = Field(description="Desired generation the device reports it has converged to.")
    desired: DesiredOut | None
    in_sync: bool = Field(description="True when nothing is desired or the device runs the desired version.")
    agent_version: str | None
    hardware: dict[str, Any] | None
    api_url: str | None
    last_update: dict[str, Any] | None
    registered_at: datetime
    last_seen: datetime | None
    last_state_at: datetime | None
    inference_rate: float | None = Field(description="Inferences per second in the latest sample's window.")
    latency_p95_ms: float | None = Field(description="p95 latency of the latest sample.")
    telemetry: TelemetryOut | None = Field(description="Latest sample (highest seq), if any.")
    clock_offset_s: float | None = Field(
        default=None, description="Estimated server clock minus device clock, seconds (None before any telemetry or event).",
    )

    @classmethod
    def of(cls, d: Device, latest: TelemetryRow | None = None) -> "DeviceOut":
        ds = desired_state(d)
        desired = (
            DesiredOut(
                model=ds.model,
                version=ds.version,
                generation=ds.generation,
                artifact=ArtifactOut(**ds.artifact.model_dump()) if ds.artifact else None,
                rollback=ds.rollback,
                issued_at=ds.issued_at,
                variant=d.desired_variant,
            )
            if ds
            else None
        )
        return cls(
            id=d.id,
            tags=list(d.tags or []),
            status=d.status,
            model=d.model,
            version=d.version,
            generation=d.reported_generation,
            desired=desired,
            in_sync=ds is None or (d.model == ds.model and d.version == ds.version),
            agent_version=d.agent_version,
            hardware=d.hardware,
            api_url=d.api_url,
            last_update=d.last_update,
            registered_at=d.registered_at,
            last_seen=d.last_seen,
            last_state_at=d.last_state_at,
            inference_rate=inference_rate(latest) if latest is not None else None,
            latency_p95_ms=latest.latency_p95_ms if latest is not None else None,
            telemetry=TelemetryOut.of(latest) if latest is not None else None,
            clock_offset_s=d.clock_offset_s,
        )


class EventOut(_Out):
    device_id: str
    seq: int
    ts: float
    corrected_ts: float | None = None
    received_at: datetime
    kind: str
    severity: str
    message: str
    detail: dict[str, Any]


class SummaryOut(_Out):
    """One per-interval aggregate (bandwidth mode "summary")."""

    device_id: str
    seq: int
    ts: float
    corrected_ts: float | None = None
    received_at: datetime
    model: str | None
    version: str | None
    window_s: float
    inferences: int
    errors: int
    predictions: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    classes: dict[str, int] = Field(description="Predicted top-1 class -> count in the window.")
    confidence_bins: list[float]
    confidence_hist: list[int] = Field(description="Top-1 confidence counts per bin of confidence_bins.")


# -- models ----------------------------------------------------------------------------------------


class ModelVersionOut(BaseModel):
    name: str
    version: str
    variant: str = Field(default="default", description="Variant of this version (fp32, int8, ...; issue 7).")
    sha256: str
    size: int
    key_id: str = Field(description="Id of the key that signed the bundle.")
    uploaded_at: datetime
    url: str = Field(description="Download path relative to the control plane (what devices are sent).")
    download_url: str = Field(description="Absolute download URL under the server's public_url.")
    description: str = ""

    @classmethod
    def of(cls, mv: ModelVersion, public_url: str) -> "ModelVersionOut":
        url = bundle_url(mv.name, mv.version, mv.variant)
        return cls(
            name=mv.name,
            version=mv.version,
            variant=mv.variant,
            sha256=mv.sha256,
            size=mv.size,
            key_id=mv.key_id,
            uploaded_at=mv.uploaded_at,
            url=url,
            download_url=public_url + url,
            description=str((mv.manifest or {}).get("description", "")),
        )


class ModelVersionDetail(ModelVersionOut):
    manifest: dict[str, Any]

    @classmethod
    def of(cls, mv: ModelVersion, public_url: str) -> "ModelVersionDetail":
        return cls(**ModelVersionOut.of(mv, public_url).model_dump(), manifest=mv.manifest)


class ModelSummary(BaseModel):
    name: str
    versions: list[str] = Field(description="Oldest to newest by semantic-version precedence.")
    latest: str


# -- deployments -----------------------------------------------------------------------------------


class DeploymentCreate(BaseModel):
    model: str | None = Field(default=None, description="Model to run (with version); omit for an agent-only deployment.")
    version: str | None = None
    agent_version: str | None = Field(
        default=None, description="Agent release to run (uploaded with POST /api/v1/agent-releases); the desired model stays.",
    )
    device_id: str | None = Field(default=None, description="Target one device...")
    tag: str | None = Field(default=None, description="...or every device that has this tag now.")
    device_ids: list[str] | None = Field(default=None, description="...or exactly these devices (issue 7).")
    rollback: bool = Field(
        default=False,
        description="Deliberate downgrade: devices install this version even if it is lower than the highest they committed.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> "DeploymentCreate":
        if sum(t is not None for t in (self.device_id, self.tag, self.device_ids)) != 1:
            raise ValueError("give exactly one target: device_id, tag or device_ids")
        if (self.model is None) != (self.version is None) or (self.model is None and self.agent_version is None):
            raise ValueError("give a model and its version, an agent_version, or both")
        return self


class DeploymentOut(BaseModel):
    id: int
    model: str | None
    version: str | None
    agent_version: str | None = None
    target_kind: Literal["device", "tag", "devices"]
    target_value: str
    created_at: datetime
    device_count: int
    device_ids: list[str]
    variants: dict[str, str] = Field(default_factory=dict, description="Device id -> the model variant it was given.")
    generations: dict[str, int] | None = Field(
        default=None, description="New desired generation per device (in the response to POST only)."
    )

    @classmethod
    def of(cls, dep: Deployment, generations: dict[str, int] | None = None) -> "DeploymentOut":
        return cls.model_validate({**_columns(dep), "generations": generations})


# -- system ----------------------------------------------------------------------------------------


class IngestStatsOut(BaseModel):
    messages: int
    states: int
    telemetry_rows: int
    event_rows: int
    summary_rows: int = 0
    duplicates: int
    bad: int
    bad_by_reason: dict[str, int]
    errors: int
    republished: int

    @classmethod
    def of(cls, s: IngestStats) -> "IngestStatsOut":
        return cls.model_validate(s, from_attributes=True)


class StatsOut(BaseModel):
    ingest: IngestStatsOut = Field(description="Counters since this server process started.")
    devices: int
    model_versions: int
    stored: dict[str, int] = Field(description="Rows in the database: telemetry, events, summaries.")


class MqttStatus(BaseModel):
    broker_url: str
    embedded: bool
    connected: bool


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: Literal["ok", "error"]
    mqtt: MqttStatus
    public_url: str


def _columns(row: Any) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}
