"""/api/v1/privacy: telemetry privacy per device, tag or group (issue 8 FL2; docs/learn.md "Privacy of telemetry")."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from ...protocol.messages import TelemetryPrivacy
from ..auth import OPERATOR, VIEWER
from ..deployments import Publisher
from ..devices import list_devices
from ..privacy import privacy_of, set_privacy as set_privacy_for
from .deps import get_publisher, get_session

router = APIRouter(tags=["privacy"])


class PrivacySetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = None
    tag: str | None = None
    group: str | None = Field(default=None, description="A saved group (its query is evaluated now).")
    privacy: TelemetryPrivacy | None = Field(
        description="Privatize class/confidence histograms on these devices: {mechanism: laplace|gaussian|randomized_response, "
        "epsilon_per_report, budget_per_day, delta?}; null: send them as counted.",
    )


class PrivacySettingOut(BaseModel):
    devices: list[str]
    privacy: TelemetryPrivacy | None
    generations: dict[str, int]


class DevicePrivacyOut(BaseModel):
    device_id: str
    privacy: TelemetryPrivacy | None


@router.put("/privacy", response_model=PrivacySettingOut, dependencies=[OPERATOR],
            responses={404: {"description": "Unknown device, tag or group."}, 422: {"description": "Bad target or setting."}})
def put_privacy(body: PrivacySetting, session: Session = Depends(get_session),
                publisher: Publisher | None = Depends(get_publisher)) -> PrivacySettingOut:
    """Switch telemetry privacy on (or off) for one device, a tag or a group, through the desired state."""
    states = set_privacy_for(session, publisher, body.privacy, device_id=body.device_id, tag=body.tag, group=body.group)
    return PrivacySettingOut(devices=[s.device_id for s in states], privacy=body.privacy,
                             generations={s.device_id: s.generation for s in states})


@router.get("/privacy", response_model=list[DevicePrivacyOut], dependencies=[VIEWER])
def get_privacy(tag: str | None = None, session: Session = Depends(get_session)) -> list[DevicePrivacyOut]:
    """Every device's recorded telemetry privacy setting (optionally those with ``tag``)."""
    return [DevicePrivacyOut(device_id=d.id, privacy=privacy_of(d)) for d in list_devices(session, tag=tag)]
