"""The control plane: registry, deployments (desired state), ingest, REST API, dashboard.

Needs the ``server`` extra (FastAPI, SQLAlchemy, Alembic, amqtt). Never imports the agent:
the two meet only in :mod:`edgewise.protocol`.

Entry points:
    ServerSettings      configuration (``ServerSettings.from_env(**cli_options)``)
    create_app          the FastAPI app (services start in its lifespan)
    run_server          serve in the foreground until SIGINT/SIGTERM
    ControlPlane        the same in a background thread (demo, simulator, tests)
"""

from .app import create_app
from .server import ControlPlane, configure_logging, run_server
from .services import ControlServices, ControlStartError
from .settings import ServerSettings

__all__ = [
    "ControlPlane",
    "ControlServices",
    "ControlStartError",
    "ServerSettings",
    "configure_logging",
    "create_app",
    "run_server",
]
