"""/api/v1/fl/jobs: federated-learning jobs (operators start and stop them, viewers read their status).

Thin: the job file is ``control.fl.FLJobSpec``; the engine that runs rounds is ``control.fl.FLEngine``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import fl
from ..auth import OPERATOR, VIEWER, Principal
from ..models import FLJob
from ..registry import Registry
from ..services import ControlServices
from .deps import get_principal, get_registry, get_services, get_session

router = APIRouter(prefix="/fl", tags=["federated learning"])


@router.post("/jobs", status_code=status.HTTP_201_CREATED, dependencies=[OPERATOR],
             responses={404: {"description": "Unknown model version or group."},
                        422: {"description": "Invalid job file, or a base model without a trainable head."}})
def start_job(body: fl.FLJobSpec, session: Session = Depends(get_session), registry: Registry = Depends(get_registry),
              services: ControlServices = Depends(get_services), principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    """Start a federated job; its first round opens at the engine's next tick."""
    job = fl.create_job(session, registry, body, created_by=principal.name or None, engine=getattr(services, "fl", None))
    return fl.job_status(session, job)


@router.get("/jobs", dependencies=[VIEWER])
def list_jobs(session: Session = Depends(get_session)) -> list[dict[str, Any]]:
    rows = session.scalars(select(FLJob).order_by(FLJob.created_at.desc())).all()
    return [{k: v for k, v in fl.job_status(session, j).items() if k not in ("rounds", "rejected_updates", "spec")} for j in rows]


@router.get("/jobs/{job_id}", dependencies=[VIEWER], responses={404: {"description": "Unknown job."}})
def get_job(job_id: str, session: Session = Depends(get_session)) -> dict[str, Any]:
    """State, ε so far, and per round: cohort, participants, late and rejected updates, accuracy, ε."""
    return fl.job_status(session, fl.get_job(session, job_id))


@router.post("/jobs/{job_id}/stop", dependencies=[OPERATOR], responses={404: {"description": "Unknown job."}})
def stop_job(job_id: str, session: Session = Depends(get_session)) -> dict[str, Any]:
    """Stop a job now (no result version is registered)."""
    return fl.job_status(session, fl.stop_job(session, job_id))
