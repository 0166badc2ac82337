"""REST API routers under /api/v1: thin wrappers over the plain functions of ``control``."""

from fastapi import APIRouter

from . import auth, deployments, devices, drift, models, provisioning, releases, samples, system, telemetry

API_PREFIX = "/api/v1"


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    for module in (devices, models, deployments, telemetry, system, auth, provisioning, releases, drift, samples):
        router.include_router(module.router)
    return router


__all__ = ["API_PREFIX", "api_router"]
