"""Agent configuration: ``state_dir/config.toml`` plus command-line overrides.

The file is the device's memory of who it is (its device id is generated once
and written back), so a restart with fewer flags comes back as the same device.
Derived values (the broker URL guessed from the server URL, the default trust
directory) are computed on load and never written, so changing ``--server``
later moves the broker along with it.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..protocol import topics
from ..fsutil import atomic_write

CONFIG_FILE = "config.toml"
DEFAULT_MQTT_PORT = 1883
DEFAULT_API_PORT = 8470


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


class AgentConfig(BaseModel):
    """Everything the agent needs to know at start; validated once, then read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(description="This device's id: MQTT client id, topic level and file name.")
    state_dir: Path = Field(description="The agent's home: slots, outbox, trust, config.")
    server_url: str | None = Field(default=None, description="Control plane HTTP base; relative artifact URLs join it.")
    broker_url: str | None = Field(default=None, description="mqtt://host:port; default: the server's host, port 1883.")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=0, le=65535, description="0 picks a free port (see api.port).")
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    flush_interval_s: float = Field(default=1.0, gt=0)
    threads: int | None = Field(
        default=None, ge=1, le=256,
        description="ONNX Runtime intra-op threads; default: the bundle's tuned setting, else 1.",
    )
    tags: list[str] = Field(default_factory=list)
    hardware_class: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The device's hardware class, reported to the control plane (issue 7): the optimize profile name "
        "(e.g. rpi4) whose model variants suit it; rollouts judge health per class.",
    )
    trust_dir: Path | None = Field(default=None, description="Public keys bundles must be signed with; default state_dir/trust.")
    outbox_max_bytes: int = Field(default=16 * 2**20, ge=4096)
    reconnect_base_s: float = Field(default=0.5, gt=0, description="First reconnect delay bound (full jitter).")
    reconnect_cap_s: float = Field(default=30.0, gt=0, description="Longest reconnect delay.")
    download_timeout_s: float = Field(default=30.0, gt=0, description="Socket timeout for artifact downloads.")
    trial_starts: int = Field(
        default=1, ge=1, le=100,
        description="Agent starts a new model must load on (smoke test + golden check) before it is committed; 1 = commit after the install's trial.",
    )
    disk_margin_bytes: int = Field(default=16 * 2**20, ge=0, description="Free space kept beyond what an update needs.")
    integrity_check: Literal["auto", "require", "off"] = Field(
        default="auto",
        description="Check the agent's own files against its signed release at start: auto = when running from an "
        "installed release env (not from a source checkout); require = refuse to run without one; off = skip (dev).",
    )
    update_trust: Literal["tuf", "signature-only"] = Field(
        default="tuf",
        description="tuf: install updates only as targets the signed TUF metadata lists (trusted root in "
        "trust/root.json; without it, updates are refused); signature-only: trust the bundle signature and the "
        "desired state alone (setups without a TUF repository; no freeze/rollback protection from TUF).",
    )
    keystore_url: str | None = Field(
        default=None,
        description="Where the device's keys live: file:/dir (default file:<state_dir>/keys, files 0600) or "
        "pkcs11:module=...;token=...;pin-env=VAR (keys generated in and never leaving the token); see docs/security-keys.md.",
    )
    encrypt_at_rest: bool = Field(
        default=True,
        description="Keep slot bundles (chunked AES-256-GCM) and outbox rows encrypted with the keystore's storage key.",
    )
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT version: auto = 5 on mqtts:// (refused publishes come back with a reason code), 3.1.1 on "
        "mqtt:// (the embedded broker speaks only 3.1.1).",
    )
    bandwidth_mode: Literal["full", "summary", "alerts-only"] = Field(
        default="full",
        description="full: periodic Telemetry samples; summary: one Summary aggregate per interval; "
        "alerts-only: no periodic telemetry, only warning+ events and state changes.",
    )
    capture: bool = Field(
        default=False, description="Capture served inputs for retraining (docs/data-capture.md); off by default for privacy.",
    )
    capture_low_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Capture rows whose top-1 score is below this (0: off).",
    )
    capture_random_fraction: float = Field(default=0.01, ge=0.0, le=1.0, description="Fraction of all rows captured at random.")
    capture_drift_window: int = Field(
        default=32, ge=0, le=100_000, description="Rows captured before and after the drift detector marks drift (0: off).",
    )
    capture_budget_bytes: int = Field(
        default=4 * 2**20, ge=4096, description="Bytes captured samples may take (waiting in the outbox, or kept locally).",
    )
    capture_destination: Literal["upload", "local"] = Field(
        default="upload",
        description="upload: through the outbox at the lowest priority; local: kept on the device (samples.db) for federated learning.",
    )
    capture_seed: int | None = Field(default=None, description="Seed of the random-fraction draws (None: fresh entropy).")
    # Drift detection (agent.drift; docs/data-drift.md). Active when the bundle carries reference statistics.
    drift: bool = Field(default=True, description="Watch served inputs and predictions for drift (needs reference statistics in the bundle).")
    drift_window: int = Field(default=200, ge=10, le=100_000, description="Samples in the sliding windows of the PSI/KS detectors.")
    drift_alpha: float = Field(default=1e-4, gt=0.0, lt=0.5, description="False-alarm probability per check of each window detector.")
    drift_input_test: Literal["psi", "ks"] = Field(default="psi", description="Per-feature input drift test.")
    drift_scalar_detector: Literal["page_hinkley", "adwin", "both", "none"] = Field(
        default="page_hinkley", description="Sequential change detector(s) on the standardised summary scalars.",
    )
    drift_block: int = Field(
        default=64, ge=1, le=4096, description="Samples buffered per detector update: larger is cheaper per sample, later by up to one block.",
    )
    drift_ph_threshold: float = Field(default=25.0, gt=0.0, description="Page-Hinkley threshold (reference standard deviations).")
    # Label-free adaptation (agent.adapt; docs/data-adaptation.md).
    adapt_window: int = Field(default=256, ge=0, le=100_000, description="Recent inputs kept for adaptation (0: no buffer, no adaptation).")
    adapt_min_samples: int = Field(default=64, ge=1, description="Inputs needed before an adaptation may run.")
    adapt_method: Literal["auto", "adabn", "coral"] = Field(default="auto", description="auto: AdaBN when the model has BatchNorm, else CORAL.")
    adapt_on_drift: bool = Field(default=True, description="Adapt when drift starts (at most once per adapt_drift_cooldown_s).")
    adapt_drift_cooldown_s: float = Field(default=600.0, ge=0.0, description="Least time between two drift-triggered adaptations.")
    fl_torch: Literal["auto", "never"] = Field(
        default="auto", description="Federated all-layer training: auto = torch when it is installed on the device, else numpy.",
    )
    adapt_max_golden_drop: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Largest golden-input accuracy drop an adapted model may show and still commit.",
    )
    # Peer distribution (agent.peers; docs/peer-distribution.md, issue 9).
    peer_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve the verified bundles this device holds to peers on this port (0: a free one); None: do not serve.",
    )
    peer_host: str = Field(default="0.0.0.0", description="Address the peer server binds to (the site LAN's interface).")
    peer_url: str | None = Field(default=None, description="URL peers reach this device's peer server at; default: http://<primary address>:<port>.")
    peer_fetch: bool = Field(default=True, description="Fetch bundles from peers (desired-state hints, mDNS) before the control plane.")
    peer_mdns: bool = Field(default=False, description="Advertise and discover peers by mDNS (_edgewise-peer._tcp; needs the 'peer' extra).")
    peer_timeout_s: float = Field(default=3.0, gt=0, description="Socket timeout when fetching from a peer (short: the control plane is the fallback).")
    peer_ban_s: float = Field(default=600.0, ge=0, description="How long a peer that served wrong bytes is not asked again.")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return topics.check_device_id(v)

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server_url {v!r} must be an http(s) URL such as http://control:8000")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker_url {v!r} must look like mqtt://host:1883 (or mqtts://host:8883)")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"broker_url {v!r} has an invalid port") from None
        return v

    @model_validator(mode="after")
    def _derive(self) -> "AgentConfig":
        # Frozen model: derived values are set through object.__setattr__ once, here.
        if self.broker_url is None and self.server_url is not None:
            host = urlsplit(self.server_url).hostname
            object.__setattr__(self, "broker_url", f"mqtt://{_host_for_url(host)}:{DEFAULT_MQTT_PORT}")
        if self.trust_dir is None:
            object.__setattr__(self, "trust_dir", self.state_dir / "trust")
        elif not self.trust_dir.is_absolute():
            object.__setattr__(self, "trust_dir", self.state_dir / self.trust_dir)
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must be at least reconnect_base_s")
        return self

    @property
    def keystore_location(self) -> str:
        """The keystore URL in effect: ``keystore_url`` or ``file:<state_dir>/keys``."""
        return self.keystore_url or f"file:{self.state_dir / 'keys'}"

    @property
    def device_token_path(self) -> Path:
        """The device's API token for the control plane (written at enrollment; sent when present)."""
        return self.state_dir / "keys" / "device.token"

    @property
    def device_cert_path(self) -> Path:
        """The device's client certificate from the fleet CA (``edgewise device enroll`` writes it)."""
        return self.state_dir / "keys" / "device.crt"

    @property
    def ca_cert_path(self) -> Path:
        """The fleet CA certificate: the only issuer the agent accepts for the broker's TLS certificate."""
        return self.state_dir / "keys" / "ca.crt"

    @property
    def tuf_root_path(self) -> Path:
        """The device's trusted TUF root metadata (installed at provisioning): ``root.json`` in the trust directory."""
        trust = self.trust_path
        return (trust.parent if trust.is_file() else trust) / "root.json"

    @property
    def tuf_cache_dir(self) -> Path:
        """TUF metadata this device has verified (what lets it notice replayed older versions)."""
        return self.state_dir / "tuf"

    @property
    def trust_path(self) -> Path:
        """The trust directory (always set after validation)."""
        assert self.trust_dir is not None
        return self.trust_dir

    def broker_address(self) -> tuple[str, int, bool] | None:
        """(host, port, tls) of the broker, or None when the agent runs without one."""
        if self.broker_url is None:
            return None
        parts = urlsplit(self.broker_url)
        tls = parts.scheme == "mqtts"
        return parts.hostname or "", parts.port or (8883 if tls else DEFAULT_MQTT_PORT), tls


