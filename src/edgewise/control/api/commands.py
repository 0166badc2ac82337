"""/api/v1/devices/{id}/commands: one-off commands (adapt, drift.reset) over MQTT ``cmd/``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ..auth import OPERATOR
from ..commands import send_command
from ..deployments import Publisher
from .deps import get_publisher, get_session

router = APIRouter(prefix="/devices", tags=["devices"])


class CommandIn(BaseModel):
    name: str = Field(description="adapt | drift.reset", examples=["adapt"])
    args: dict[str, Any] = Field(default_factory=dict, description='adapt: {"method": "auto"|"adabn"|"coral"}')
    ttl_s: float | None = Field(default=3600.0, gt=0, description="The device drops the command if it arrives later than this.")


class CommandOut(BaseModel):
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    issued_at: float
    expires_at: float | None


@router.post(
    "/{device_id}/commands", response_model=CommandOut, status_code=status.HTTP_202_ACCEPTED, dependencies=[OPERATOR],
    responses={404: {"description": "Unknown device."}, 422: {"description": "Unknown command."},
               503: {"description": "The MQTT bus is down."}},
)
def post_command(device_id: str, body: CommandIn, session: Session = Depends(get_session),
                 publisher: Publisher | None = Depends(get_publisher)) -> CommandOut:
    """Send a command; the device answers with a ``command.result`` event carrying the returned ``id``."""
    c = send_command(session, publisher, device_id, body.name, body.args, ttl_s=body.ttl_s)
    return CommandOut(id=c.id, device_id=c.device_id, name=c.name, args=c.args, issued_at=c.issued_at, expires_at=c.expires_at)
