"""MQTT topic names: one namespace so one ACL pattern can fence every device.

A device publishes and subscribes only under ``edgewise/devices/{its id}/``; the
control plane listens on the wildcards below. Both sides build topics here and
nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ProtocolError

ROOT = "edgewise"
DEVICES = f"{ROOT}/devices"
FLEET = f"{ROOT}/fleet"

# Device ids become topic levels, MQTT client ids and file names: no wildcards,
# no separators, bounded length.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CHANNELS = ("desired", "cmd", "state", "telemetry", "events")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            reason="bad_topic",
        )
    return device_id


def desired(device_id: str) -> str:
    """Retained desired state, control plane -> device."""
    return f"{DEVICES}/{check_device_id(device_id)}/desired"


def cmd(device_id: str, name: str = "#") -> str:
    return f"{DEVICES}/{check_device_id(device_id)}/cmd/{name}"


def state(device_id: str) -> str:
    """Retained actual state, device -> control plane."""
    return f"{DEVICES}/{check_device_id(device_id)}/state"


def telemetry(device_id: str, kind: str = "batch") -> str:
    return f"{DEVICES}/{check_device_id(device_id)}/telemetry/{kind}"


def events(device_id: str, kind: str = "batch") -> str:
    return f"{DEVICES}/{check_device_id(device_id)}/events/{kind}"


# What the control plane subscribes to.
ALL_STATE = f"{DEVICES}/+/state"
ALL_TELEMETRY = f"{DEVICES}/+/telemetry/#"
ALL_EVENTS = f"{DEVICES}/+/events/#"
CONTROL_SUBSCRIPTIONS = (ALL_STATE, ALL_TELEMETRY, ALL_EVENTS)


@dataclass(frozen=True)
class Topic:
    device_id: str
    channel: str
    rest: str = ""


def parse(topic: str) -> Topic:
    """Split a device topic into (device id, channel, rest); raise ProtocolError otherwise."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or parts[1] != "devices":
        raise ProtocolError(f"topic {topic!r} is not under {DEVICES}/{{device_id}}/...", reason="bad_topic")
    device_id, channel = parts[2], parts[3]
    check_device_id(device_id)
    if channel not in CHANNELS:
        raise ProtocolError(f"topic {topic!r}: unknown channel {channel!r} (expected one of {CHANNELS})", reason="bad_topic")
    return Topic(device_id=device_id, channel=channel, rest="/".join(parts[4:]))