def _host_for_url(host: str | None) -> str:
    host = host or "localhost"
    return f"[{host}]" if ":" in host else host


def default_device_id() -> str:
    """Hostname plus a random suffix: images cloned to a hundred boards share a hostname."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "device").strip("-._")[:40] or "device"
    if not base[0].isalnum():
        base = "d" + base
    return f"{base}-{secrets.token_hex(3)}"


def load_config(state_dir: Path | str, **overrides: Any) -> AgentConfig:
    """Read ``state_dir/config.toml`` (if any), apply ``overrides`` (None = not given), validate.

    On the first start (no file yet) the merged settings, including a freshly
    generated ``device_id``, are written back so the next start is the same device.
    """
    state_dir = Path(state_dir)
    path = state_dir / CONFIG_FILE
    from_file: dict[str, Any] = {}
    if path.exists():
        try:
            from_file = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}); fix or delete it") from None
        from_file.pop("state_dir", None)
    merged = {**from_file, **{k: v for k, v in overrides.items() if v is not None}}
    merged.pop("state_dir", None)
    first_start = not path.exists()
    if "device_id" not in merged:
        merged["device_id"] = default_device_id()
    try:
        config = AgentConfig(state_dir=state_dir, **merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from None
    if first_start:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_toml(path, merged)
    return config


def _explain(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        if err.get("type") == "extra_forbidden":
            lines.append(f"{where}: unknown setting (check the spelling in {path} or the flag)")
        else:
            lines.append(f"{where}: {err.get('msg')}")
    return "invalid agent configuration: " + "; ".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, (str, Path)):
        # JSON string escapes are a subset of TOML basic-string escapes; DEL must be escaped too.
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} to TOML; config keys are flat scalars or lists")


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Write flat ``key = value`` TOML atomically (tmp file, fsync, rename)."""
    body = "# edgewise agent configuration (written on first start; edit and restart)\n"
    body += "".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(values.items()) if v is not None)
    atomic_write(path, body.encode("utf-8"))
