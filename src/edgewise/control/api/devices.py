"""/api/v1/devices: register, list, show."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.orm import Session

from .. import devices as fleet
from ..auth import OPERATOR, VIEWER, VIEWER_OR_OWN_DEVICE
from ..deployments import Publisher, publish_desired
from ..schemas import DeviceOut, DeviceRegister
from ..telemetry import latest_per_device
from .deps import get_publisher, get_session

router = APIRouter(prefix="/devices", tags=["devices"])


@router.post(
    "",
    response_model=DeviceOut,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "Already registered; tags replaced.", "model": DeviceOut}},
    dependencies=[OPERATOR],
)
def register_device(
    body: DeviceRegister,
    response: Response,
    session: Session = Depends(get_session),
    publisher: Publisher | None = Depends(get_publisher),
) -> DeviceOut:
    """Register a device ahead of its first connection, or replace a known device's tags.

    A device whose agent connects first registers itself; this is for tagging and for
    deploying to it before it is ever switched on.
    """
    device, created = fleet.register_device(session, body.id, body.tags)
    if not created:
        response.status_code = status.HTTP_200_OK
    publish_desired(publisher, device)  # a re-registered device gets its desired state again
    return DeviceOut.of(device, latest_per_device(session, [device.id]).get(device.id))


@router.get("", response_model=list[DeviceOut], dependencies=[VIEWER])
def list_devices(
    tag: str | None = Query(default=None, description="Only devices with this tag."),
    session: Session = Depends(get_session),
) -> list[DeviceOut]:
    """Every device with its desired and actual version, status, last contact and latest telemetry."""
    devices = fleet.list_devices(session, tag=tag)
    latest = latest_per_device(session)
    return [DeviceOut.of(d, latest.get(d.id)) for d in devices]


@router.get(
    "/{device_id}", response_model=DeviceOut, responses={404: {"description": "Unknown device."}},
    dependencies=[VIEWER_OR_OWN_DEVICE],
)
def show_device(device_id: str, session: Session = Depends(get_session)) -> DeviceOut:
    device = fleet.get_device(session, device_id)
    return DeviceOut.of(device, latest_per_device(session, [device_id]).get(device_id))
