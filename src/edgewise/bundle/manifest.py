"""The manifest: everything a device must know about a bundle before it loads it."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.preprocessing import PreprocessingSpec
from ..data.reference import ReferenceStats

FORMAT = "edgewise-bundle/1"
MODEL_MEMBER = "model.onnx"
MANIFEST_MEMBER = "manifest.json"

# ONNX Runtime's type strings -> the numpy names the manifest uses.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}

# semver.org's regex: MAJOR.MINOR.PATCH[-prerelease][+build]
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_semver(version: str) -> str:
    if not SEMVER_RE.match(version):
        raise ValueError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return version


def semver_key(version: str) -> tuple:
    """Sort key with semver precedence (pre-releases sort before the release)."""
    m = SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"version {version!r} is not a semantic version")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32")
    shape: list[int | str | None] = Field(description="Dimensions; a string or null is a free (symbolic) dimension.")


class Member(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str = MODEL_MEMBER
    format: str = "onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: dict[str, int] = Field(default_factory=dict, description="ONNX domain -> opset version.")
    ir_version: int | None = None
    producer: str | None = None


class Requirements(BaseModel):
    model_config = ConfigDict(extra="ignore")

    runtime: str = "onnxruntime"
    min_runtime_version: str | None = None
    min_ram_mb: int = Field(ge=0, default=0)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class RuntimeSettings(BaseModel):
    """ONNX Runtime settings tuned for a device profile (by `edgewise optimize`); the agent applies them."""

    model_config = ConfigDict(extra="ignore")

    intra_op_threads: int | None = Field(default=None, ge=1)
    inter_op_threads: int | None = Field(default=None, ge=1)
    graph_optimization_level: str = Field(
        default="ORT_ENABLE_ALL", pattern=r"^ORT_(DISABLE_ALL|ENABLE_BASIC|ENABLE_EXTENDED|ENABLE_LAYOUT|ENABLE_ALL)$"
    )
    execution_provider: str = "CPUExecutionProvider"


class Variant(BaseModel):
    """One of several builds of the same model version (fp32, int8, pruned-int8, ...).

    ``profile`` and ``figures`` come from the optimize report that produced it, so the control
    plane can pick the best variant a device can run without measuring again.
    """

    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    recipe: str | None = None
    base_model_sha256: str | None = Field(default=None, description="sha256 of the FP32 model this was derived from.")
    profile: str | None = None
    measured_on: str | None = Field(default=None, description="Machine that measured the figures.")
    figures: dict[str, Any] = Field(default_factory=dict, description="size, latency, accuracy, drop, peak memory.")


GOLDEN_MEMBER = "golden.npz"


class Golden(BaseModel):
    """Golden inputs and the outputs the model gave on them at build time (member ``golden.npz``).

    The agent runs them through its own inference path before it commits a new model:
    outputs must match within ``atol`` + ``rtol`` × |expected|, and the median per-sample
    latency must stay within ``latency_budget_ms`` when set.
    """

    model_config = ConfigDict(extra="ignore")

    member: str = GOLDEN_MEMBER
    samples: int = Field(ge=1, default=1)
    atol: float = Field(ge=0, default=1e-4)
    rtol: float = Field(ge=0, default=1e-3)
    latency_budget_ms: float | None = Field(default=None, gt=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str = FORMAT
    name: str
    version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = ""
    model: ModelInfo
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    labels: list[str] | None = None
    requirements: Requirements = Field(default_factory=Requirements)
    members: dict[str, Member]
    runtime: RuntimeSettings | None = None
    variant: Variant | None = None
    golden: Golden | None = None
    reference: ReferenceStats | None = Field(
        default=None, description="Reference statistics of held-out data (drift detection on the device and the fleet's shared bins).",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"bundle format {v!r} is not supported by this edgewise (expects {FORMAT!r})")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"name {v!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return check_semver(v)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, 2-space indent) so the same manifest gives the same bytes."""
        import json

        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()
