"""Versioned message schemas: the only shapes that cross the wire.

Every message carries ``v`` (schema version) and ``type``. Readers ignore fields
they do not know, so a newer agent can talk to an older control plane and the
other way round; a message whose ``v`` is newer than :data:`SCHEMA_VERSION`
is refused with a :class:`ProtocolError` naming both versions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = SCHEMA_VERSION


class ArtifactRef(BaseModel):
    """Where a bundle can be fetched and what it must hash to.

    ``url`` may be relative to the control plane's base URL; mirrors and peers
    can serve the same bytes because the agent checks sha256 and the signature,
    never the server.
    """

    model_config = ConfigDict(extra="ignore")

    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class AgentReleaseRef(BaseModel):
    """The agent software a device should run: a signed agent release (``.ewr``; a TUF target with
    ``custom.kind = "agent-release"``). Optional in :class:`DesiredState`; older agents ignore it."""

    model_config = ConfigDict(extra="ignore")

    version: str
    artifact: ArtifactRef
    target: str | None = Field(default=None, description="The release's TUF target name (e.g. agent/edgewise-agent-0.2.0.ewr).")


class DesiredState(_Message):
    """Retained on ``devices/{id}/desired``: what the device should be running."""

    type: Literal["desired"] = "desired"
    device_id: str
    generation: int = Field(ge=0, description="Increases with every change; older ones are ignored.")
    model: str | None = None
    version: str | None = None
    artifact: ArtifactRef | None = None
    target: str | None = Field(
        default=None,
        description="The TUF target to install (e.g. digits/1.1.0.ewb); agents with a TUF root install only what the "
        "signed TUF metadata lists under this name. None from control planes older than TUF.",
    )
    config: dict[str, Any] = Field(default_factory=dict)
    agent: AgentReleaseRef | None = Field(default=None, description="Agent software release to run (None: leave the agent as it is).")
    rollback: bool = Field(
        default=False, description="Allow a version lower than the highest the device has committed (an operator's deliberate rollback).",
    )
    issued_at: float = 0.0


class UpdateResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    generation: int | None = None
    model: str | None = None
    version: str | None = None
    result: Literal["ok", "failed", "rolled_back"]
    reason: str | None = None
    at: float = 0.0


class HardwareInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    arch: str = ""
    cores: int = 0
    ram_mb: int = 0
    os: str = ""
    runtime: str = ""
    providers: list[str] = Field(default_factory=list)


class DeviceState(_Message):
    """Retained on ``devices/{id}/state``: what the device is actually running.

    The agent's MQTT last will is a copy with ``status="offline"``.
    """

    type: Literal["state"] = "state"
    device_id: str
    status: Literal["online", "offline", "updating", "degraded"] = "online"
    model: str | None = None
    version: str | None = None
    generation: int | None = Field(default=None, description="Desired generation the device has converged to.")
    last_update: UpdateResult | None = None
    agent_version: str = ""
    hardware: HardwareInfo | None = None
    tags: list[str] = Field(default_factory=list, description="Tags from the device's config; applied on first registration.")
    api_url: str | None = Field(default=None, description="The device's local API, for operators on the same host/LAN.")
    ts: float = 0.0


class Telemetry(_Message):
    """One periodic health sample; counters are cumulative so a lost sample loses no totals."""

    type: Literal["telemetry"] = "telemetry"
    device_id: str
    seq: int = Field(ge=0, description="Per-device sequence number; the server de-duplicates on it.")
    ts: float = Field(description="Device wall clock (may be skewed).")
    mono: float = Field(default=0.0, description="Device monotonic clock, seconds.")
    model: str | None = None
    version: str | None = None
    uptime_s: float = 0.0
    inferences: int = 0
    errors: int = 0
    window_s: float = 0.0
    window_inferences: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    mem_percent: float | None = None
    outbox_pending: int | None = None
    dropped: int = 0


class Event(_Message):
    """Something that happened once: an update result, a rejected message, an alert."""

    type: Literal["event"] = "event"
    device_id: str
    seq: int = Field(ge=0)
    ts: float
    mono: float = 0.0
    kind: str
    severity: Literal["debug", "info", "warning", "error", "critical"] = "info"
    message: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)


CONFIDENCE_BINS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Fixed edges of ``Summary.confidence_hist`` (10 bins; the last one is closed, so 1.0 falls in it)."""


class Summary(_Message):
    """One aggregate per telemetry interval (``bandwidth_mode = "summary"``) instead of the full sample.

    ``classes`` maps the predicted top-1 class index (as a string) to how many predictions
    chose it; ``confidence_hist`` counts the top-1 confidence in the bins
    ``confidence_bins``. Both add up to ``predictions`` (rows of the classifier output);
    ``inferences`` counts ``predict`` calls (equal to ``predictions`` for batch-1 inputs).
    """

    type: Literal["summary"] = "summary"
    device_id: str
    seq: int = Field(ge=0)
    ts: float = Field(description="Device wall clock at the end of the window (may be skewed).")
    mono: float = 0.0
    model: str | None = None
    version: str | None = None
    window_s: float = 0.0
    inferences: int = 0
    errors: int = 0
    predictions: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    classes: dict[str, int] = Field(default_factory=dict)
    confidence_bins: list[float] = Field(default_factory=lambda: list(CONFIDENCE_BINS))
    confidence_hist: list[int] = Field(default_factory=list)


Record = Annotated[Union[Telemetry, Event, Summary], Field(discriminator="type")]


class Batch(_Message):
    """Several outbox records in one publish (compressed with zstd when it pays)."""

    type: Literal["batch"] = "batch"
    device_id: str
    items: list[Record]


Message = Annotated[Union[DesiredState, DeviceState, Telemetry, Event, Summary, Batch], Field(discriminator="type")]

# Which message types may appear on which channel of a device topic.
CHANNEL_TYPES: dict[str, tuple[type[BaseModel], ...]] = {
    "desired": (DesiredState,),
    "state": (DeviceState,),
    "telemetry": (Batch, Telemetry, Summary),
    "events": (Batch, Event),
    "cmd": (),
}
