"""Health series of a device and of the fleet (thin routes over :mod:`edgewise.control.series`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy.orm import Session

from .. import series
from ..alerts import groups_module
from ..auth import VIEWER, VIEWER_OR_OWN_DEVICE
from ..devices import get_device, list_devices
from ..errors import InvalidRequestError
from .deps import get_session

router = APIRouter(tags=["series"])

DEFAULT_SPAN_S = 3600.0
METRICS_Q = Query(description="Comma-separated metric names, e.g. latency_p95_ms,error_rate (GET /api/v1/series/metrics lists them)")
SINCE_Q = Query(default=None, description="Epoch seconds; default an hour before `until`.")
UNTIL_Q = Query(default=None, description="Epoch seconds; default now.")


class SeriesOut(BaseModel):
    metrics: dict[str, list[list[Any]]]  # name -> [[t (epoch s), value], ...]
    step: int | str
    since: float
    until: float
    devices: int | None = None  # fleet series: how many devices the selection covers


def _window(since: float | None, until: float | None) -> tuple[float, float]:
    until = time.time() if until is None else until
    return (until - DEFAULT_SPAN_S if since is None else since), until


def _step(step: str, *, allow_raw: bool) -> int | None:
    if step == "raw":
        if not allow_raw:
            raise InvalidRequestError("fleet series come per step: give step=60 (or 300, 3600, ...), not raw")
        return None
    try:
        return int(step)
    except ValueError:
        raise InvalidRequestError(f"step {step!r}: use 'raw' or seconds, a multiple of 60 (60, 300, 3600)") from None


@router.get("/series/metrics", response_model=dict[str, str], dependencies=[VIEWER])
def known_metrics() -> dict[str, str]:
    """Every metric name a series query accepts, and what it means."""
    return dict(series.METRICS)


@router.get("/devices/{device_id}/series", response_model=SeriesOut, dependencies=[VIEWER_OR_OWN_DEVICE])
def device_series(device_id: str, metrics: str = METRICS_Q, since: float | None = SINCE_Q, until: float | None = UNTIL_Q,
                  step: str = Query(default="60", description="'raw' (every record, kept raw_retention) or seconds (multiple of 60)"),
                  session: Session = Depends(get_session)) -> SeriesOut:
    """One device's series: raw records or per-minute rollups added up per step."""
    get_device(session, device_id)
    names = series.check_metrics(metrics.split(","))
    s, u = _window(since, until)
    st = _step(step, allow_raw=True)
    data = series.device_series(session, device_id, names, since=s, until=u, step=st)
    return SeriesOut(metrics=data, step=st if st is not None else "raw", since=s, until=u)


@router.get("/fleet/series", response_model=SeriesOut, dependencies=[VIEWER])
def fleet_series(metrics: str = METRICS_Q, group: str | None = Query(default=None, max_length=64),
                 tag: str | None = Query(default=None, max_length=64), since: float | None = SINCE_Q,
                 until: float | None = UNTIL_Q, step: str = Query(default="60", description="seconds, a multiple of 60"),
                 session: Session = Depends(get_session)) -> SeriesOut:
    """Series over the fleet, a group (its members now) or a tag: rates add up, latencies average."""
    if group is not None and tag is not None:
        raise InvalidRequestError("give group or tag, not both")
    names = series.check_metrics(metrics.split(","))
    ids: list[str] | None = None
    if group is not None:
        groups = groups_module()
        devices = list(groups.resolve(session, group)) if groups is not None else list_devices(session, tag=group)
        ids = [d.id for d in devices]
    elif tag is not None:
        ids = [d.id for d in list_devices(session, tag=tag)]
    s, u = _window(since, until)
    st = _step(step, allow_raw=False)
    assert st is not None
    data = series.fleet_series(session, ids, names, since=s, until=u, step=st)
    return SeriesOut(metrics=data, step=st, since=s, until=u, devices=len(ids) if ids is not None else None)
