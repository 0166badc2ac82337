"""Server configuration: one object that says where data lives and which broker to use.

Plain pydantic (``pydantic-settings`` is not a dependency): :meth:`ServerSettings.from_env`
reads the few ``EDGEWISE_*`` variables an operator is likely to set in a container,
and explicit keyword arguments (what the CLI passes) win over them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
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
}


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
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'edgewise.db'}"

    @property
    def embedded_broker(self) -> bool:
        """True when the control plane runs its own broker (no broker URL configured)."""
        return self.broker_url is None

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
        return f"http://{host}:{self.port}"

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
