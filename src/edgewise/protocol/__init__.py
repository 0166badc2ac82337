"""The wire contract between agent and control plane: topics, schemas, codec.

Both sides import this package and nothing of each other.
"""

from . import topics
from .codec import decode, decode_for_topic, encode
from .errors import ProtocolError
from .messages import (
    SCHEMA_VERSION,
    ArtifactRef,
    Batch,
    Command,
    DesiredState,
    DeviceState,
    DriftSketch,
    Event,
    CONFIDENCE_BINS,
    HardwareInfo,
    Sample,
    SampleArray,
    Summary,
    Telemetry,
    UpdateResult,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactRef",
    "Batch",
    "Command",
    "DesiredState",
    "DeviceState",
    "DriftSketch",
    "Event",
    "HardwareInfo",
    "ProtocolError",
    "Sample",
    "SampleArray",
    "CONFIDENCE_BINS",
    "Summary",
    "Telemetry",
    "UpdateResult",
    "decode",
    "decode_for_topic",
    "encode",
    "topics",
]
