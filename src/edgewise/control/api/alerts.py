"""Alerts and alert rules (thin routes over :mod:`edgewise.control.alerts`): viewers read, operators
acknowledge, resolve and edit rules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from .. import alerts as al
from ..auth import OPERATOR, VIEWER, Principal
from .deps import get_principal, get_session

router = APIRouter(tags=["alerts"])


class AlertOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    severity: str
    status: str  # firing | acknowledged | resolved
    subject: str | None
    rule_id: int | None
    model: str | None
    version: str | None
    device_id: str | None
    message: str
    detail: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None


@router.get("/alerts", response_model=list[AlertOut], dependencies=[VIEWER])
def list_alerts(
    status: str | None = Query(default=None, pattern="^(firing|acknowledged|resolved|open)$",
                               description="firing, acknowledged, resolved, or open (= firing or acknowledged)"),
    kind: str | None = Query(default=None, max_length=64, description="Kind prefix, e.g. 'drift.', 'alert.', 'monitor.'"),
    device_id: str | None = Query(default=None, max_length=64),
    rule_id: int | None = Query(default=None),
    limit: int = Query(default=200, ge=1, le=10_000),
    session: Session = Depends(get_session),
) -> list[AlertOut]:
    """Alerts, newest first: from rules, fleet drift, and the devices themselves."""
    rows = al.list_alerts(session, status=status, kind_prefix=kind, device_id=device_id, rule_id=rule_id, limit=limit)
    return [AlertOut.model_validate(a) for a in rows]


@router.get("/alerts/{alert_id}", response_model=AlertOut, dependencies=[VIEWER])
def get_alert(alert_id: int, session: Session = Depends(get_session)) -> AlertOut:
    return AlertOut.model_validate(al.get_alert(session, alert_id))


@router.post("/alerts/{alert_id}/ack", response_model=AlertOut, dependencies=[OPERATOR])
def acknowledge(alert_id: int, session: Session = Depends(get_session),
                principal: Principal = Depends(get_principal)) -> AlertOut:
    """Firing → acknowledged: someone is on it. It resolves by itself when the condition stops."""
    return AlertOut.model_validate(al.acknowledge(session, alert_id, principal.actor))


@router.post("/alerts/{alert_id}/resolve", response_model=AlertOut, dependencies=[OPERATOR])
def resolve(alert_id: int, session: Session = Depends(get_session),
            principal: Principal = Depends(get_principal)) -> AlertOut:
    """Resolve by hand (e.g. a device-raised alert whose device never reports it cleared); a rule's
    alert whose condition still holds fires again at the next check."""
    return AlertOut.model_validate(al.resolve_by_hand(session, alert_id, principal.actor))


@router.get("/alert-rules", response_model=list[al.RuleOut], dependencies=[VIEWER])
def list_rules(session: Session = Depends(get_session)) -> list[al.RuleOut]:
    return [al.RuleOut.of(r) for r in al.list_rules(session)]


@router.post("/alert-rules", response_model=al.RuleOut, status_code=201, dependencies=[OPERATOR])
def create_rule(spec: al.RuleIn, session: Session = Depends(get_session)) -> al.RuleOut:
    """A new rule, checked from the monitor's next tick on."""
    return al.RuleOut.of(al.create_rule(session, spec))


@router.get("/alert-rules/{rule_id}", response_model=al.RuleOut, dependencies=[VIEWER])
def get_rule(rule_id: int, session: Session = Depends(get_session)) -> al.RuleOut:
    return al.RuleOut.of(al.get_rule(session, rule_id))


@router.put("/alert-rules/{rule_id}", response_model=al.RuleOut, dependencies=[OPERATOR])
def update_rule(rule_id: int, spec: al.RuleIn, session: Session = Depends(get_session)) -> al.RuleOut:
    """Replace a rule; its open alerts are resolved and its conditions judged afresh."""
    return al.RuleOut.of(al.update_rule(session, rule_id, spec))


@router.delete("/alert-rules/{rule_id}", status_code=204, dependencies=[OPERATOR])
def delete_rule(rule_id: int, session: Session = Depends(get_session)) -> Response:
    """Delete a rule (its open alerts are resolved; the history stays)."""
    al.delete_rule(session, rule_id)
    return Response(status_code=204)
