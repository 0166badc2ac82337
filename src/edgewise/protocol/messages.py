"""Versioned message schemas: the only shapes that cross the wire.

Every message carries ``v`` (schema version) and ``type``. Readers ignore fields
they do not know, so a newer agent can talk to an older control plane and the
other way round; a message whose ``v`` is newer than :data:`SCHEMA_VERSION`
is refused with a :class:`ProtocolError` naming both versions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class ShadowTarget(BaseModel):
    """The candidate a device runs in shadow mode: fetched and verified like any update, never served."""

    model_config = ConfigDict(extra="ignore")

    model: str
    version: str
    artifact: ArtifactRef
    target: str | None = Field(default=None, description="The candidate's TUF target name (as DesiredState.target).")
    sample_every: int = Field(default=1, ge=1, description="Run the candidate on every n-th served input (1: all).")


class ShadowStats(BaseModel):
    """What shadow mode saw since the previous telemetry sample (counts, so windows add up)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    version: str
    compared: int = Field(default=0, ge=0, description="Inputs both models answered.")
    agreed: int = Field(default=0, ge=0, description="Of those, how many had the same top-1 class (or outputs within tolerance).")
    errors: int = Field(default=0, ge=0, description="Inputs on which the candidate raised.")
    skipped: int = Field(default=0, ge=0, description="Sampled inputs not compared because the candidate's queue was full (serving never waits).")
    latency_p95_ms: float | None = Field(default=None, description="Candidate's p95 latency in the window.")
    committed_latency_p95_ms: float | None = Field(default=None, description="Committed model's p95 latency on the same inputs.")


class ModelPlacement(BaseModel):
    """A model the device hosts beside its primary one (issue 7, orchestration), with the resources it may use.

    The agent serves each placed model in its own worker with ``threads`` intra-op threads and an address-space
    limit of ``memory_mb``, so one model cannot starve another."""

    model_config = ConfigDict(extra="ignore")

    model: str
    version: str
    artifact: ArtifactRef
    target: str | None = None
    threads: int = Field(default=1, ge=1)
    memory_mb: int = Field(default=256, ge=16)


