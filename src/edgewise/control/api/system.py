"""/api/v1/health: is the server up, can it reach its database and its broker."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import text

from ... import __version__
from ..auth import PUBLIC
from ..bus import redact_url
from ..schemas import HealthOut, MqttStatus
from ..services import ControlServices
from .deps import get_services

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthOut, dependencies=[PUBLIC])
def health(services: ControlServices = Depends(get_services)) -> HealthOut:
    """``status`` is ``degraded`` while the database or the broker is unreachable (the API still answers)."""
    try:
        with services.db.session() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception:
        database = "error"
    connected = services.bus.connected
    return HealthOut(
        status="ok" if database == "ok" and connected else "degraded",
        version=__version__,
        database=database,  # type: ignore[arg-type]
        mqtt=MqttStatus(broker_url=redact_url(services.broker_url), embedded=services.broker is not None, connected=connected),
        public_url=services.settings.effective_public_url,
    )
