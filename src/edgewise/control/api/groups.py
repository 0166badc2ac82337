"""/api/v1/groups (saved device queries with maintenance windows) and per-device variant overrides.

  curl -X POST -H "Authorization: Bearer $T" -H 'Content-Type: application/json' http://HOST/api/v1/groups \
       -d '{"name": "big-x86", "query": {"where": [{"field": "hardware.ram_mb", "op": ">=", "value": 2048}]}}'
  curl -H "Authorization: Bearer $T" http://HOST/api/v1/groups/big-x86/devices
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from .. import audit
from .. import groups as g
from .. import variants as v
from ..auth import OPERATOR, VIEWER, Principal
from ..devices import get_device
from ..models import Group
from ..schemas import DeviceOut
from ..telemetry import latest_per_device
from ..timeutil import utcnow
from .deps import get_principal, get_session

router = APIRouter(tags=["groups"])


class GroupOut(g.GroupSpec):
    id: int
    created_at: datetime
    updated_at: datetime
    devices: int = Field(description="How many devices the query matches now.")
    in_window: bool = Field(description="Whether now (UTC) is inside a maintenance window.")

    @classmethod
    def of(cls, group: Group, devices: int, now: datetime) -> "GroupOut":
        return cls(
            id=group.id, name=group.name, description=group.description or "", query=g.query_of(group),
            maintenance=g.windows_of(group), rate_limit_per_min=group.rate_limit_per_min, created_at=group.created_at,
            updated_at=group.updated_at, devices=devices, in_window=g.in_window(group, now),
        )


def _out(session: Session, group: Group) -> GroupOut:
    return GroupOut.of(group, len(g.resolve(session, group.name)), utcnow())


_GROUP_EXAMPLE = {"name": "big-x86", "description": "x86 devices with 2 GB or more",
                  "query": {"tags_all": ["site-a"], "where": [{"field": "hardware.arch", "op": "==", "value": "x86_64"},
                                                               {"field": "hardware.ram_mb", "op": ">=", "value": 2048}]},
                  "maintenance": [{"days": ["sat", "sun"], "start": "22:00", "end": "04:00"}], "rate_limit_per_min": 60}


@router.post(
    "/groups", response_model=GroupOut, status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "A group with this name exists."}, 422: {"description": "Invalid query or window."}},
    dependencies=[OPERATOR],
)
def create_group(
    request: Request, body: dict[str, Any] = Body(examples=[_GROUP_EXAMPLE]), session: Session = Depends(get_session),
) -> GroupOut:
    """Save a device query (tags_all, tags_any, devices, where) with maintenance windows and a rollout rate limit.

    The query is evaluated whenever the group is used: devices that match later join later rollouts.
    """
    group = g.create_group(session, g.parse_spec(body))
    audit.note(request, target=f"group:{group.name}", query=group.query, maintenance=group.maintenance)
    return _out(session, group)


@router.get("/groups", response_model=list[GroupOut], dependencies=[VIEWER])
def list_groups(session: Session = Depends(get_session)) -> list[GroupOut]:
    """Every group with how many devices it matches now."""
    return [_out(session, group) for group in g.list_groups(session)]


@router.get("/groups/{name}", response_model=GroupOut, responses={404: {"description": "Unknown group."}},
            dependencies=[VIEWER])
def show_group(name: str, session: Session = Depends(get_session)) -> GroupOut:
    return _out(session, g.get_group(session, name))


@router.put(
    "/groups/{name}", response_model=GroupOut,
    responses={404: {"description": "Unknown group."}, 409: {"description": "Renamed to a taken name."},
               422: {"description": "Invalid query or window."}},
    dependencies=[OPERATOR],
)
def replace_group(
    name: str, request: Request, body: dict[str, Any] = Body(examples=[_GROUP_EXAMPLE]),
    session: Session = Depends(get_session),
) -> GroupOut:
    """Replace the group's query, windows and rate limit (``name`` in the body may rename it; omitted: kept)."""
    spec = g.parse_spec({"name": name, **body})
    group = g.update_group(session, name, spec)
    audit.note(request, target=f"group:{name}", query=group.query, maintenance=group.maintenance, renamed_to=group.name)
    return _out(session, group)


@router.delete("/groups/{name}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "Unknown group."}}, dependencies=[OPERATOR])
def delete_group(name: str, request: Request, session: Session = Depends(get_session)) -> Response:
    g.delete_group(session, name)
    audit.note(request, target=f"group:{name}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/groups/{name}/devices", response_model=list[DeviceOut], responses={404: {"description": "Unknown group."}},
            dependencies=[VIEWER])
def group_devices(name: str, session: Session = Depends(get_session)) -> list[DeviceOut]:
    """The devices the group's query matches now."""
    devices = g.resolve(session, name)
    latest = latest_per_device(session, [d.id for d in devices]) if devices else {}
    return [DeviceOut.of(d, latest.get(d.id)) for d in devices]


# -- per-device variant overrides -------------------------------------------------------------------


class VariantOverrideIn(BaseModel):
    model: str = Field(description="Model name.")
    variant: str | None = Field(description="Variant to pin the device to; null returns it to the automatic choice.")


class VariantOverrideOut(BaseModel):
    device_id: str
    model: str
    variant: str | None
    created_at: datetime | None = None
    created_by: str | None = None


class VariantChoiceOut(BaseModel):
    device_id: str
    model: str
    version: str
    variant: str
    reason: str


@router.put(
    "/devices/{device_id}/variant", response_model=VariantOverrideOut,
    responses={404: {"description": "Unknown device or model."}, 422: {"description": "The model has no such variant."}},
    dependencies=[OPERATOR],
)
def set_variant_override(
    device_id: str, body: VariantOverrideIn, request: Request, session: Session = Depends(get_session),
    principal: Principal = Depends(get_principal),
) -> VariantOverrideOut:
    """Pin the device to one variant of a model (in every version that has it), or ``null`` for the automatic
    choice. It takes effect at the next deployment of the model to the device."""
    row = v.set_override(session, device_id, body.model, body.variant, actor=principal.actor)
    audit.note(request, target=f"device:{device_id}", model=body.model, variant=body.variant)
    if row is None:
        return VariantOverrideOut(device_id=device_id, model=body.model, variant=None)
    return VariantOverrideOut(device_id=row.device_id, model=row.model, variant=row.variant,
                              created_at=row.created_at, created_by=row.created_by)


@router.get("/devices/{device_id}/variant", response_model=list[VariantOverrideOut] | VariantChoiceOut,
            responses={404: {"description": "Unknown device, model or version."}}, dependencies=[VIEWER])
def show_variant(
    device_id: str,
    model: str | None = Query(default=None, description="With version: the variant a deployment would give the device."),
    version: str | None = None,
    session: Session = Depends(get_session),
) -> list[VariantOverrideOut] | VariantChoiceOut:
    """The device's overrides; with ``model`` and ``version``, the variant it would get now and why."""
    device = get_device(session, device_id)
    if model is not None and version is not None:
        row, reason = v.choose(session, device, model, version)
        return VariantChoiceOut(device_id=device_id, model=model, version=version, variant=row.variant, reason=reason)
    return [VariantOverrideOut(device_id=o.device_id, model=o.model, variant=o.variant, created_at=o.created_at,
                               created_by=o.created_by) for o in v.list_overrides(session, device_id)]
