"""Server configuration: one object that says where data lives and which broker to use.

Plain pydantic (``pydantic-settings`` is not a dependency): :meth:`ServerSettings.from_env`
reads the few ``EDGEWISE_*`` variables an operator is likely to set in a container,
and explicit keyword arguments (what the CLI passes) win over them.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "EDGEWISE_"
# Tests and development only: a database URL with "{key}", one database per data dir (created if missing).
DATABASE_URL_TEMPLATE_ENV = "EDGEWISE_DATABASE_URL_TEMPLATE"
# Env var suffix -> field name. Lists (trust) are separated by os.pathsep, like PATH.
_ENV_FIELDS = {
    "DATA_DIR": "data_dir",
    "DATABASE_URL": "database_url",
    "BROKER_URL": "broker_url",
    "EMBEDDED_BROKER_HOST": "embedded_broker_host",
    "EMBEDDED_BROKER_PORT": "embedded_broker_port",
    "HOST": "host",
    "PORT": "port",
    "PUBLIC_URL": "public_url",
    "TRUST": "trust",
    "MAX_UPLOAD_MB": "max_upload_mb",
    "MQTT_CLIENT_ID": "mqtt_client_id",
    "TLS_CERT": "tls_cert",
    "TLS_KEY": "tls_key",
    "INSECURE_HTTP": "insecure_http",
    "CA_KEYSTORE": "ca_keystore",
    "MOSQUITTO": "mosquitto",
    "MOSQUITTO_HOST": "mosquitto_host",
    "MOSQUITTO_PORT": "mosquitto_port",
    "DEVICE_BROKER_URL": "device_broker_url",
    "EMBEDDED_BROKER_AUTH": "embedded_broker_auth",
    "ROLLOUT_TICK_S": "rollout_tick_s",
    "FL_SIGNING_KEY": "fl_signing_key",
    "FL_TICK_S": "fl_tick_s",
    "RAW_RETENTION": "raw_retention",
    "ROLLUP_RETENTION": "rollup_retention",
    "METRICS_TOKEN": "metrics_token",
    "ALERT_WEBHOOKS": "alert_webhooks",  # space- or comma-separated URLs
    "MONITOR_TICK_S": "monitor_tick_s",
    "TUF_ONLINE_KEYS": "tuf_online_keys",
    "TUF_REFRESH_INTERVAL_S": "tuf_refresh_interval_s",
    # issue 9 SCALE (docs/scale-out.md)
    "ROLE": "role",
    "WORKER_ID": "worker_id",
    "INGEST_GROUP": "ingest_group",
    "LEASE_TTL_S": "lease_ttl_s",
    "LEASE_RENEW_S": "lease_renew_s",
}
ROLES = ("all", "api", "ingest", "engines")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ServerSettings(BaseModel):
    """Everything the control plane needs to start; only configuration differs between
    a laptop (SQLite + embedded broker) and production (PostgreSQL + Mosquitto/EMQX)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_dir: Path = Field(default=Path("edgewise-data"), description="Database (SQLite) and uploaded bundles live here.")
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; default sqlite:///{data_dir}/edgewise.db."
    )
    broker_url: str | None = Field(
        default=None, description="mqtt://[user:pass@]host:port of an external broker; None starts the embedded amqtt broker."
    )
    embedded_broker_host: str = Field(default="127.0.0.1", description="Address the embedded broker listens on.")
    embedded_broker_port: int = Field(default=1883, ge=0, le=65535, description="0 picks a free port.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on (non-loopback needs TLS or insecure_http).")
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port (ControlPlane only).")
    public_url: str | None = Field(
        default=None, description="Base URL devices download artifacts from; default http://{host}:{port}."
    )
    trust: list[Path] = Field(
        default_factory=list,
        description="Public keys (files or directories of .pub/.pem) that uploaded bundles must be signed by.",
    )
    max_upload_mb: float = Field(default=512.0, gt=0, description="Largest bundle or release upload accepted, in MiB.")
    mqtt_client_id: str | None = Field(
        default=None,
        description="The bus's MQTT client id. It keeps a persistent session, so an external broker queues what "
        "devices send while the control plane is down. Default: edgewise-control-<hash of data_dir>.",
    )

    tuf_root_keys: int = Field(default=1, ge=1, le=16, description="Root keys created when the TUF repository is first made.")
    tuf_root_threshold: int = Field(default=1, ge=1, le=16, description="Root signatures needed (e.g. 2 of 3); first start only.")
    tuf_online_keys: str | None = Field(
        default=None, description="Keystore URL of the TUF online keys (targets/snapshot/timestamp); default file:<data_dir>/tuf/keys.",
    )
    tuf_refresh_interval_s: float = Field(default=600.0, gt=0, description="How often the refresher checks TUF expiry.")
    rollout_tick_s: float = Field(default=2.0, gt=0, description="How often the rollout engine evaluates gates and "
                                  "starts devices (docs/fleet-rollouts.md).")
    tuf_expiry_days: dict[str, float] = Field(
        default_factory=dict, description="Override TUF expiry per role in days, e.g. {\"timestamp\": 1, \"root\": 365}.",
    )

    tls_cert: Path | None = Field(default=None, description="PEM certificate (chain) for HTTPS; with tls_key.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    insecure_http: bool = Field(
        default=False, description="Allow plain HTTP on a non-loopback address (tokens and passwords cross in clear)."
    )

    # -- device identity (fleet CA, enrollment, broker access; see docs/security-identity.md) --
    ca_keystore: str | None = Field(
        default=None, description="Keystore URL holding the fleet CA key (label fleet-ca): file:/dir or pkcs11:...; "
        "default file:{data_dir}/keys.",
    )
    mosquitto: bool = Field(
        default=False, description="Run and manage a Mosquitto broker with mutual TLS (config written to "
        "{data_dir}/mosquitto) instead of the embedded one.",
    )
    mosquitto_host: str = Field(default="127.0.0.1", description="Address the managed Mosquitto listens on.")
    mosquitto_port: int = Field(default=8883, ge=1, le=65535, description="TLS port of the managed Mosquitto.")
    device_broker_url: str | None = Field(
        default=None, description="Broker URL enrollment hands to devices; default: the managed Mosquitto, the "
        "external broker_url, or the embedded broker on the public URL's host.",
    )
    embedded_broker_auth: Literal["open", "devices"] = Field(
        default="devices", description="Embedded broker: 'devices' = every device logs in with its id and device token "
        "and is fenced to its own topics; 'open' = clients without credentials are let in unfenced (laptop only).",
    )

    # -- monitoring and alerting (issue 7 MONITOR; see docs/fleet-monitoring.md) --
    raw_retention: timedelta = Field(
        default=timedelta(days=1), description="Keep raw telemetry and summaries this long (seconds or ISO 8601, e.g. P1D).",
    )
    rollup_retention: timedelta = Field(
        default=timedelta(days=30), description="Keep the per-minute series rollups this long (seconds or ISO 8601, e.g. P30D).",
    )
    monitor_tick_s: float = Field(default=5.0, gt=0, description="How often the monitor rolls up series and checks alert rules.")
    fl_signing_key: Path | None = Field(
        default=None, description="Key that signs the model versions federated jobs produce (docs/learn.md); its .pub must be "
        "in --trust. Without it a finished job keeps its head but registers no version.",
    )
    fl_tick_s: float = Field(default=1.0, gt=0, description="How often the federated-learning engine opens and closes rounds.")
    alert_webhooks: list[str] = Field(
        default_factory=list, description="URLs every alert change is POSTed to as JSON (besides a rule's own webhook).",
    )
    metrics_token: str | None = Field(
        default=None, description="A bearer token Prometheus may scrape GET /metrics with (besides any viewer token).",
    )

    # -- scale-out (issue 9 SCALE; see docs/scale-out.md) --
    role: Literal["all", "api", "ingest", "engines"] = Field(
        default="all", description="What this process runs: all (one machine), api (HTTP only: publishes desired "
        "states, subscribes to nothing), ingest (one of several workers sharing the device stream through MQTT v5 "
        "shared subscriptions), engines (rollouts, monitor, federated rounds, TUF refresh; one holder per fleet by lease).",
    )
    worker_id: str | None = Field(
        default=None, description="Names this process among others of its role on one host: part of its MQTT client "
        "id (edgewise-<role>-<host>-<worker_id>), which must stay the same across restarts for an ingest worker's "
        "persistent session. Default: the host name alone.",
    )
    ingest_group: str = Field(
        default="edgewise-ingest", pattern=r"^[A-Za-z0-9_.-]+$",
        description="Shared-subscription group of the ingest workers: they subscribe to $share/<group>/edgewise/devices/+/...",
    )
    lease_ttl_s: float = Field(default=15.0, gt=0, description="How long the engines lease lasts without renewal: "
                               "another process takes over at most this (plus lease_renew_s) after the holder died.")
    lease_renew_s: float = Field(default=5.0, gt=0, description="How often the lease holder renews (and the others "
                                 "try to take over); must be shorter than lease_ttl_s.")

    @field_validator("raw_retention", "rollup_retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> Any:
        """Plain seconds (also from an environment variable) or an ISO 8601 duration; must be positive."""
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return v
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"retention {v!r}: give a positive duration, e.g. 86400 (seconds) or P1D")
        return v

    @field_validator("alert_webhooks", mode="before")
    @classmethod
    def _webhooks(cls, v: Any) -> Any:
        """A list, or one string of space- or comma-separated URLs (from EDGEWISE_ALERT_WEBHOOKS); each http(s)."""
        if isinstance(v, str):
            v = [u for u in v.replace(",", " ").split() if u]
        for u in v if isinstance(v, list) else []:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(f"alert webhook {u!r}: give an http:// or https:// URL")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        scheme = urlsplit(v).scheme
        if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {v!r}: use mqtt://host:port (or mqtts:// for TLS)")
        return v

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServerSettings":
        """Settings from ``EDGEWISE_*`` environment variables; keyword arguments win.

        ``None`` overrides are ignored so a CLI can pass every option unconditionally.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for suffix, name in _ENV_FIELDS.items():
            raw = env.get(ENV_PREFIX + suffix)
            if raw is None or raw == "":
                continue
            values[name] = [Path(p) for p in raw.split(os.pathsep) if p] if name == "trust" else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_transport(self) -> None:
        """Refuse plain HTTP on a non-loopback address (bearer tokens, passwords and session cookies would
        cross the network in clear) unless ``insecure_http`` says the operator knows (e.g. TLS ends at a proxy)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both tls_cert and tls_key (--tls-cert and --tls-key)")
        for p in (self.tls_cert, self.tls_key):
            if p is not None and not Path(p).is_file():
                raise ValueError(f"TLS file {p} does not exist")
        if not self.tls and self.host not in LOOPBACK_HOSTS and not self.insecure_http:
            raise ValueError(
                f"refusing plain HTTP on {self.host}: API tokens, passwords and session cookies would cross the network "
                "unencrypted. Give --tls-cert/--tls-key (EDGEWISE_TLS_CERT/EDGEWISE_TLS_KEY), bind to 127.0.0.1 behind "
                "a TLS-terminating proxy, or pass --insecure-http if a proxy on this host already terminates TLS"
            )

    @property
    def effective_ca_keystore(self) -> str:
        return self.ca_keystore or f"file:{self.data_dir / 'keys'}"

    @property
    def mosquitto_dir(self) -> Path:
        """Where the generated Mosquitto configuration, certificates, ACL and CRL live."""
        return self.data_dir / "mosquitto"

    @property
    def effective_database_url(self) -> str:
        """``database_url``; else ``$EDGEWISE_DATABASE_URL_TEMPLATE`` with ``{key}`` replaced by a hash of the
        data dir (one database per data dir: how the test suite runs every control plane on PostgreSQL,
        docs/scale-out-postgres.md); else SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        template = os.environ.get(DATABASE_URL_TEMPLATE_ENV)
        if template:
            key = hashlib.sha256(str(Path(self.data_dir).resolve()).encode()).hexdigest()[:20]
            return template.replace("{key}", key)
        return f"sqlite:///{self.data_dir / 'edgewise.db'}"

    @property
    def embedded_broker(self) -> bool:
        """True when the control plane runs its own amqtt broker (no broker URL, no managed Mosquitto)."""
        return self.broker_url is None and not self.mosquitto

    @property
    def effective_broker_url(self) -> str:
        """The broker the bus connects to. With ``embedded_broker_port=0`` the real port is
        only known once the broker runs: ask ``EmbeddedBroker.url`` (or ``ControlPlane.broker_url``)."""
        if self.broker_url is not None:
            return self.broker_url
        return f"mqtt://{self.embedded_broker_host}:{self.embedded_broker_port}"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def effective_mqtt_client_id(self) -> str:
        import hashlib

        if self.mqtt_client_id:
            return self.mqtt_client_id
        return "edgewise-control-" + hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]

    @property
    def runs_api(self) -> bool:
        return self.role in ("all", "api")

    @property
    def runs_ingest(self) -> bool:
        return self.role in ("all", "ingest")

    @property
    def runs_engines(self) -> bool:
        return self.role in ("all", "engines")

    @property
    def role_client_id(self) -> str:
        """The bus's MQTT client id for this role: ``all`` keeps ``effective_mqtt_client_id``; the others are
        ``edgewise-<role>-<host>[-<worker_id>]`` unless ``mqtt_client_id`` says otherwise. Two live processes must never
        share one (the broker would disconnect one whenever the other connects)."""
        import socket

        if self.role == "all" or self.mqtt_client_id:
            return self.effective_mqtt_client_id
        name = f"edgewise-{self.role}-{socket.gethostname()}" + (f"-{self.worker_id}" if self.worker_id else "")
        if self.role != "ingest":  # no persistent session to find again: one id per process
            import os

            name += f"-{os.getpid()}"
        return name[:128]

    def check_role(self) -> None:
        """Refuse a split role on a broker that lives inside one process and cannot share a stream."""
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(f"lease_renew_s ({self.lease_renew_s}) must be shorter than lease_ttl_s ({self.lease_ttl_s})")
        if self.role == "all":
            return
        if self.embedded_broker:
            raise ValueError(
                f"--role {self.role} runs one of several control-plane processes that share one broker: give --broker-url "
                "mqtt(s)://host:port of a Mosquitto (2.0 or newer) or EMQX broker. The embedded amqtt broker lives inside "
                "one process and does not support MQTT v5 shared subscriptions, so several ingest workers cannot share its "
                "stream; for a single process use --role all"
            )
        if self.mosquitto:
            raise ValueError(
                f"--role {self.role} with --mosquitto: a managed Mosquitto lives and dies with one process; run Mosquitto "
                "(or EMQX) as its own service and point every role at it with --broker-url (docs/scale-out.md)"
            )

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
