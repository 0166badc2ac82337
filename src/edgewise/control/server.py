"""Running the control plane: in the foreground (``edgewise server``) or in a background
thread (:class:`ControlPlane`, for the demo, the simulator and end-to-end tests)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .services import ControlServices, ControlStartError
from .settings import ServerSettings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5
NOISY_LOGGERS = ("amqtt", "transitions", "edgewise.control.bus.paho")


def configure_logging(level: str = "info") -> None:
    """One line per record on stderr; quiet the embedded broker's chatty internals."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    root.setLevel(lvl)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING))


def _uvicorn_server(app: FastAPI, settings: ServerSettings, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,  # keep the process's logging as configure_logging() set it
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    return uvicorn.Server(config)


class _Terminated(Exception):
    pass


def _raise_terminated(_sig: int, _frame: object) -> None:
    raise _Terminated()


def run_server(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then shut down cleanly (HTTP drained,
    bus disconnected, embedded broker stopped, database closed) and return normally.

    Raises :class:`ControlStartError` if the server could not start.
    """
    configure_logging(log_level)
    try:
        settings.check_transport()
    except ValueError as exc:
        raise ControlStartError(str(exc)) from None
    app = create_app(settings)
    server = _uvicorn_server(app, settings, log_level)
    # uvicorn handles SIGINT/SIGTERM while serving, shuts down cleanly, then re-raises the signal
    # against the handlers that were there before: make that a normal return, not a traceback or a kill.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        server.run()
    except (KeyboardInterrupt, _Terminated):
        log.info("control plane stopped by signal")
    except SystemExit:  # uvicorn exits the process when startup fails; say why instead
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        cause = getattr(app.state, "startup_error", None)
        raise ControlStartError(
            f"the control plane did not start: {cause}" if cause else
            f"the control plane did not start (is port {settings.port} on {settings.host} free?); see the log above"
        )


class ControlPlane:
    """The whole control plane in a background thread.

    >>> with ControlPlane(ServerSettings(data_dir=tmp, port=0, embedded_broker_port=0, trust=[pub])) as cp:  # doctest: +SKIP
    ...     httpx.get(cp.url + "/api/v1/health").json()["status"]
    'ok'

    ``start()`` returns once the HTTP port answers and the MQTT bus is connected and
    subscribed. Ports set to 0 are chosen free; after ``start()`` :attr:`settings` holds
    the resolved ports, so ``settings.effective_broker_url`` and :attr:`url` are usable.
    """

    def __init__(self, settings: ServerSettings, *, log_level: str = "warning") -> None:
        self.settings = settings
        self.log_level = log_level
        self._app: FastAPI | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """Base URL to reach the HTTP API locally, e.g. ``http://127.0.0.1:41234``."""
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.settings.tls else 'http'}://{host}:{self.settings.port}"

    @property
    def services(self) -> ControlServices:
        """Database, registry, ingest, bus and broker of the running server."""
        services = self._app.state.control if self._app is not None else None
        if services is None:
            raise RuntimeError("the control plane is not running; call start() first")
        return services

    @property
    def admin_token(self) -> str:
        """The bootstrap admin API token (``<data_dir>/admin.token``), for the simulator, the demo and tests."""
        path = self.settings.data_dir / "admin.token"
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise RuntimeError(
                f"{path} does not exist: the admin token is written only on the first start of an empty database; "
                "create a token with `edgewise token create --data-dir ... --user admin`"
            ) from None

    def issue_device_token(self, device_id: str) -> str:
        """A new device token for ``device_id`` (write it to the agent's state/keys/device.token)."""
        from .auth import issue_device_token

        with self.services.db.session() as session:
            return issue_device_token(session, device_id)

    @property
    def broker_url(self) -> str:
        """The MQTT broker devices should connect to (embedded or external)."""
        return self.services.broker_url

    def start(self, timeout: float = 30.0) -> "ControlPlane":
        if self._thread is not None and self._thread.is_alive():
            return self
        try:
            self.settings.check_transport()
        except ValueError as exc:
            raise ControlStartError(str(exc)) from None
        # Bind here, not in uvicorn: port 0 then resolves before the app (and public_url) is built.
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError as exc:
            sock.close()
            raise ControlStartError(
                f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror}); use another port (0 = any free)"
            ) from None
        self._sock = sock
        self.settings = self.settings.model_copy(update={"port": sock.getsockname()[1]})
        self._app = create_app(self.settings)
        self._server = _uvicorn_server(self._app, self.settings, self.log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="edgewise-control-plane", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                cause = self._app.state.startup_error
                self._cleanup()
                raise ControlStartError(f"the control plane did not start: {cause or 'see the log'}")
            services = self._app.state.control
            if self._server.started and services is not None and services.bus.wait_connected(0.05):
                if services.broker is not None and services.broker.port is not None:
                    # Port 0 resolved: settings.effective_broker_url now names the real broker.
                    self.settings = self.settings.model_copy(update={"embedded_broker_port": services.broker.port})
                log.info("control plane running at %s (broker %s)", self.url, services.bus.display_url)
                return self
            time.sleep(0.02)
        self.stop()
        raise ControlStartError(f"the control plane did not become ready within {timeout:.0f} s (broker unreachable?)")

    def stop(self, timeout: float = 15.0) -> None:
        """Shut down cleanly (lifespan shutdown stops the bus, the broker and the database). Idempotent."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("control plane thread did not stop within %.0f s", timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._thread = None

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
