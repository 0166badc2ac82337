"""Start and stop everything behind the HTTP API: database, registry, broker, bus, ingest.

Kept apart from ``app.py`` so the order of startup and shutdown is in one place and
so scripts and tests can run the control plane's machinery without a web server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..security import KeyFileError, TrustedKeys
from .broker import BrokerAccess, EmbeddedBroker
from .mosquitto import ManagedMosquitto
from .provisioning import Provisioning
from .auth import bootstrap
from .bus import MqttBus
from .db import Database, init_db
from .deployments import republish_all
from .ingest import Ingest
from .registry import Registry
from .settings import ServerSettings
from .tuf_service import TufService

if TYPE_CHECKING:
    from .lease import Lease
    from .alerts import MonitorEngine
    from .rollout_engine import RolloutEngine
    from .fl import FLEngine

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
    tuf: TufService | None = None
    provisioning: "Provisioning | None" = None
    mosquitto: "ManagedMosquitto | None" = None
    rollouts: "RolloutEngine | None" = None  # staged rollouts (part ROLLOUT): started last, stopped first
    monitor: "MonitorEngine | None" = None  # series rollups, retention, alert rules, webhooks (part MONITOR)
    fl: "FLEngine | None" = None  # federated-learning rounds (issue 8, part FL-SYSTEM; control.fl)
    leases: "list[Lease] | None" = None  # issue 9 SCALE: engines + drift-judge leases held (or sought) by this process

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
        try:
            settings.check_role()
        except ValueError as exc:
            raise ControlStartError(str(exc)) from None
        if len(trusted) == 0:
            log.warning("no trusted keys configured (--trust): bundle uploads will be refused")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            db = init_db(settings.effective_database_url)
        except Exception as exc:
            raise ControlStartError(f"cannot open or migrate the database {settings.effective_database_url}: {exc}") from exc
        broker: EmbeddedBroker | None = None
        tuf: TufService | None = None
        mosquitto: ManagedMosquitto | None = None
        from .lease import DRIFT_JUDGE, ENGINES, Lease

        lease_options: dict[str, object] = {"ttl_s": settings.lease_ttl_s, "renew_s": settings.lease_renew_s}
        if settings.role == "all":  # a restarted single process takes its own lease back at once, not after the TTL
            import socket

            lease_options["holder"] = f"{socket.gethostname()}:{settings.role_client_id}"
        engines_lease = Lease(db, ENGINES, **lease_options) if settings.runs_engines else None  # type: ignore[arg-type]
        judge_lease = Lease(db, DRIFT_JUDGE, **lease_options) if settings.runs_ingest else None  # type: ignore[arg-type]
        leases = [x for x in (engines_lease, judge_lease) if x is not None]
        try:
            if settings.runs_api:  # ingest workers and the engines process need no admin (issue 9 SCALE)
                _bootstrap(db, settings)
            for lease in leases:
                lease.start()
            registry = Registry(settings.bundles_dir, trusted, max_upload_bytes=settings.max_upload_bytes)
            tuf = _open_tuf(settings, db, engines_lease)
            registry.tuf = tuf
            ingest = Ingest(db)
            ingest.drift.lease = judge_lease
            ca = _open_ca(settings)
            bus_options: dict[str, object] = {}
            access: BrokerAccess | None = None
            if settings.mosquitto:
                mosquitto, bus_options = _start_mosquitto(settings, db, ca)
                broker_url = mosquitto.url
            elif settings.embedded_broker:
                access = BrokerAccess(_device_token_checker(db), require_auth=settings.embedded_broker_auth == "devices")
                broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port, access=access)
                try:
                    broker_url = broker.start()
                except RuntimeError as exc:
                    raise ControlStartError(str(exc)) from exc
                bus_options = {"username": access.control_username, "password": access.control_password,
                               "protocol": 4}  # amqtt speaks MQTT 3.1.1 only (paho's MQTTv311 == 4)
            else:
                assert settings.broker_url is not None
                broker_url = settings.broker_url
                bus_options = _external_tls(settings)
            provisioning = _provisioning(settings, ca, broker_url, mosquitto)

            def republish() -> None:  # runs on every (re)connect, after `bus` below is bound
                _republish(db, bus)

            bus = MqttBus(
                broker_url, ingest.handle, on_batch=ingest.handle_many if settings.runs_ingest else None,
                on_connected=republish if settings.runs_engines else None,
                **_role_bus_options(settings), **bus_options,  # type: ignore[arg-type]
            )
            services = cls(settings, db, registry, ingest, bus, broker, broker_url, tuf, provisioning, mosquitto)
            services.leases = leases
            ingest.publisher = bus
            bus.start()
        except BaseException:
            for lease in leases:
                lease.stop()
            if tuf is not None:
                tuf.stop()
            if broker is not None:
                broker.stop()
            if mosquitto is not None:
                mosquitto.stop()
            db.dispose()
            raise
        if not bus.wait_connected(BUS_CONNECT_WAIT_S):
            log.warning("MQTT broker %s not reachable yet; the API runs and the bus keeps retrying", bus.display_url)
            if settings.role == "ingest":
                log.warning("an ingest worker speaks MQTT v5 for shared subscriptions: if %s is an amqtt broker (the "
                            "embedded one of another control plane), it never answers; use Mosquitto >= 2.0 or EMQX",
                            bus.display_url)
        if not settings.runs_engines:
            log.info("role %s: the rollout, monitor and federated-learning engines run in the engines process",
                     settings.role)
            return services
        from .rollout_engine import RolloutEngine

        services.rollouts = RolloutEngine(db, bus, tick_s=settings.rollout_tick_s)
        services.rollouts.lease = engines_lease
        services.rollouts.start()
        from .alerts import MonitorEngine

        services.monitor = MonitorEngine(
            db, tick_s=settings.monitor_tick_s, raw_retention=settings.raw_retention,
            rollup_retention=settings.rollup_retention, webhooks=settings.alert_webhooks,
            ingest_messages=lambda: ingest.stats().messages,
        )
        services.monitor.lease = engines_lease
        services.monitor.start()
        from .fl import FLEngine

        services.fl = FLEngine(db, bus, registry, signing_key=settings.fl_signing_key, tick_s=settings.fl_tick_s)
        services.fl.lease = engines_lease
        services.fl.start()
        return services

    def close(self) -> None:
        """Stop in reverse order: no new messages, then no broker, then no database."""
        if self.fl is not None:
            self.fl.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.tuf is not None:
            self.tuf.stop()
        self.bus.stop()
        for lease in self.leases or []:  # released: another process takes over at its next renewal
            lease.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.mosquitto is not None:
            self.mosquitto.stop()
        self.db.dispose()


def _open_tuf(settings: ServerSettings, db: Database, lease: "Lease | None" = None) -> TufService:
    """The TUF repository (created on first start), its targets for every stored bundle, its refresher running
    where the engines run (re-signing only while ``lease`` is held; issue 9 SCALE)."""
    from datetime import timedelta

    from ..security.tuf_repo import Expiry, TufRepoError
    from .tuf_service import SESSION_KEY

    try:
        expiry = Expiry(**{role: timedelta(days=d) for role, d in settings.tuf_expiry_days.items()})
    except TypeError as exc:
        raise ControlStartError(f"tuf_expiry_days: {exc}; roles are root, targets, snapshot, timestamp") from None
    try:
        tuf = TufService.open(
            settings.data_dir, settings.bundles_dir, root_keys=settings.tuf_root_keys, threshold=settings.tuf_root_threshold,
            expiry=expiry, online_keys=settings.tuf_online_keys, refresh_interval_s=settings.tuf_refresh_interval_s,
        )
        db.sessionmaker.configure(info={SESSION_KEY: tuf})  # deploy() names (and signs rollback) targets through it
        if settings.runs_engines:  # the process that re-signs TUF metadata; not every API and ingest process at once
            with db.session() as session:
                tuf.backfill(session)
    except (TufRepoError, OSError) as exc:
        raise ControlStartError(f"cannot open the TUF repository in {settings.data_dir / 'tuf'}: {exc}") from exc
    if settings.runs_engines:
        tuf.lease = lease
        tuf.start()
    return tuf


def _role_bus_options(settings: ServerSettings) -> dict[str, object]:
    """How this role's bus connects (issue 9 SCALE, docs/scale-out.md).

    ``all``: today's subscriptions under one persistent session. ``ingest``: the same topics as MQTT v5 shared
    subscriptions (``$share/<group>/...``, the broker hands each message to one worker of the group), MQTT v5 also
    on plain mqtt://, a persistent session of its own. ``api`` and ``engines``: publish only, no session to keep.
    """
    from ..protocol import topics

    if settings.role == "all":
        return {"client_id": settings.role_client_id, "persistent": True}
    if settings.role == "ingest":
        import paho.mqtt.client as paho

        shared = tuple(f"$share/{settings.ingest_group}/{t}" for t in topics.CONTROL_SUBSCRIPTIONS)
        return {"client_id": settings.role_client_id, "persistent": True, "subscriptions": shared,
                "protocol": paho.MQTTv5}
    return {"client_id": settings.role_client_id, "persistent": False, "subscriptions": ()}


def _bootstrap(db: Database, settings: ServerSettings) -> None:
    """First start: user admin + <data_dir>/admin.token. Several API processes starting at once on an empty
    database: one creates the admin, the others find it (their insert loses on the unique name)."""
    from sqlalchemy.exc import IntegrityError

    try:
        with db.session() as session:
            bootstrap(session, settings.data_dir)
    except IntegrityError:
        log.info("another control-plane process created the first admin at the same moment; using theirs")


def _republish(db: Database, bus: MqttBus) -> None:
    with db.session() as session:
        n = republish_all(session, bus)
    if n:
        log.info("republished %d desired state(s) after connecting to the broker", n)


# -- device identity: fleet CA, Mosquitto with mTLS, enrollment (docs/security-identity.md) ----------


def _open_ca(settings: ServerSettings):  # type: ignore[no-untyped-def]
    """The fleet CA: its key in the configured keystore (created on first start), its certificate in data_dir/ca."""
    from ..security.ca import CAError, FleetCA
    from ..security.keystore import KeystoreError, open_keystore

    try:
        return FleetCA.open(open_keystore(settings.effective_ca_keystore), settings.data_dir / "ca")
    except (CAError, KeystoreError, OSError) as exc:
        raise ControlStartError(f"cannot open the fleet CA ({settings.effective_ca_keystore}): {exc}") from None


def _start_mosquitto(settings: ServerSettings, db: Database, ca) -> tuple[ManagedMosquitto, dict[str, object]]:  # type: ignore[no-untyped-def]
    """Write the Mosquitto configuration (TLS, ACL, current CRL), start it, and say how the bus connects."""
    from .mosquitto import MosquittoError, write_config
    from .provisioning import current_crl, revoked_device_ids

    with db.session() as session:
        crl, revoked = current_crl(session, ca), revoked_device_ids(session)
    try:
        files = write_config(ca, settings.mosquitto_dir, crl, host=settings.mosquitto_host, port=settings.mosquitto_port,
                             revoked_ids=revoked)
        mosquitto = ManagedMosquitto(files)
        mosquitto.start()
    except (MosquittoError, OSError) as exc:
        raise ControlStartError(f"cannot start Mosquitto: {exc}") from None
    return mosquitto, {"tls_files": (str(files.ca), str(files.control_cert), str(files.control_key))}


def _external_tls(settings: ServerSettings) -> dict[str, object]:
    """An external mqtts:// broker run from our generated config: present the control plane's certificate."""
    from .mosquitto import CA_FILE, CONTROL_CERT, CONTROL_KEY

    d = settings.mosquitto_dir
    if (settings.broker_url or "").startswith(("mqtts:", "ssl:")) and (d / CONTROL_CERT).exists():
        return {"tls_files": (str(d / CA_FILE), str(d / CONTROL_CERT), str(d / CONTROL_KEY))}
    return {}


