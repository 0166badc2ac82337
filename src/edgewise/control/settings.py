"""Server configuration: one object that says where data lives and which broker to use.

Plain pydantic (``pydantic-settings`` is not a dependency): :meth:`ServerSettings.from_env`
reads the few ``EDGEWISE_*`` variables an operator is likely to set in a container,
and explicit keyword arguments (what the CLI passes) win over them.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "EDGEWISE_"
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
}
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
    embedded_broker_host: str = "127.0.0.1"
    embedded_broker_port: int = Field(default=1883, ge=0, le=65535, description="0 picks a free port.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port (ControlPlane only).")
    public_url: str | None = Field(
        default=None, description="Base URL devices download artifacts from; default http://{host}:{port}."
    )
    trust: list[Path] = Field(
        default_factory=list,
        description="Public keys (files or directories of .pub/.pem) that uploaded bundles must be signed by.",
    )
    max_upload_mb: float = Field(default=512.0, gt=0)
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
    mosquitto_host: str = "127.0.0.1"
    mosquitto_port: int = Field(default=8883, ge=1, le=65535)
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
        return self.database_url or f"sqlite:///{self.data_dir / 'edgewise.db'}"

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
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
