"""/api/v1/deployments: set the desired model version of a device or of a tag."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, status
from sqlalchemy.orm import Session

from .. import audit
from .. import deployments as dep
from ..auth import OPERATOR, VIEWER
from ..schemas import DeploymentCreate, DeploymentOut
from .deps import get_publisher, get_session

router = APIRouter(prefix="/deployments", tags=["deployments"])


@router.post(
    "",
    response_model=DeploymentOut,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"description": "Unknown model version, agent release, device, or no device with the tag."},
               422: {"description": "A target device can run no variant of the version (the message says why)."}},
    dependencies=[OPERATOR],
)
def create_deployment(
    body: DeploymentCreate,
    request: Request,
    session: Session = Depends(get_session),
    publisher: dep.Publisher | None = Depends(get_publisher),
) -> DeploymentOut:
    """Record the new desired state of each target device and publish it (retained) to each.

    ``model``+``version`` set the model, ``agent_version`` the agent release (either or both); the part
    not given keeps its earlier desired value.

    A tag targets the devices that carry it now; devices tagged later are not included. ``device_ids`` targets
    exactly those devices. Each device gets the variant of the version that fits it best (``variants`` in the
    answer; see docs/fleet-targeting.md); 422 when a device can run none of them.
    """
    result = dep.deploy(session, publisher, body.model, body.version, device_id=body.device_id, tag=body.tag,
                        device_ids=body.device_ids, rollback=body.rollback, agent_version=body.agent_version)
    target = (f"device:{body.device_id}" if body.device_id else f"tag:{body.tag}" if body.tag is not None
              else f"devices:{result.deployment.target_value}")
    agent = {"agent_version": body.agent_version} if body.agent_version is not None else {}
    audit.note(request, target=target, deployment=result.deployment.id, model=body.model, version=body.version,
               rollback=body.rollback, devices=len(result.states), **agent)
    return DeploymentOut.of(result.deployment, {s.device_id: s.generation for s in result.states})


@router.get("", response_model=list[DeploymentOut], dependencies=[VIEWER])
def list_deployments(
    limit: int = Query(default=100, ge=1, le=1000), session: Session = Depends(get_session)
) -> list[DeploymentOut]:
    """Most recent first."""
    return [DeploymentOut.of(d) for d in dep.list_deployments(session, limit)]
