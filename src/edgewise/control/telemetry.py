"""Reading the telemetry and event time series back (writing is ``ingest.py``'s job)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import EventRow, SummaryRow, TelemetryRow


def inference_rate(row: TelemetryRow) -> float | None:
    """Inferences per second over the sample's own window (not affected by clock skew)."""
    if not row.window_s or row.window_s <= 0:
        return None
    return row.window_inferences / row.window_s


def latest_per_device(session: Session, device_ids: list[str] | None = None) -> dict[str, TelemetryRow]:
    """The newest sample (highest seq) of each device; late redeliveries never count as newest."""
    newest = select(TelemetryRow.device_id, func.max(TelemetryRow.seq).label("seq")).group_by(TelemetryRow.device_id)
    if device_ids is not None:
        newest = newest.where(TelemetryRow.device_id.in_(device_ids))
    sub = newest.subquery()
    rows = session.scalars(
        select(TelemetryRow).join(sub, (TelemetryRow.device_id == sub.c.device_id) & (TelemetryRow.seq == sub.c.seq))
    ).all()
    return {r.device_id: r for r in rows}


def series(session: Session, device_id: str, limit: int = 100) -> list[TelemetryRow]:
    """The last ``limit`` samples of a device, oldest first (ready to plot)."""
    rows = session.scalars(
        select(TelemetryRow).where(TelemetryRow.device_id == device_id).order_by(TelemetryRow.seq.desc()).limit(limit)
    ).all()
    return list(reversed(rows))


def recent_events(session: Session, device_id: str, limit: int = 100) -> list[EventRow]:
    """The last ``limit`` events of a device, newest first (as a log reads)."""
    return list(
        session.scalars(
            select(EventRow).where(EventRow.device_id == device_id).order_by(EventRow.seq.desc()).limit(limit)
        ).all()
    )


def recent_summaries(session: Session, device_id: str, limit: int = 100) -> list[SummaryRow]:
    """The last ``limit`` summaries of a device, oldest first (ready to plot)."""
    rows = session.scalars(
        select(SummaryRow).where(SummaryRow.device_id == device_id).order_by(SummaryRow.seq.desc()).limit(limit)
    ).all()
    return list(reversed(rows))


def count_rows(session: Session) -> dict[str, int]:
    return {
        "telemetry": session.scalar(select(func.count()).select_from(TelemetryRow)) or 0,
        "events": session.scalar(select(func.count()).select_from(EventRow)) or 0,
        "summaries": session.scalar(select(func.count()).select_from(SummaryRow)) or 0,
    }
