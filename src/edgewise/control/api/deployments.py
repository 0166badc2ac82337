"""/api/v1/deployments: set the desired model version of a device or of a tag."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy.orm import Session

from .. import deployments as dep
from ..schemas import DeploymentCreate, DeploymentOut
from .deps import get_publisher, get_session

router = APIRouter(prefix="/deployments", tags=["deployments"])


@router.post(
    "",
    response_model=DeploymentOut,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"description": "Unknown model version, device, or no device with the tag."}},
)
def create_deployment(
    body: DeploymentCreate,
    session: Session = Depends(get_session),
    publisher: dep.Publisher | None = Depends(get_publisher),
) -> DeploymentOut:
    """Record the new desired state of each target device and publish it (retained) to each.

    A tag targets the devices that carry it now; devices tagged later are not included.
    """
    result = dep.deploy(session, publisher, body.model, body.version, device_id=body.device_id, tag=body.tag, rollback=body.rollback)
    return DeploymentOut.of(result.deployment, {s.device_id: s.generation for s in result.states})


@router.get("", response_model=list[DeploymentOut])
def list_deployments(
    limit: int = Query(default=100, ge=1, le=1000), session: Session = Depends(get_session)
) -> list[DeploymentOut]:
    """Most recent first."""
    return [DeploymentOut.of(d) for d in dep.list_deployments(session, limit)]
