"""The embedded MQTT broker (amqtt) for zero-setup, single-machine use.

amqtt is asyncio; the control plane's web server runs its own loop and the MQTT
client is threaded, so the broker gets a thread and a loop of its own and nothing
else shares them. It keeps retained messages in memory only: after a restart the
control plane republishes every recorded desired state as soon as its bus connects
(see ``deployments.republish_all``), so devices still find theirs.

For production use Mosquitto or EMQX (set ``broker_url``): amqtt here allows
anonymous clients and has no topic ACLs yet.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any

from .bus import MqttBus

__all__ = ["BrokerStartError", "EmbeddedBroker", "MqttBus"]

log = logging.getLogger(__name__)

# amqtt logs every connection at INFO and its state machine library every transition: keep them
# at WARNING unless the application configured these loggers itself.
QUIET_LOGGERS = ("amqtt", "transitions")


def _quiet_unless_configured(names: tuple[str, ...]) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (typically: its port is taken)."""


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (port 0 = any free port) in a background thread.

    >>> with EmbeddedBroker(port=0) as broker:   # doctest: +SKIP
    ...     broker.url
    'mqtt://127.0.0.1:40123'
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None  # the bound port, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded broker is not running; call start() first")
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.port is not None

    def config(self) -> dict[str, Any]:
        """amqtt 0.12 configuration: one TCP listener, anonymous clients, no $SYS chatter."""
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 10.0) -> str:
        """Start listening; return the broker URL. Raises :class:`BrokerStartError`."""
        if self.running:
            return self.url
        _quiet_unless_configured(QUIET_LOGGERS)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgewise-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerStartError(f"embedded MQTT broker did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise BrokerStartError(
                f"embedded MQTT broker cannot listen on {self.host}:{self.requested_port} ({self._error}); "
                f"if another broker runs there, use it with broker_url=mqtt://{self.host}:{self.requested_port}, "
                "otherwise choose another embedded_broker_port (0 = any free port)"
            ) from self._error
        log.info("embedded MQTT broker listening on %s", self.url)
        return self.url

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._start_broker())
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                self._error = exc.__cause__ or exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            _drain_and_close(loop)

    async def _start_broker(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self.config(), loop=asyncio.get_running_loop())
        await self._broker.start()
        # amqtt has no public accessor for the bound socket; needed to support port 0.
        server = self._broker._servers["default"]  # noqa: SLF001
        self.port = server.instance.sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client and stop listening. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            self.port = None
            return
        if self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("embedded MQTT broker did not shut down cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self.port = None
        self._broker = None
        log.info("embedded MQTT broker stopped")

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop()


def _drain_and_close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel whatever amqtt left running so the loop closes without 'task destroyed' noise."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
