"""Fleet drift: thin routes over :mod:`edgewise.control.drift` (all reads; viewers may call them).

Drift alerts are listed with every other alert at ``GET /api/v1/alerts`` (``api/alerts.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy.orm import Session

from .. import drift
from ..auth import VIEWER, VIEWER_OR_OWN_DEVICE
from ..devices import get_device
from ..errors import NotFoundError
from ..timeutil import utcnow
from .deps import get_session

router = APIRouter(tags=["drift"])

HOURS = Query(default=drift.WINDOW_HOURS, ge=0, le=24 * 90, description="Look back this many hours (0: everything stored).")


class DistanceOut(BaseModel):
    score: float  # largest PSI / size-corrected threshold; > 1 means changed
    worst: str | None
    psi: dict[str, float]


class DeviceDriftOut(BaseModel):
    device_id: str
    n: int
    status: str  # ok | drifted | peer_outlier | insufficient_data
    reference: DistanceOut | None
    peers: DistanceOut | None
    peer_z: float | None


class FleetDriftOut(BaseModel):
    model: str
    version: str
    status: str  # ok | fleet_shift | no_reference | insufficient_data
    n: int
    outliers: list[str]
    pooled: DistanceOut | None
    devices: list[DeviceDriftOut]


class FleetDriftBrief(BaseModel):
    model: str
    version: str
    status: str
    n: int
    devices: int
    outliers: list[str]
    pooled_score: float | None


class OutlierOut(BaseModel):
    device_id: str
    model: str
    version: str
    score: float | None
    worst: str | None
    peer_z: float | None
    n: int


def _reports(session: Session, hours: float) -> list[drift.FleetDrift]:
    now = utcnow()
    since = drift.hour_of(now.timestamp() - hours * drift.HOUR) if hours > 0 else None
    return [drift.fleet_drift(session, m, v, hours=hours, now=now)
            for m, v in drift.model_versions_with_sketches(session, since_hour=since)]


@router.get("/drift", response_model=list[FleetDriftBrief], dependencies=[VIEWER])
def fleet_overview(hours: float = HOURS, session: Session = Depends(get_session)) -> list[FleetDriftBrief]:
    """Every model version that sent drift sketches in the window: fleet status and its peer outliers."""
    return [FleetDriftBrief(model=r.model, version=r.version, status=r.status, n=r.n, devices=len(r.devices),
                            outliers=r.outliers, pooled_score=r.pooled.score if r.pooled else None)
            for r in _reports(session, hours)]


@router.get("/drift/outliers", response_model=list[OutlierOut], dependencies=[VIEWER])
def peer_outliers(hours: float = HOURS, session: Session = Depends(get_session)) -> list[OutlierOut]:
    """The devices that are unlike their peers right now (a broken sensor, not a changed world)."""
    out = []
    for r in _reports(session, hours):
        for d in r.devices:
            if d.status == "peer_outlier":
                out.append(OutlierOut(device_id=d.device_id, model=r.model, version=r.version, n=d.n, peer_z=d.peer_z,
                                      score=d.peers.score if d.peers else None, worst=d.peers.worst if d.peers else None))
    return out


@router.get("/drift/{name}/{version}", response_model=FleetDriftOut, dependencies=[VIEWER])
def fleet_drift(name: str, version: str, hours: float = HOURS, session: Session = Depends(get_session)) -> FleetDriftOut:
    """Per-device scores (against the bundle's reference and against the pooled peers) and the pooled
    fleet against the reference, for one model version."""
    report = drift.fleet_drift(session, name, version, hours=hours, now=utcnow())
    if not report.devices:
        raise NotFoundError(f"no drift sketches from devices running {name} {version} in the last {hours:g} hours; "
                            "devices send them once their bundle carries reference statistics")
    return FleetDriftOut.model_validate(report.as_dict())


@router.get("/devices/{device_id}/drift", response_model=list[DeviceDriftOut], dependencies=[VIEWER_OR_OWN_DEVICE])
def device_drift(device_id: str, hours: float = HOURS, session: Session = Depends(get_session)) -> list[DeviceDriftOut]:
    """The device's drift per model version it ran in the window (empty: it sent no sketches)."""
    get_device(session, device_id)
    out = []
    for r in _reports(session, hours):
        out += [DeviceDriftOut.model_validate(d) for d in r.as_dict()["devices"] if d["device_id"] == device_id]
    return out
