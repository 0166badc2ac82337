"""Telemetry, events and ingest statistics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .. import telemetry as ts
from ..auth import VIEWER, VIEWER_OR_OWN_DEVICE
from ..devices import get_device
from ..models import Device, ModelVersion
from ..schemas import EventOut, IngestStatsOut, StatsOut, SummaryOut, TelemetryOut
from ..services import ControlServices
from .deps import get_services, get_session

router = APIRouter(tags=["telemetry"])

MAX_LIMIT = 100_000


@router.get("/telemetry/latest", response_model=list[TelemetryOut], dependencies=[VIEWER])
def latest_telemetry(session: Session = Depends(get_session)) -> list[TelemetryOut]:
    """The newest sample of every device that has reported any."""
    latest = ts.latest_per_device(session)
    return [TelemetryOut.of(latest[k]) for k in sorted(latest)]


@router.get("/devices/{device_id}/telemetry", response_model=list[TelemetryOut], dependencies=[VIEWER_OR_OWN_DEVICE])
def device_telemetry(
    device_id: str,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    session: Session = Depends(get_session),
) -> list[TelemetryOut]:
    """The device's last ``limit`` samples, oldest first (ready to plot)."""
    get_device(session, device_id)
    return [TelemetryOut.of(r) for r in ts.series(session, device_id, limit)]


@router.get("/devices/{device_id}/events", response_model=list[EventOut], dependencies=[VIEWER_OR_OWN_DEVICE])
def device_events(
    device_id: str,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    session: Session = Depends(get_session),
) -> list[EventOut]:
    """The device's last ``limit`` events, newest first."""
    get_device(session, device_id)
    return [EventOut.model_validate(e) for e in ts.recent_events(session, device_id, limit)]


@router.get("/devices/{device_id}/summaries", response_model=list[SummaryOut], dependencies=[VIEWER_OR_OWN_DEVICE])
def device_summaries(
    device_id: str,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    session: Session = Depends(get_session),
) -> list[SummaryOut]:
    """The device's last ``limit`` per-interval summaries (bandwidth mode "summary"), oldest first."""
    get_device(session, device_id)
    return [SummaryOut.model_validate(r) for r in ts.recent_summaries(session, device_id, limit)]


@router.get("/stats", response_model=StatsOut, dependencies=[VIEWER])
def stats(services: ControlServices = Depends(get_services), session: Session = Depends(get_session)) -> StatsOut:
    """Ingest counters (since this process started) and stored row counts."""
    return StatsOut(
        ingest=IngestStatsOut.of(services.ingest.stats()),
        devices=session.scalar(select(func.count()).select_from(Device)) or 0,
        model_versions=session.scalar(select(func.count()).select_from(ModelVersion)) or 0,
        stored=ts.count_rows(session),
    )
