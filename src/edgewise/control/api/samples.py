"""Captured samples: list them (viewers), export one model version's as a data set (operators)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from .. import samples as sm
from ..auth import OPERATOR, VIEWER
from ..devices import get_device
from ..deployments import Publisher
from ..deployments import set_capture as set_capture_for
from .deps import get_publisher, get_session

router = APIRouter(tags=["samples"])

MAX_LIMIT = 10_000
Reason = Literal["low_confidence", "drift", "random"]


class SampleInputOut(BaseModel):
    name: str
    dtype: str
    shape: list[int]


class SampleOut(BaseModel):
    """One stored sample without its bytes (export the data set for those)."""

    model_config = ConfigDict(from_attributes=True)

    device_id: str
    seq: int
    ts: float = Field(description="Device wall clock when the prediction was served.")
    corrected_ts: float | None
    received_at: datetime
    model: str | None
    version: str | None
    reason: str
    top1: int | None
    confidence: float | None
    inputs: list[SampleInputOut]
    size: int = Field(description="Bytes of input data.")


class CaptureSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = None
    tag: str | None = None
    group: str | None = Field(default=None, description="A saved group (control.groups): its devices now.")
    enabled: bool | None = Field(description="False: capture off for these devices (privacy); True: allowed; null: each device's own config.")


class CaptureSettingOut(BaseModel):
    devices: list[str]
    enabled: bool | None
    generations: dict[str, int]


@router.put("/capture", response_model=CaptureSettingOut, dependencies=[OPERATOR])
def set_capture(body: CaptureSetting, session: Session = Depends(get_session),
                publisher: Publisher | None = Depends(get_publisher)) -> CaptureSettingOut:
    """Switch sample capture off (or allow it again) for one device, a tag's or a group's devices, through the desired state."""
    states = set_capture_for(session, publisher, body.enabled, device_id=body.device_id, tag=body.tag, group=body.group)
    return CaptureSettingOut(devices=[s.device_id for s in states], enabled=body.enabled,
                             generations={s.device_id: s.generation for s in states})


class SampleCountOut(BaseModel):
    model: str | None
    version: str | None
    device_id: str
    reason: str
    count: int
    bytes: int


@router.get("/samples", response_model=list[SampleOut], dependencies=[VIEWER])
def list_samples(
    model: str | None = None,
    version: str | None = None,
    device_id: str | None = None,
    reason: Reason | None = None,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    offset: int = Query(default=0, ge=0),
    session: Session = Depends(get_session),
) -> list[SampleOut]:
    """Stored samples (metadata only), oldest first; filter by model, version, device and capture reason."""
    rows = sm.list_samples(session, model=model, version=version, device_id=device_id, reason=reason, limit=limit, offset=offset)
    return [SampleOut.model_validate(r) for r in rows]


@router.get("/samples/summary", response_model=list[SampleCountOut], dependencies=[VIEWER])
def samples_summary(session: Session = Depends(get_session)) -> list[SampleCountOut]:
    """How many samples (and bytes) are stored per model version, device and reason."""
    return [SampleCountOut(**r) for r in sm.summarize(session)]


@router.get("/devices/{device_id}/samples", response_model=list[SampleOut], dependencies=[VIEWER])
def device_samples(
    device_id: str,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    session: Session = Depends(get_session),
) -> list[SampleOut]:
    """The device's stored samples (metadata only), oldest first. Viewers only: a device never reads them back."""
    get_device(session, device_id)
    return [SampleOut.model_validate(r) for r in sm.list_samples(session, device_id=device_id, limit=limit)]


@router.get("/models/{name}/versions/{version}/samples/export", dependencies=[OPERATOR])
def export_samples(
    name: str,
    version: str,
    format: Literal["npz", "parquet"] = "npz",
    device_id: str | None = None,
    reason: Reason | None = None,
    session: Session = Depends(get_session),
) -> Response:
    """The version's samples as a data set file: npz (``numpy.load``; keys ``x:<input>``, ``device_id``, ``seq``,
    ``ts``, ``reason``, ``top1``, ``confidence``) or parquet (only where pyarrow is installed)."""
    body, media = sm.export(session, name, version, format, device_id=device_id, reason=reason)
    filename = f"{name}-{version}-samples.{format}"
    return Response(content=body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
