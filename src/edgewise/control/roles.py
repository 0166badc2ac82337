"""Running a control-plane role without a web server: ``edgewise server --role ingest|engines``.

``api`` and ``all`` serve HTTP through :func:`edgewise.control.server.run_server`; an ``ingest`` worker
only consumes the device stream and an ``engines`` process only runs the once-per-fleet loops (behind
the database lease), so neither opens a port. Both run until SIGTERM or SIGINT, then stop cleanly:
the bus stops taking messages and stores what it took, the lease is released so another process takes
over at once (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import signal
import threading

from .services import ControlServices, ControlStartError
from .settings import ServerSettings

log = logging.getLogger(__name__)


def run_headless(settings: ServerSettings, *, stop: threading.Event | None = None) -> None:
    """Open the services of ``settings.role`` and keep them running until a signal (or ``stop``) says otherwise.

    Raises :class:`ControlStartError` if they cannot start.
    """
    if settings.runs_api:
        raise ControlStartError(f"role {settings.role} serves HTTP: run it with run_server, not run_headless")
    stop = stop or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    if main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda _s, _f: stop.set())
    try:
        services = ControlServices.open(settings)
        log.info("control plane role %s running (MQTT client %s on %s)", settings.role, services.bus.client_id,
                 services.bus.display_url)
        try:
            stop.wait()
        finally:
            log.info("control plane role %s stopping", settings.role)
            services.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