def _provisioning(settings: ServerSettings, ca, broker_url: str, mosquitto: ManagedMosquitto | None) -> Provisioning:  # type: ignore[no-untyped-def]
    from urllib.parse import urlsplit

    from . import mosquitto as mq

    device_url = settings.device_broker_url
    if device_url is None:
        if settings.embedded_broker:
            host = urlsplit(settings.effective_public_url).hostname or "127.0.0.1"
            device_url = f"mqtt://{host}:{urlsplit(broker_url).port}"
        else:
            device_url = broker_url
    if mosquitto is not None:
        return Provisioning(ca, device_url, mosquitto_dir=mosquitto.files.directory, reload_broker=mosquitto.reload)
    if (settings.mosquitto_dir / mq.CONF_FILE).exists():  # an external Mosquitto run from our generated config
        d = settings.mosquitto_dir
        return Provisioning(ca, device_url, mosquitto_dir=d, reload_broker=lambda: mq.reload(d))
    return Provisioning(ca, device_url)


def _device_token_checker(db: Database):  # type: ignore[no-untyped-def]
    """For the embedded broker: is ``token`` a live device token of ``device_id``?"""
    from .auth import resolve_token

    def check(device_id: str, token: str) -> bool:
        with db.session() as session:
            principal = resolve_token(session, token)
        return principal is not None and principal.kind == "device" and principal.name == device_id

    return check