class HostedModel(BaseModel):
    """What the agent reports of each placed model it hosts (in DeviceState.hosted)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    version: str | None = None
    status: Literal["starting", "serving", "failed", "stopped"] = "starting"
    reason: str | None = None
    threads: int = 1
    memory_mb: int = 0
    rss_mb: float | None = None


class TelemetryPrivacy(BaseModel):
    """How a device privatizes the telemetry aggregates that could identify a user (class and confidence histograms
    of Summary and of the drift sketch) before they leave it: local differential privacy with ``edgewise.learn.dp``'s
    mechanisms and a per-device budget per UTC day (issue 8 FL2; docs/learn.md "Privacy of telemetry")."""

    model_config = ConfigDict(extra="ignore")

    mechanism: Literal["laplace", "gaussian", "randomized_response"] = Field(
        description="laplace: Laplace noise on every bin (ε-DP); gaussian: Gaussian noise ((ε, δ)-DP, needs ε < 1); "
        "randomized_response: every counted prediction's class/bin is randomized (ε-local-DP per prediction).",
    )
    epsilon_per_report: float = Field(gt=0, description="ε one report (one Summary or Telemetry record) spends, split over its histograms.")
    budget_per_day: float = Field(gt=0, description="ε a device may spend per UTC day; when spent, the histograms are left out, never sent raw.")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="δ of one report (gaussian only).")

    @model_validator(mode="after")
    def _fits(self) -> "TelemetryPrivacy":
        if self.epsilon_per_report > self.budget_per_day:
            raise ValueError(f"epsilon_per_report ({self.epsilon_per_report}) is over budget_per_day ({self.budget_per_day}): "
                             "no report could ever be sent; lower epsilon_per_report or raise the daily budget")
        if self.mechanism == "gaussian" and self.epsilon_per_report >= 1:
            raise ValueError("the gaussian mechanism (classic calibration) needs epsilon_per_report < 1; use laplace for larger ε")
        return self


class ReportPrivacy(BaseModel):
    """What a device did to the histograms of one Summary/Telemetry record (None on the record: sent as counted)."""

    model_config = ConfigDict(extra="ignore")

    mechanism: str
    epsilon: float = Field(default=0.0, ge=0, description="ε this record spent (0: left out, or nothing to privatize).")
    delta: float = 0.0
    histograms: int = Field(default=0, ge=0, description="How many histograms the ε was split over.")
    num_classes: int | None = Field(default=None, description="Class domain used (randomized_response: k, to unbias on the server).")
    left_out: bool = Field(default=False, description="True: the day's budget was spent, the histograms were left out (empty).")


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
    capture: bool | None = Field(
        default=None,
        description="Sample capture for this device's group: False switches it off (privacy), True allows it where the "
        "device's own config enables it, None leaves the device's config alone. Older agents ignore it.",
    )
    shadow: ShadowTarget | None = Field(
        default=None,
        description="A candidate model to run beside the committed one on live inputs without serving its answers "
        "(shadow mode, issue 7); the agent reports agreement in Telemetry.shadow. None: no shadow. Older agents ignore it.",
    )
    placements: list[ModelPlacement] = Field(
        default_factory=list, description="Models to host besides the primary one (issue 7). Older agents ignore it.",
    )
    peers: list[str] = Field(
        default_factory=list, max_length=16,
        description="Base URLs of nearby devices that reported holding the artifact (peer distribution, issue 9): the agent "
        "may fetch it from them first; the signed target still decides what is installed. Older agents ignore it.",
    )
    privacy: TelemetryPrivacy | None = Field(
        default=None, description="Privatize telemetry histograms on the device (issue 8 FL2); None: sent as counted. Older agents ignore it.",
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
    # Capabilities for variant assignment and placement (issue 7); older agents send none of these.
    hardware_class: str | None = Field(default=None, description="Profile name the device declares (e.g. rpi4), from its config.")
    isa: list[str] = Field(default_factory=list, description="CPU ISA features (e.g. avx2, avx512_vnni, neon, asimddp).")
    disk_mb: int = 0
    temperature_c: float | None = None


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
    hosted: list[HostedModel] = Field(default_factory=list, description="Placed models besides the primary one, and how each is doing.")
    peer_url: str | None = Field(default=None, description="Where this device serves verified bundles to its peers (None: it does not).")
    holds: list[str] = Field(
        default_factory=list, max_length=64, description="sha256 of the verified bundles this device serves at peer_url (issue 9).",
    )
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
    sketch: DriftSketch | None = Field(default=None, description="Drift counts since the previous telemetry sample (None: none).")
    drift_score: float | None = Field(
        default=None, ge=0, description="Largest on-device drift score since the previous sample (1 = a detector's threshold; None: no reference statistics).",
    )
    shadow: ShadowStats | None = Field(default=None, description="Shadow-mode comparison in this window (None: no shadow candidate).")
    temperature_c: float | None = Field(default=None, description="SoC temperature where the device exposes one.")
    repairs: dict[str, int] = Field(
        default_factory=dict,
        description="Input values repaired by the bundle's preprocessing, cumulative since the agent started, by "
        "'<step>/<feature>' (e.g. 'impute/3': NaNs filled in feature 3). Older agents send none.",
    )
    privacy: ReportPrivacy | None = Field(
        default=None, description="The sketch's class and confidence histograms were privatized on the device (issue 8 FL2); None: as counted.",
    )


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


class DriftSketch(BaseModel):
    """Mergeable counts of what a device saw in one window, on the bundle's reference bins.

    The bin edges are the ones frozen into the bundle's reference statistics, so a device
    sends only counts and the control plane can add sketches from many windows and many
    devices (per model version) and compare them with the reference, without raw data ever
    leaving the device. Adding two sketches is adding their counts (associative, commutative).

    ``features`` maps a feature name (``feature_names`` of the bundle's reference statistics) to one
    count per reference bin of that feature: ``len(cuts) + 1`` bins, value ``x`` in bin ``k`` = the
    number of cut points ``<= x`` (so every finite value is counted). Values that are not finite
    are counted in ``missing`` instead. ``confidence_hist`` counts the
    top-1 confidence on ``confidence_bins``; ``classes`` maps the predicted top-1 class index
    (as a string) to its count. ``n`` is the number of samples (rows) the sketch covers.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="Model whose reference bins the counts use.")
    version: str | None = Field(default=None, description="Model version whose reference bins the counts use.")
    reference: str | None = Field(
        default=None, description="Fingerprint of the reference statistics (edges) used; sketches with different ones never merge.",
    )
    window_start: float = Field(default=0.0, description="Device wall clock at the first sample in the window.")
    window_end: float = Field(default=0.0, description="Device wall clock at the end of the window.")
    n: int = Field(default=0, ge=0, description="Samples (rows) counted.")
    features: dict[str, list[Annotated[int, Field(ge=0)]]] = Field(default_factory=dict)
    missing: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    confidence_bins: list[float] = Field(default_factory=lambda: list(CONFIDENCE_BINS))
    confidence_hist: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    classes: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


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
    sketch: DriftSketch | None = Field(default=None, description="Drift counts for this window (None: the agent has no reference statistics).")
    drift_score: float | None = Field(
        default=None, ge=0, description="Largest on-device drift score in this window (1 = a detector's threshold; None: no reference statistics).",
    )
    shadow: ShadowStats | None = Field(default=None, description="Shadow-mode comparison in this window (None: no shadow candidate).")
    temperature_c: float | None = Field(default=None, description="SoC temperature where the device exposes one.")
    repairs: dict[str, int] = Field(
        default_factory=dict, description="Input values repaired by the bundle's preprocessing in this window, by '<step>/<feature>'.",
    )
    privacy: ReportPrivacy | None = Field(
        default=None, description="classes/confidence_hist (and the sketch's) were privatized on the device (issue 8 FL2); None: as counted.",
    )


