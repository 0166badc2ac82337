"""/api/v1/rollouts: staged rollouts gated on model health (operators write, viewers read).

Thin: the spec is ``control.rollouts.RolloutSpec``, the store and operator actions are in
``control.rollouts``, the engine that moves rollouts forward is ``control.rollout_engine``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from .. import audit
from .. import rollouts as ro
from ..auth import OPERATOR, VIEWER
from ..deployments import Publisher
from ..rollout_engine import abort as abort_rollout
from .deps import get_principal, get_publisher, get_session

router = APIRouter(prefix="/rollouts", tags=["rollouts"])


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rollback: bool = Field(default=False, description="Also return every device that installed the candidate to its previous version.")


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wave: int | None = Field(default=None, ge=0, description="Approve only this wave (index); default every waiting cohort.")


def _summary(session: Session, row: Any) -> dict[str, Any]:
    view = ro.rollout_view(session, row, decisions_limit=0)
    return {k: view[k] for k in ("id", "model", "version", "target", "state", "reason", "created_by", "created_at",
                                 "updated_at", "finished_at", "devices", "updated", "reverted", "cohorts", "halted_cohorts")}


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[OPERATOR],
             responses={404: {"description": "Unknown model version, group, tag or device."},
                        409: {"description": "A device is already in an unfinished rollout of this model."},
                        422: {"description": "A bad spec: the detail names the field, figure or wave."}})
def create_rollout(spec: ro.RolloutSpec, request: Request, session: Session = Depends(get_session)) -> dict[str, Any]:
    """Create a staged rollout; the engine starts it on its next tick (or it waits paused with ``start_paused``)."""
    actor = get_principal(request).actor
    row = ro.create_rollout(session, spec, actor=actor)
    audit.note(request, target=f"rollout:{row.id}", model=spec.model, version=spec.version,
               **{row.target_kind: row.target_value})
    return ro.rollout_view(session, row)


@router.get("", dependencies=[VIEWER])
def list_rollouts(state: str | None = Query(default=None, description=f"One of {', '.join(ro.STATES)}."),
                  limit: int = Query(default=100, ge=1, le=1000),
                  session: Session = Depends(get_session)) -> list[dict[str, Any]]:
    """Most recent first, without decisions (GET /api/v1/rollouts/{id} has them)."""
    if state is not None and state not in ro.STATES:
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"unknown state {state!r}; use one of {', '.join(ro.STATES)}")
    return [_summary(session, r) for r in ro.list_rollouts(session, state=state, limit=limit)]


@router.get("/{rollout_id}", dependencies=[VIEWER])
def get_rollout(rollout_id: int, devices: bool = Query(default=False, description="Include every device's wave and status."),
                session: Session = Depends(get_session)) -> dict[str, Any]:
    """State, waves with per-cohort progress and gate figures, and every decision with its figures."""
    return ro.rollout_view(session, ro.get_rollout(session, rollout_id), with_devices=devices)


@router.post("/{rollout_id}/pause", dependencies=[OPERATOR])
def pause_rollout(rollout_id: int, request: Request, session: Session = Depends(get_session)) -> dict[str, Any]:
    row = ro.pause(session, rollout_id, actor=get_principal(request).actor)
    audit.note(request, target=f"rollout:{rollout_id}")
    return ro.rollout_view(session, row)


@router.post("/{rollout_id}/resume", dependencies=[OPERATOR])
def resume_rollout(rollout_id: int, request: Request, session: Session = Depends(get_session)) -> dict[str, Any]:
    row = ro.resume(session, rollout_id, actor=get_principal(request).actor)
    audit.note(request, target=f"rollout:{rollout_id}")
    return ro.rollout_view(session, row)


@router.post("/{rollout_id}/approve", dependencies=[OPERATOR])
def approve_rollout(rollout_id: int, request: Request, body: ApproveBody | None = Body(default=None),
                    session: Session = Depends(get_session)) -> dict[str, Any]:
    row = ro.approve(session, rollout_id, actor=get_principal(request).actor, wave=body.wave if body else None)
    audit.note(request, target=f"rollout:{rollout_id}")
    return ro.rollout_view(session, row)


@router.post("/{rollout_id}/abort", dependencies=[OPERATOR])
def abort(rollout_id: int, request: Request, body: AbortBody | None = Body(default=None),
          session: Session = Depends(get_session), publisher: Publisher | None = Depends(get_publisher)) -> dict[str, Any]:
    """Stop for good; shadows end. ``{"rollback": true}`` also returns the updated devices to their previous version."""
    rollback = bool(body.rollback) if body else False
    row = abort_rollout(session, publisher, rollout_id, actor=get_principal(request).actor, rollback=rollback)
    audit.note(request, target=f"rollout:{rollout_id}", rollback=rollback)
    return ro.rollout_view(session, row)
