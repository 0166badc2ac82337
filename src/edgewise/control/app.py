"""The FastAPI application: routers, error mapping, dashboard, and the lifespan that
starts and stops the control plane's services (see ``services.py``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .api import API_PREFIX, api_router
from .api import tuf as tuf_api
from .audit import AuditMiddleware
from .auth import PUBLIC, enforce_declared_rule
from .errors import ControlError
from .metrics import router as metrics_router
from .services import ControlServices
from .settings import ServerSettings

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app. Nothing starts until its lifespan runs (uvicorn, or ``with TestClient(app)``):
    then migrations run, the embedded broker starts if no broker URL is set, and the bus connects.

    Services are at ``app.state.control`` (:class:`ControlServices`) while the app runs;
    a startup failure is also left at ``app.state.startup_error`` for whoever runs the server.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.startup_error = None
        try:
            services = await run_in_threadpool(ControlServices.open, settings)
        except Exception as exc:
            app.state.startup_error = exc
            raise
        app.state.control = services
        log.info("control plane ready: API %s, broker %s", settings.effective_public_url, services.bus.display_url)
        try:
            yield
        finally:
            app.state.control = None
            await run_in_threadpool(services.close)

    app = FastAPI(
        title="edgewise control plane",
        version=__version__,
        description="Devices, signed model bundles, deployments (desired state) and fleet telemetry.",
        lifespan=lifespan,
        dependencies=[Depends(enforce_declared_rule)],  # a route without an access rule is refused (see auth.py)
    )
    app.add_middleware(AuditMiddleware)
    app.state.settings = settings
    app.state.control = None

    @app.exception_handler(ControlError)
    async def _control_error(_request: Request, exc: ControlError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.message, "error": type(exc).__name__})

    app.include_router(api_router())
    app.include_router(tuf_api.router, prefix=API_PREFIX)  # /api/v1/tuf/metadata/{name}, /api/v1/tuf/targets/{path}
    app.include_router(metrics_router)  # GET /metrics, Prometheus text (issue 7 MONITOR)

    @app.get("/", include_in_schema=False, dependencies=[PUBLIC])
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    return app