SAMPLE_REASONS = ("low_confidence", "drift", "random")
"""Why a sample was captured (``Sample.reason``)."""


class SampleArray(BaseModel):
    """One input array of a captured sample, exactly as the model got it: dtype, shape and raw bytes.

    ``data`` is the array's C-order bytes (little-endian), base64-encoded so the record survives the
    outbox's JSON-mode dump; ``numpy.frombuffer(base64.b64decode(data), dtype).reshape(shape)`` restores it.
    """

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=256)
    dtype: str = Field(max_length=16, description="numpy dtype string, e.g. float32, int64, uint8.")
    shape: list[Annotated[int, Field(ge=0)]]
    data: str = Field(description="base64 of the C-order array bytes.")

    @classmethod
    def of(cls, name: str, array: Any) -> "SampleArray":
        """Encode a numpy array (any numeric dtype, any shape) losslessly."""
        import base64

        import numpy as np

        a = np.asarray(array)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # (keeps 0-d arrays 0-d only when they are contiguous already, as they are)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        return cls(name=name, dtype=a.dtype.name, shape=list(a.shape), data=base64.b64encode(a.tobytes()).decode("ascii"))

    def array(self) -> Any:
        """The numpy array back (a fresh, writable copy); ValueError naming the input if the bytes do not fit."""
        import base64

        import numpy as np

        try:
            dtype = np.dtype(self.dtype)
            raw = base64.b64decode(self.data, validate=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample input {self.name!r}: cannot decode ({exc})") from None
        if dtype.hasobject:
            raise ValueError(f"sample input {self.name!r}: dtype {self.dtype!r} is not a numeric array type")
        expected = dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        if len(raw) != expected:
            raise ValueError(
                f"sample input {self.name!r}: {len(raw)} bytes do not make a {self.dtype} array of shape {self.shape} "
                f"({expected} bytes expected)"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(tuple(self.shape)).astype(dtype, copy=True)


class Sample(_Message):
    """An input the device served, captured for retraining (``capture`` policies; docs/data-capture.md).

    Sent on the telemetry channel at the outbox's lowest priority (``sample``); the control plane
    stores it per model version and device, de-duplicated on (device_id, seq).
    """

    type: Literal["sample"] = "sample"
    device_id: str
    seq: int = Field(ge=0, description="Per-device sequence number (the outbox's); the server de-duplicates on it.")
    ts: float = Field(description="Device wall clock when the prediction was served (may be skewed).")
    mono: float = 0.0
    model: str | None = None
    version: str | None = None
    reason: Literal["low_confidence", "drift", "random"]
    top1: int | None = Field(default=None, description="Predicted class index (None: the model has no class output).")
    confidence: float | None = Field(default=None, description="Top-1 score of the prediction.")
    inputs: list[SampleArray] = Field(min_length=1)




class Command(_Message):
    """A one-off instruction on ``devices/{id}/cmd/{name}`` (QoS 1, not retained): things an operator asks a device to
    do now rather than a state to converge to. The agent answers with an Event of kind ``command.result`` carrying
    ``id``; a command past ``expires_at`` (device wall clock) is dropped with a result saying so."""

    type: Literal["command"] = "command"
    device_id: str
    id: str = Field(min_length=1, max_length=64, description="Chosen by the sender; echoed in the command.result event.")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$", description="adapt | drift.reset | fl.train")
    args: dict[str, Any] = Field(default_factory=dict)
    issued_at: float = 0.0
    expires_at: float | None = None


COMMANDS = ("adapt", "drift.reset", "fl.train")


# -- federated learning (issue 8, part FL-SYSTEM; docs/learn.md) -------------------------------------------

FL_SIGNING_CONTEXT = b"edgewise-fl-update/1\x00"


class FLRecipe(BaseModel):
    """Local training a device runs for one round (mirrors ``edgewise.learn.local.Recipe``)."""

    model_config = ConfigDict(extra="ignore")

    epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=0.1, gt=0, le=10)
    mu: float = Field(default=0.0, ge=0, description="FedProx proximal term; 0 is FedAvg.")
    layers: Literal["head", "all"] = "head"


class FLTask(BaseModel):
    """The ``args`` of a ``fl.train`` :class:`Command`: train the live model's head, starting from ``tensors`` (the
    server's current head: the last linear layer's weight and bias initializers, by name), on the device's locally
    captured samples; answer with an :class:`FLUpdate` through the outbox (a device offline now delivers later)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    model: str
    version: str = Field(description="The base model version the device must be running.")
    base_version: int = Field(ge=0, description="The server's weight counter the tensors are (for staleness).")
    tensors: list[SampleArray] = Field(min_length=1)
    recipe: FLRecipe = Field(default_factory=FLRecipe)
    deadline: float = Field(description="Server wall clock after which the round closes (a later update may still count in a later round).")
    min_confidence: float = Field(default=0.9, ge=0, le=1, description="Pseudo-labels: only samples the model was at least this sure of.")
    min_samples: int = Field(default=8, ge=1)
    max_samples: int = Field(default=2000, ge=1)
    seed: int | None = None


class FLUpdate(_Message):
    """A device's answer to an ``fl.train`` task, on ``telemetry/fl`` through the outbox: the delta of the head it
    trained (``tensors``, same names and shapes as the task's) and how, signed by the device (ECDSA P-256 over
    :meth:`signed_bytes`). ``certificate``: the enrollment certificate (PEM) when the device has one, whose key signs;
    else ``public_key`` (PEM) of the device's FL key, pinned by the control plane at first contact."""

    type: Literal["fl_update"] = "fl_update"
    device_id: str
    seq: int = Field(ge=0)
    ts: float
    mono: float = 0.0
    job_id: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    base_version: int = Field(ge=0)
    model: str
    version: str
    num_samples: int = Field(ge=0)
    loss: float | None = None
    labels: Literal["pseudo", "given", "mixed"] = "pseudo"
    tensors: list[SampleArray] = Field(min_length=1)
    certificate: str | None = Field(default=None, max_length=8192)
    public_key: str | None = Field(default=None, max_length=4096)
    signature: str = Field(description="base64 of the DER ECDSA-SHA256 signature over signed_bytes().")

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field that says what the update is (not seq/ts: the outbox sets them)."""
        import msgpack

        body = [self.device_id, self.job_id, self.round, self.base_version, self.model, self.version, self.num_samples,
                self.loss, self.labels, [[t.name, t.dtype, list(t.shape), t.data] for t in self.tensors]]
        return FL_SIGNING_CONTEXT + msgpack.packb(body, use_bin_type=True)


Record = Annotated[Union[Telemetry, Event, Summary, Sample, FLUpdate], Field(discriminator="type")]


class Batch(_Message):
    """Several outbox records in one publish (compressed with zstd when it pays)."""

    type: Literal["batch"] = "batch"
    device_id: str
    items: list[Record]


Message = Annotated[Union[DesiredState, DeviceState, Telemetry, Event, Summary, Sample, Batch, Command, FLUpdate], Field(discriminator="type")]

# Which message types may appear on which channel of a device topic.
CHANNEL_TYPES: dict[str, tuple[type[BaseModel], ...]] = {
    "desired": (DesiredState,),
    "state": (DeviceState,),
    "telemetry": (Batch, Telemetry, Summary, Sample, FLUpdate),
    "events": (Batch, Event),
    "cmd": (Command,),
}
