"""Start and stop everything behind the HTTP API: database, registry, broker, bus, ingest.

Kept apart from ``app.py`` so the order of startup and shutdown is in one place and
so scripts and tests can run the control plane's machinery without a web server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..security import KeyFileError, TrustedKeys
from .broker import EmbeddedBroker
from .bus import MqttBus
from .db import Database, init_db
from .deployments import republish_all
from .ingest import Ingest
from .registry import Registry
from .settings import ServerSettings

log = logging.getLogger(__name__)

BUS_CONNECT_WAIT_S = 5.0


class ControlStartError(RuntimeError):
    """The control plane cannot start; the message says which part failed and why."""


@dataclass
class ControlServices:
    settings: ServerSettings
    db: Database
    registry: Registry
    ingest: Ingest
    bus: MqttBus
    broker: EmbeddedBroker | None
    broker_url: str

    @classmethod
    def open(cls, settings: ServerSettings) -> "ControlServices":
        """Migrate the database, start the embedded broker if configured, connect the bus.

        An external broker that is down does not stop startup: the bus keeps retrying
        and the API works meanwhile (deployments are recorded and go out on connect).
        """
        try:
            trusted = TrustedKeys.from_paths(settings.trust)
        except KeyFileError as exc:
            raise ControlStartError(f"cannot load a trusted key: {exc}") from None
        if len(trusted) == 0:
            log.warning("no trusted keys configured (--trust): bundle uploads will be refused")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            db = init_db(settings.effective_database_url)
        except Exception as exc:
            raise ControlStartError(f"cannot open or migrate the database {settings.effective_database_url}: {exc}") from exc
        broker: EmbeddedBroker | None = None
        try:
            registry = Registry(settings.bundles_dir, trusted, max_upload_bytes=settings.max_upload_bytes)
            ingest = Ingest(db)
            if settings.embedded_broker:
                broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port)
                try:
                    broker_url = broker.start()
                except RuntimeError as exc:
                    raise ControlStartError(str(exc)) from exc
            else:
                assert settings.broker_url is not None
                broker_url = settings.broker_url

            def republish() -> None:  # runs on every (re)connect, after `bus` below is bound
                _republish(db, bus)

            bus = MqttBus(
                broker_url, ingest.handle, on_connected=republish,
                client_id=settings.effective_mqtt_client_id, persistent=True,
            )
            services = cls(settings, db, registry, ingest, bus, broker, broker_url)
            ingest.publisher = bus
            bus.start()
        except BaseException:
            if broker is not None:
                broker.stop()
            db.dispose()
            raise
        if not bus.wait_connected(BUS_CONNECT_WAIT_S):
            log.warning("MQTT broker %s not reachable yet; the API runs and the bus keeps retrying", bus.display_url)
        return services

    def close(self) -> None:
        """Stop in reverse order: no new messages, then no broker, then no database."""
        self.bus.stop()
        if self.broker is not None:
            self.broker.stop()
        self.db.dispose()


def _republish(db: Database, bus: MqttBus) -> None:
    with db.session() as session:
        n = republish_all(session, bus)
    if n:
        log.info("republished %d desired state(s) after connecting to the broker", n)
