"""/api/v1/devices/{device_id}/placements: models a device hosts besides its primary one (control.placements)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from .. import audit
from .. import placements as pl
from ..auth import OPERATOR, VIEWER_OR_OWN_DEVICE
from ..deployments import Publisher
from ..devices import get_device
from .deps import get_publisher, get_session

router = APIRouter(prefix="/devices", tags=["placements"])

REFUSED = {409: {"description": "The placement does not fit the device's RAM or cores; `figures` says by how much."}}


class PlacementsPut(BaseModel):
    """The device's whole list of placements (an empty list removes them all)."""

    model_config = ConfigDict(extra="forbid")

    placements: list[pl.PlacementIn] = Field(description="Each: model, version, threads, memory_mb.")


def _refused(exc: pl.PlacementRefusedError) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": exc.message, "error": type(exc).__name__, "figures": exc.figures})


@router.get("/{device_id}/placements", dependencies=[VIEWER_OR_OWN_DEVICE], responses={404: {"description": "Unknown device."}})
def get_placements(device_id: str, session: Session = Depends(get_session)) -> dict[str, Any]:
    """The device's placements with the status its agent reports (pending, starting, serving, failed + reason, rss_mb)
    and its budget: RAM and cores reported, the reserve, the primary model's share, what placements take, what is free."""
    return pl.describe(session, get_device(session, device_id))


@router.put("/{device_id}/placements", dependencies=[OPERATOR], responses={**REFUSED, 404: {"description": "Unknown device or model version."}})
def put_placements(
    device_id: str, body: PlacementsPut, request: Request,
    session: Session = Depends(get_session), publisher: Publisher | None = Depends(get_publisher),
) -> Any:
    """Replace the device's placements. Each is checked against the device's RAM and cores (minus the reserve, the
    primary model and the placements before it in the list); if any does not fit, nothing changes (409 with figures)."""
    try:
        result = pl.set_placements(session, publisher, device_id, body.placements)
    except pl.PlacementRefusedError as exc:
        audit.note(request, target=f"device:{device_id}", refused=exc.message)
        return _refused(exc)
    audit.note(request, target=f"device:{device_id}", placements=[f"{p['model']} {p['version']}" for p in result["placements"]])
    return result


@router.delete("/{device_id}/placements/{model}", dependencies=[OPERATOR], responses={404: {"description": "Unknown device or placement."}})
def delete_placement(
    device_id: str, model: str, request: Request,
    session: Session = Depends(get_session), publisher: Publisher | None = Depends(get_publisher),
) -> dict[str, Any]:
    """Stop hosting ``model`` on the device: its worker stops when the agent receives the new desired state."""
    result = pl.remove_placement(session, publisher, device_id, model)
    audit.note(request, target=f"device:{device_id}", removed=model)
    return result
