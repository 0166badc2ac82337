"""REST API routers under /api/v1: thin wrappers over the plain functions of ``control``."""

from fastapi import APIRouter

from . import auth, deployments, devices, drift, models, provisioning, releases, samples, system, telemetry
from . import groups  # issue 7 TARGET
from . import rollouts  # issue 7 ROLLOUT
from . import placements  # issue 7 HOST
from . import alerts, series  # issue 7 MONITOR
from . import commands  # issue 6: cmd/ (adapt, drift.reset)
from . import fl  # issue 8 FL-SYSTEM: /fl/jobs
from . import privacy  # issue 8 FL2: /privacy

API_PREFIX = "/api/v1"


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    for module in (devices, models, deployments, telemetry, system, auth, provisioning, releases, drift, samples):
        router.include_router(module.router)
    router.include_router(groups.router)  # issue 7 TARGET: /groups, /devices/{id}/variant
    router.include_router(rollouts.router)  # issue 7 ROLLOUT: /rollouts
    router.include_router(placements.router)  # issue 7 HOST: /devices/{id}/placements
    router.include_router(alerts.router)  # issue 7 MONITOR: /alerts, /alert-rules
    router.include_router(series.router)  # issue 7 MONITOR: /devices/{id}/series, /fleet/series
    router.include_router(commands.router)  # /devices/{id}/commands
    router.include_router(fl.router)  # issue 8 FL-SYSTEM: /fl/jobs
    router.include_router(privacy.router)  # issue 8 FL2: /privacy (telemetry privacy per device/tag/group)
    return router


__all__ = ["API_PREFIX", "api_router"]
