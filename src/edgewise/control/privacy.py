"""Telemetry privacy per device, tag or group: recorded in the desired state, applied by the agent (agent/privacy.py).

The pattern is sample capture's (``deployments.set_capture``): the setting is a column of the device
(``desired_privacy``), every change is a new desired generation published retained, so an offline device finds it
when it returns and a group's devices switch together. The agent privatizes its class and confidence histograms
before they leave it, within a per-device budget per UTC day (docs/learn.md "Privacy of telemetry").
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from ..protocol import DesiredState
from ..protocol.messages import TelemetryPrivacy
from .deployments import Publisher, set_desired, setting_targets
from .models import Device

log = logging.getLogger(__name__)


def privacy_targets(session: Session, *, device_id: str | None = None, tag: str | None = None,
                    group: str | None = None) -> list[Device]:
    """The devices one of device id, tag or group names (exactly one)."""
    return setting_targets(session, device_id=device_id, tag=tag, group=group)


def set_privacy(session: Session, publisher: Publisher | None, setting: TelemetryPrivacy | None, *,
                device_id: str | None = None, tag: str | None = None, group: str | None = None) -> list[DesiredState]:
    """Privatize the telemetry histograms of one device, a tag's or a group's devices (``setting``), or send them as
    counted again (None): a new desired generation per device, published retained like a deployment."""
    targets = setting_targets(session, device_id=device_id, tag=tag, group=group)
    value = setting.model_dump(mode="json") if setting is not None else None
    states = set_desired(session, publisher, targets, "desired_privacy", value, "privacy setting")
    what = (f"{setting.mechanism}, ε={setting.epsilon_per_report}/report, {setting.budget_per_day}/day" if setting else "off")
    log.info("telemetry privacy %s for %s", what, f"device {device_id}" if device_id else f"tag {tag}" if tag else f"group {group}")
    return states


def privacy_of(device: Device) -> TelemetryPrivacy | None:
    return TelemetryPrivacy.model_validate(device.desired_privacy) if device.desired_privacy else None
