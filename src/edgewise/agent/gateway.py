"""Site gateway: one machine is the MQTT broker and artifact cache of a site with one uplink.

The site's devices run the ordinary agent with ``server_url``/``broker_url`` pointing at the gateway.
The gateway

- runs the **site broker** (the embedded amqtt broker of :mod:`edgewise.broker`, the same per-device access
  rules as the control plane's): devices log in with their device id and device token, which the gateway checks
  by asking the control plane (``GET /api/v1/auth/me``) and caches (see :class:`TokenCheck`);
- **stores before it acknowledges**: every ``state``/``telemetry``/``events`` publish of a site device is
  written to ``gateway.db`` (SQLite, WAL) *before* the broker sends the device its PUBACK (a hook in front of
  amqtt's acknowledgement, :data:`edgewise.broker.PublishHook`), so the device deletes a record from its own
  outbox only once the gateway holds it, and killing the gateway loses nothing it acknowledged;
- **forwards** that queue to the upstream broker in order, QoS 1, deleting a record only after the upstream
  PUBACK (a record in flight when the gateway dies is sent again: the control plane de-duplicates telemetry
  and events on ``(device_id, seq)``);
- **relays downwards** what the control plane publishes for the site's devices (``desired``, retained; ``cmd/#``;
  ``edgewise/fleet/#``) into the site broker, keeping the last desired state of each device in ``gateway.db``
  so a restarted gateway republishes it even while the uplink is down;
- **caches artifacts**: each desired state names its bundle (relative URL, sha256, size); the gateway fetches it
  from the control plane at once (prefetch) and serves it over HTTP with Range requests at the same relative
  URL, so a device whose ``server_url`` is the gateway installs it whether or not the uplink is up. A file is
  served only after its size and sha256 matched the desired state. TUF metadata is mirrored as last seen
  (:class:`TufMirror`) so TUF devices can install during an outage too; other GETs are passed through to the
  control plane while it is reachable.

It imports ``protocol`` and ``broker`` only (never the control plane). See docs/site-gateway.md.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..protocol import DesiredState, ProtocolError, decode_for_topic, topics

log = logging.getLogger(__name__)

UPSTREAM_CHANNELS = ("state", "telemetry", "events")  # site device -> control plane, stored and forwarded
FORWARD_BATCH = 500  # records published per forwarding round before waiting for their PUBACKs
PUBACK_WAIT_S = 10.0
CHUNK = 256 * 1024
TUF_REFRESH = "tuf-metadata"  # a prefetch job: refresh the TUF metadata mirror


class GatewayConfigError(ValueError):
    """The gateway configuration is missing something or names something invalid (the message says what)."""


class GatewayConfig(BaseModel):
    """``gateway.toml``: flat keys, see docs/site-gateway.md for a commented example."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(default="site", description="Name of the site; the upstream MQTT client id is edgewise-gateway-<site>.")
    state_dir: Path = Field(description="Where gateway.db (queue, desired states, token cache) and cache/ (bundles) live.")
    upstream_server: str = Field(description="The control plane's HTTP base, e.g. https://control.example.com.")
    upstream_broker: str | None = Field(default=None, description="mqtt://host:port of the control plane's broker; "
                                        "default the server's host, port 1883.")
    upstream_username: str | None = Field(default=None, description="MQTT login of the gateway upstream (see docs).")
    upstream_password: str | None = None
    api_token: str | None = Field(default=None, description="A viewer API token for prefetching bundles; without it the "
                                  "gateway fetches with a device token of the site it has seen at login.")
    listen_host: str = "0.0.0.0"
    mqtt_port: int = Field(default=1883, ge=0, le=65535, description="Site broker port (0 = any free port).")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Artifact cache port (0 = any free port).")
    device_ids: list[str] = Field(default_factory=list, description="The site's devices; empty = any device the "
                                  "control plane accepts (and the gateway then relays every device's desired state).")
    require_auth: bool = Field(default=True, description="Devices must log in with id + device token (MQTT and HTTP).")
    token_recheck_s: float = Field(default=300.0, ge=0, description="A cached token verdict older than this is asked "
                                   "again while the uplink is up; while it is down the cache decides.")
    queue_max_bytes: int = Field(default=256 * 2**20, gt=0, description="Bound of the store-and-forward queue; when full, "
                                 "the oldest telemetry goes first, then the oldest of anything.")
    synchronous: Literal["NORMAL", "FULL"] = Field(default="NORMAL", description="FULL: fsync every stored message "
                                                   "(survives a power cut, slower).")
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @field_validator("upstream_server")
    @classmethod
    def _server(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname:
            raise ValueError(f"upstream_server {v!r} must be an http(s) URL such as http://control:8000")
        return v.rstrip("/")

    @field_validator("upstream_broker")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme != "mqtt" or not urlsplit(v).hostname):
            raise ValueError(f"upstream_broker {v!r} must look like mqtt://host:1883 (TLS upstream is not supported yet)")
        return v

    @field_validator("device_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        return [topics.check_device_id(d) for d in v]

    @property
    def broker_host_port(self) -> tuple[str, int]:
        url = urlsplit(self.upstream_broker or f"mqtt://{urlsplit(self.upstream_server).hostname}:1883")
        return url.hostname or "127.0.0.1", url.port or 1883

    @classmethod
    def from_toml(cls, path: Path) -> "GatewayConfig":
        """Read ``gateway.toml``; relative ``state_dir`` is relative to the file's folder."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GatewayConfigError(f"{path} does not exist: write a gateway.toml (see docs/site-gateway.md)") from None
        except tomllib.TOMLDecodeError as exc:
            raise GatewayConfigError(f"{path} is not valid TOML: {exc}") from None
        if "state_dir" in data and not Path(data["state_dir"]).is_absolute():
            data["state_dir"] = str(Path(path).parent / data["state_dir"])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: "
                                 f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
            raise GatewayConfigError(f"{path}: {problems}") from None


# -- the gateway's database ----------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                                  retain INTEGER NOT NULL, telemetry INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS queue_telemetry ON queue (telemetry, id);
CREATE TABLE IF NOT EXISTS desired (device_id TEXT PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (url TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (token_sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL, valid INTEGER NOT NULL,
                                   checked_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SiteStore:
    """``gateway.db``: the store-and-forward queue, the last desired state per device, the artifact index and the
    token cache. One connection behind a lock (the broker loop, the forwarder and HTTP threads share it);
    records are opaque ``(topic, payload, retain)`` (the control plane decodes them)."""

    def __init__(self, path: Path, *, max_bytes: int = 256 * 2**20, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM queue").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])
        self.dropped = self._counter("dropped")

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # queue -----------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, retain: bool) -> None:
        """Store one message durably (committed when this returns); make room by dropping the oldest telemetry."""
        size = len(payload) + len(topic)
        with self._tx() as db:
            dropped = 0
            while self._bytes + size > self.max_bytes and self._count > 0:
                victim = db.execute("SELECT id, size FROM queue ORDER BY telemetry DESC, id LIMIT 1").fetchone()
                db.execute("DELETE FROM queue WHERE id = ?", (victim[0],))
                self._bytes -= victim[1]
                self._count -= 1
                dropped += 1
            if dropped:
                self.dropped += dropped
                db.execute("INSERT OR REPLACE INTO counters VALUES ('dropped', ?)", (self.dropped,))
                log.warning("site queue full (%d bytes): dropped %d oldest message(s)", self.max_bytes, dropped)
            db.execute("INSERT INTO queue (topic, payload, retain, telemetry, size) VALUES (?, ?, ?, ?, ?)",
                       (topic, payload, int(retain), int("/telemetry/" in topic), size))
            self._bytes += size
            self._count += 1

    def peek(self, limit: int) -> list[tuple[int, str, bytes, bool]]:
        """The oldest ``limit`` messages, in the order they were stored."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, retain FROM queue ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(r[0], r[1], bytes(r[2]), bool(r[3])) for r in rows]

    def ack(self, ids: list[int]) -> None:
        """Delete messages the upstream broker acknowledged."""
        if not ids:
            return
        with self._tx() as db:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                row = db.execute(f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM queue WHERE id IN ({marks})", chunk).fetchone()
                db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)
                self._bytes -= int(row[0])
                self._count -= int(row[1])

    @property
    def pending(self) -> int:
        return self._count

    # desired states and artifacts --------------------------------------------------------------

    def set_desired(self, device_id: str, topic: str, payload: bytes) -> None:
        with self._tx() as db:
            if payload:
                db.execute("INSERT OR REPLACE INTO desired VALUES (?, ?, ?)", (device_id, topic, payload))
            else:  # a cleared retained message
                db.execute("DELETE FROM desired WHERE device_id = ?", (device_id,))

    def all_desired(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(r[0], bytes(r[1])) for r in self._db.execute("SELECT topic, payload FROM desired ORDER BY device_id")]

    def learn_artifact(self, url: str, sha256: str, size: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)", (url, sha256.lower(), size))

    def artifact(self, url: str) -> tuple[str, int] | None:
        with self._lock:
            row = self._db.execute("SELECT sha256, size FROM artifacts WHERE url = ?", (url,)).fetchone()
        return (row[0], int(row[1])) if row else None

    # token cache ---------------------------------------------------------------------------------

    def token_verdict(self, token_sha256: str) -> tuple[str, bool, float] | None:
        with self._lock:
            row = self._db.execute("SELECT device_id, valid, checked_at FROM tokens WHERE token_sha256 = ?",
                                   (token_sha256,)).fetchone()
        return (row[0], bool(row[1]), float(row[2])) if row else None

    def set_token_verdict(self, token_sha256: str, device_id: str, valid: bool) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)", (token_sha256, device_id, int(valid), time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- device tokens -------------------------------------------------------------------------------

class UplinkDown(Exception):
    """The control plane could not be reached (the caller falls back to what it cached)."""


def _http_get(url: str, token: str | None, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) only, checked in the config
    except urllib.error.HTTPError as exc:
        return exc  # an answer (401, 404, ...): the caller reads .status
    except (OSError, urllib.error.URLError) as exc:
        raise UplinkDown(f"{url}: {exc}") from exc


class TokenCheck:
    """Is ``token`` a live device token of ``device_id``? Asks the control plane, caches the verdict.

    The control plane answers ``GET /api/v1/auth/me`` with ``{"kind": "device", "name": <id>}`` for a device
    token. The verdict is cached in ``gateway.db`` by the token's sha256 (never the token itself). A cached verdict
    younger than ``recheck_s`` is used as is; an older one is asked again when the uplink is up; while the uplink is
    down the cache decides (a device the gateway has never seen cannot log in during an outage, and a token revoked
    during an outage keeps working at the site until the uplink returns)."""

    def __init__(self, store: SiteStore, server: str, *, device_ids: list[str], recheck_s: float) -> None:
        self.store, self.server, self.recheck_s = store, server, recheck_s
        self.device_ids = set(device_ids)
        self.seen: dict[str, str] = {}  # device id -> its last valid token (memory only: used to prefetch bundles)

    def device_of(self, token: str) -> str | None:
        """The device a token belongs to, or None (HTTP requests carry a bearer token without a device id)."""
        return self._verdict(None, token)

    def check(self, device_id: str, token: str) -> bool:
        return self._verdict(device_id, token) == device_id

    def _verdict(self, device_id: str | None, token: str) -> str | None:
        if not token or (device_id is not None and self.device_ids and device_id not in self.device_ids):
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self.store.token_verdict(key)
        if cached is not None and time.time() - cached[2] < self.recheck_s:
            return self._accept(cached[0], token) if cached[1] else None
        try:
            answer = _http_get(f"{self.server}/api/v1/auth/me", token, timeout=3.0)
            status = getattr(answer, "status", 0)
            body = json.loads(answer.read() or b"{}") if status == 200 else {}
        except (UplinkDown, ValueError) as exc:
            log.info("cannot ask the control plane about a device token (%s); using the cache", exc)
            if cached is None:
                return None
            return self._accept(cached[0], token) if cached[1] else None
        owner = body.get("name") if body.get("kind") == "device" else None
        if owner is None or (self.device_ids and owner not in self.device_ids):
            self.store.set_token_verdict(key, device_id or "", False)
            return None
        self.store.set_token_verdict(key, owner, True)
        return self._accept(owner, token)

    def _accept(self, device_id: str, token: str) -> str:
        self.seen[device_id] = token
        return device_id


# -- artifact cache ------------------------------------------------------------------------------

class CacheMiss(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ArtifactCache:
    """Bundles by sha256 under ``STATE/cache``, fetched from the control plane and verified before use."""

    def __init__(self, root: Path, store: SiteStore, server: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store, self.server = store, server
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.fetched = 0  # files downloaded from upstream and verified (for tests and /v1/health)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def cached(self, url: str) -> Path | None:
        entry = self.store.artifact(url)
        if entry is not None and self.path(entry[0]).exists():
            return self.path(entry[0])
        return None

    def ensure(self, url: str, token: str | None) -> Path:
        """The verified file for ``url`` (a relative artifact URL from a desired state), fetching it if needed.
        Raises :class:`CacheMiss` (404 unknown URL, 503 uplink down, 502 upstream refused or sent wrong bytes)."""
        entry = self.store.artifact(url)
        if entry is None:
            raise CacheMiss(404, f"{url} is not an artifact of any desired state this gateway relayed")
        sha, size = entry
        final = self.path(sha)
        with self._guard:
            lock = self._locks.setdefault(sha, threading.Lock())
        with lock:  # two devices asking at once: one download
            if final.exists():
                return final
            part = self.root / f"{sha}.part"
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                resp = _http_get(self.server + url, token, timeout=30.0, headers=headers)
            except UplinkDown as exc:
                raise CacheMiss(503, f"{url} is not cached and the uplink is down ({exc}); try again later") from None
            status = getattr(resp, "status", 0)
            if status not in (200, 206):
                raise CacheMiss(502, f"the control plane answered {status} for {url}")
            if status == 200:
                have = 0
            try:
                with open(part, "ab" if have else "wb") as out:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        if out.tell() + len(chunk) > size:
                            raise CacheMiss(502, f"the control plane sent more than the {size} bytes announced for {url}")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise CacheMiss(503, f"download of {url} broke off ({exc}); it resumes on the next request") from None
            h = hashlib.sha256()
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
            got = part.stat().st_size
            if got != size or h.hexdigest() != sha:
                if got >= size:
                    part.unlink()
                raise CacheMiss(502, f"{url}: got {got} bytes with sha256 {h.hexdigest()[:12]}…, the desired state "
                                     f"announced {size} bytes with sha256 {sha[:12]}…; not served")
            os.replace(part, final)
            self.fetched += 1
            log.info("cached %s (%d bytes, sha256 %s)", url, size, sha[:12])
            return final


class TufMirror:
    """The control plane's TUF metadata as last seen, under ``STATE/tuf/``, for devices that update during an outage.

    Serving old metadata is safe: the device verifies every file against the root it trusts and refuses anything
    expired or older than what it has; the worst a stale copy does is delay an update. A 404 is kept too
    (``<name>.404``): the TUF client asks for the *next* root version until it gets 404, and must get that answer
    offline as well. :meth:`refresh` walks what a device will ask for (roots, timestamp, the snapshot and the
    targets roles it names, by consistent-snapshot version), so a device that never updated before the cut can.
    """

    PREFIX = "/api/v1/tuf/metadata/"
    NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}\.json$")

    def __init__(self, root: Path, server: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.server = server

    def name_of(self, path: str) -> str | None:
        if not path.startswith(self.PREFIX):
            return None
        name = path[len(self.PREFIX):]
        return name if self.NAME.match(name) else None

    def keep(self, name: str, status: int, body: bytes) -> None:
        if status == 200:
            tmp = self.root / f".{name}.tmp"
            tmp.write_bytes(body)
            os.replace(tmp, self.root / name)
            (self.root / f"{name}.404").unlink(missing_ok=True)
        elif status == 404:
            (self.root / f"{name}.404").touch()

    def get(self, name: str) -> tuple[int, bytes] | None:
        if (self.root / name).exists():
            return 200, (self.root / name).read_bytes()
        if (self.root / f"{name}.404").exists():
            return 404, json.dumps({"detail": f"{name} does not exist (as last seen by the site gateway)"}).encode()
        return None

    def _fetch(self, name: str, token: str | None) -> bytes | None:
        resp = _http_get(self.server + self.PREFIX + name, token, timeout=15.0)
        status = getattr(resp, "status", 0)
        body = resp.read()
        self.keep(name, status, body)
        return body if status == 200 else None

    def refresh(self, token: str | None) -> None:
        """Fetch the current metadata set (raises :class:`UplinkDown` when the control plane is out of reach)."""
        version = 1
        while (self.root / f"{version}.root.json").exists():  # versioned roots never change
            version += 1
        while self._fetch(f"{version}.root.json", token) is not None:
            version += 1
        timestamp = self._fetch("timestamp.json", token)
        if timestamp is None:
            return
        snap_version = json.loads(timestamp)["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = self._fetch(f"{snap_version}.snapshot.json", token)
        if snapshot is None:
            return
        for role, meta in json.loads(snapshot)["signed"]["meta"].items():
            if not (self.root / f"{meta['version']}.{role}").exists():
                self._fetch(f"{meta['version']}.{role}", token)


# -- the gateway ---------------------------------------------------------------------------------

class Gateway:
    """Site broker + store-and-forward bridge + artifact cache. ``start()``, ``stop()``; see the module doc.

    >>> gw = Gateway(GatewayConfig(state_dir=tmp, upstream_server=cp_url, mqtt_port=0, http_port=0))  # doctest: +SKIP
    >>> gw.start(); gw.mqtt_url, gw.http_url                                                           # doctest: +SKIP
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.store: SiteStore | None = None
        self.tokens: TokenCheck | None = None
        self.cache: ArtifactCache | None = None
        self.tuf: TufMirror | None = None
        self.broker: Any = None
        self._site: mqtt.Client | None = None
        self._site_ready = threading.Event()
        self._upstream: mqtt.Client | None = None
        self._up_connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._prefetch: list[str] = []
        self._prefetch_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: http.server.ThreadingHTTPServer | None = None
        self.forwarded = 0  # messages the upstream broker acknowledged
        self.relayed = 0  # messages relayed from upstream into the site broker
        self.mqtt_port: int | None = None
        self.http_port: int | None = None

    # lifecycle -------------------------------------------------------------------------------

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self._local_host}:{self.mqtt_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._local_host}:{self.http_port}"

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.config.listen_host in ("0.0.0.0", "", "::") else self.config.listen_host

    @property
    def uplink_up(self) -> bool:
        return self._up_connected.is_set()

    def start(self) -> "Gateway":
        from ..broker import BrokerAccess, EmbeddedBroker

        cfg = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = SiteStore(self.state_dir / "gateway.db", max_bytes=cfg.queue_max_bytes, synchronous=cfg.synchronous)
        self.tokens = TokenCheck(self.store, cfg.upstream_server, device_ids=cfg.device_ids, recheck_s=cfg.token_recheck_s)
        self.cache = ArtifactCache(self.state_dir / "cache", self.store, cfg.upstream_server)
        self.tuf = TufMirror(self.state_dir / "tuf", cfg.upstream_server)
        self._access = BrokerAccess(check_device=self.tokens.check, require_auth=cfg.require_auth,
                                    control_username="edgewise-gateway")
        self.broker = EmbeddedBroker(cfg.listen_host, cfg.mqtt_port, access=self._access, on_publish=self._on_site_publish)
        self.broker.start()
        self.mqtt_port = self.broker.port
        self._start_http()
        self._start_site_client()
        self._start_upstream()
        for name, target in (("forward", self._forward_loop), ("prefetch", self._prefetch_loop)):
            t = threading.Thread(target=target, name=f"edgewise-gateway-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        for topic, payload in self.store.all_desired():  # relay-able while the uplink is down
            self._learn_desired(topic, payload)
        log.info("site gateway %r: broker %s, artifacts %s, upstream %s / %s:%d", cfg.site, self.mqtt_url, self.http_url,
                 cfg.upstream_server, *cfg.broker_host_port)
        return self

    def stop(self) -> None:
        """Stop serving; everything acknowledged is already in gateway.db."""
        self._stop.set()
        self._wake.set()
        self._prefetch_wake.set()
        for client in (self._upstream, self._site):
            if client is not None:
                try:
                    client.disconnect()
                    client.loop_stop()
                except Exception:  # noqa: BLE001 - stopping anyway
                    pass
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.broker is not None:
            self.broker.stop()
        for t in self._threads:
            t.join(5)
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def health(self) -> dict[str, Any]:
        assert self.store is not None and self.cache is not None
        return {"site": self.config.site, "uplink": self.uplink_up, "pending": self.store.pending,
                "dropped": self.store.dropped, "forwarded": self.forwarded, "relayed": self.relayed,
                "artifacts_fetched": self.cache.fetched, "mqtt_url": self.mqtt_url, "http_url": self.http_url}

    # site -> upstream ------------------------------------------------------------------------

    def _on_site_publish(self, username: str | None, topic: str, payload: bytes, retain: bool) -> None:
        """Runs on the site broker's loop before it acknowledges: store what must reach the control plane."""
        if username == self._access.control_username:
            return  # our own relays of upstream messages
        try:
            parsed = topics.parse(topic)
        except ProtocolError:
            return
        if parsed.channel not in UPSTREAM_CHANNELS:
            return
        from ..broker import device_may

        if username is not None and not device_may(username, "publish", topic):
            return  # the broker's ACL drops it too; never forward a device speaking for another
        assert self.store is not None
        self.store.put(topic, payload, retain)
        self._wake.set()

    def _forward_loop(self) -> None:
        assert self.store is not None
        while not self._stop.is_set():
            client = self._upstream
            if client is None or not self._up_connected.is_set():
                self._stop.wait(0.1)
                continue
            rows = self.store.peek(FORWARD_BATCH)
            if not rows:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            sent: list[tuple[int, Any]] = []
            for rid, topic, payload, retain in rows:
                try:
                    info = client.publish(topic, payload, qos=1, retain=retain)
                except Exception as exc:  # noqa: BLE001 - oversize payload etc.: never block the queue on it
                    log.error("cannot forward %s (%s); dropping it", topic, exc)
                    self.store.ack([rid])
                    continue
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                sent.append((rid, info))
            done: list[int] = []
            deadline = time.monotonic() + PUBACK_WAIT_S
            for rid, info in sent:
                while not info.is_published() and time.monotonic() < deadline and self._up_connected.is_set():
                    try:
                        info.wait_for_publish(0.1)
                    except (RuntimeError, ValueError):
                        break
                if not info.is_published():
                    break
                done.append(rid)
            self.store.ack(done)
            self.forwarded += len(done)
            if len(done) < len(sent):
                self._stop.wait(0.2)  # the link dropped mid-round: the rest goes again after reconnecting

    def _start_upstream(self) -> None:
        cfg = self.config
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgewise-gateway-{cfg.site}",
                             protocol=mqtt.MQTTv311, clean_session=False)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)  # type: ignore[arg-type]
        if cfg.upstream_username:
            client.username_pw_set(cfg.upstream_username, cfg.upstream_password)
        client.on_connect = self._on_upstream_connect
        client.on_disconnect = self._on_upstream_disconnect
        client.on_message = self._on_upstream_message
        host, port = cfg.broker_host_port
        client.connect_async(host, port, keepalive=15)
        client.loop_start()
        self._upstream = client

    def _on_upstream_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("upstream broker refused the gateway: %s (check upstream_username/password)", reason)
            return
        ids = self.config.device_ids
        subs = ([(topics.desired(d), 1) for d in ids] + [(topics.cmd(d), 1) for d in ids]) if ids else \
            [(f"{topics.DEVICES}/+/desired", 1), (f"{topics.DEVICES}/+/cmd/#", 1)]
        subs.append((f"{topics.FLEET}/#", 1))
        client.subscribe(subs)
        self._up_connected.set()
        self._wake.set()
        log.info("uplink up (%d queued message(s) to forward)", self.store.pending if self.store else 0)

    def _on_upstream_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._up_connected.is_set():
            log.warning("uplink down (%s); the site keeps working and the gateway queues", reason)
        self._up_connected.clear()

    # upstream -> site ------------------------------------------------------------------------

    def _on_upstream_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic, payload = msg.topic, bytes(msg.payload)
            retain = bool(msg.retain)
            if topic.startswith(topics.DEVICES + "/"):
                parsed = topics.parse(topic)
                if self.config.device_ids and parsed.device_id not in self.config.device_ids:
                    return
                if parsed.channel == "desired":
                    assert self.store is not None
                    self.store.set_desired(parsed.device_id, topic, payload)
                    self._learn_desired(topic, payload)
                    retain = True  # desired state is always retained (3.1.1 clears the flag on live delivery)
                elif parsed.channel != "cmd":
                    return
            self._publish_site(topic, payload, retain)
            self.relayed += 1
        except Exception:  # noqa: BLE001 - never raise into paho
            log.exception("relaying %s into the site failed", msg.topic)

    def _learn_desired(self, topic: str, payload: bytes) -> None:
        """Index the artifacts a desired state names (relative URLs only) and queue them for prefetching."""
        if not payload:
            return
        try:
            _, desired = decode_for_topic(topic, payload)
        except ProtocolError as exc:
            log.warning("desired state on %s does not decode (%s); relayed as is, nothing cached", topic, exc)
            return
        if not isinstance(desired, DesiredState):
            return
        refs = [desired.artifact]
        if desired.shadow is not None:
            refs.append(desired.shadow.artifact)
        if desired.agent is not None:
            refs.append(desired.agent.artifact)
        refs.extend(p.artifact for p in desired.placements or ())
        assert self.store is not None
        if desired.target is not None or (desired.shadow is not None and desired.shadow.target is not None):
            self._prefetch.append(TUF_REFRESH)  # a TUF device will ask for the metadata naming this target
            self._prefetch_wake.set()
        for ref in refs:
            if ref is None or not ref.url.startswith("/"):
                continue  # absolute URLs name a mirror the device reaches by itself
            self.store.learn_artifact(ref.url, ref.sha256, ref.size)
            self._prefetch.append(ref.url)
            self._prefetch_wake.set()

    def _publish_site(self, topic: str, payload: bytes, retain: bool) -> None:
        if self._site is None or not self._site_ready.wait(5):
            raise RuntimeError("the site broker client is not connected")
        self._site.publish(topic, payload, qos=1, retain=retain)

    def _start_site_client(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgewise-gateway-relay-{secrets.token_hex(3)}",
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.username_pw_set(self._access.control_username, self._access.control_password)
        client.max_inflight_messages_set(100)

        def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
            if not getattr(reason, "is_failure", False):
                self._site_ready.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *a: self._site_ready.clear()
        client.connect("127.0.0.1" if self.config.listen_host in ("0.0.0.0", "") else self.config.listen_host,
                       self.mqtt_port or 1883, keepalive=30)
        client.loop_start()
        self._site = client
        if not self._site_ready.wait(10):
            raise RuntimeError("the gateway could not log in to its own site broker")
        assert self.store is not None
        for topic, payload in self.store.all_desired():
            client.publish(topic, payload, qos=1, retain=True)

    def _prefetch_loop(self) -> None:
        while not self._stop.is_set():
            self._prefetch_wake.wait(1.0)
            self._prefetch_wake.clear()
            while self._prefetch and not self._stop.is_set():
                url = self._prefetch.pop(0)
                assert self.cache is not None and self.tokens is not None and self.tuf is not None
                token = self.config.api_token or next(iter(self.tokens.seen.values()), None)
                if url == TUF_REFRESH:
                    try:
                        self.tuf.refresh(token)
                    except (UplinkDown, ValueError, KeyError) as exc:
                        log.info("TUF metadata refresh: %s (devices asking for it get the last copy)", exc)
                    continue
                if self.cache.cached(url) is not None:
                    continue
                try:
                    self.cache.ensure(url, token)
                except CacheMiss as exc:
                    log.info("prefetch of %s: %s (a device asking for it retries)", url, exc.detail)

    # HTTP: artifact cache -------------------------------------------------------------------

    def _start_http(self) -> None:
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                gateway._serve(self, head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                gateway._serve(self, head=True)

        self._http = http.server.ThreadingHTTPServer((self.config.listen_host, self.config.http_port), Handler)
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        t = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                             name="edgewise-gateway-http", daemon=True)
        t.start()

    def _serve(self, req: http.server.BaseHTTPRequestHandler, *, head: bool) -> None:
        path = urlsplit(req.path).path
        if path == "/v1/health":
            return _send(req, 200, json.dumps(self.health()).encode(), "application/json", head=head)
        auth = req.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        assert self.tokens is not None and self.cache is not None
        if self.config.require_auth and (token is None or self.tokens.device_of(token) is None):
            return _error(req, 401, "send a device token of this site's devices as 'Authorization: Bearer ewd_…'")
        if self.store is not None and self.store.artifact(path) is not None:
            try:
                file = self.cache.ensure(path, self.config.api_token or token)
            except CacheMiss as exc:
                return _error(req, exc.status, exc.detail)
            return _send_file(req, file, head=head)
        self._pass_through(req, req.path, token, head=head)

    def _pass_through(self, req: http.server.BaseHTTPRequestHandler, path: str, token: str | None, *, head: bool) -> None:
        """Anything not in the artifact index (TUF metadata, the device's own reads) goes to the control plane.

        TUF metadata is kept as last seen (see :class:`TufMirror`) and served from there while the uplink is down."""
        assert self.tuf is not None
        name = self.tuf.name_of(urlsplit(path).path)
        try:
            resp = _http_get(self.config.upstream_server + path, token, timeout=15.0)
        except UplinkDown as exc:
            if name is not None:
                kept = self.tuf.get(name)
                if kept is not None:
                    status, body = kept
                    return _send(req, status, body, "application/json", head=head)
            return _error(req, 503, f"{path} is not cached at the site gateway and the uplink is down ({exc})")
        body = resp.read()
        status = getattr(resp, "status", 502)
        if name is not None:
            self.tuf.keep(name, status, body)
        _send(req, status, body, resp.headers.get("Content-Type", "application/octet-stream"), head=head)




def _send(req: http.server.BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, *, head: bool = False) -> None:
    req.send_response(status)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if not head:
        req.wfile.write(body)


def _error(req: http.server.BaseHTTPRequestHandler, status: int, detail: str) -> None:
    _send(req, status, json.dumps({"detail": detail, "error": "GatewayError"}).encode(), "application/json")


def _send_file(req: http.server.BaseHTTPRequestHandler, path: Path, *, head: bool) -> None:
    """Serve a cached bundle; ``Range: bytes=N-[M]`` gets 206 so a device resumes a broken download."""
    from .peers import parse_range  # one Range parser for every file the agent serves

    size = path.stat().st_size
    start, end = 0, size - 1
    wanted = parse_range(req.headers.get("Range"), size)
    if wanted is not None:
        if wanted == "unsatisfiable":
            req.send_response(416)
            req.send_header("Content-Range", f"bytes */{size}")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        start, end = wanted  # type: ignore[misc]
        req.send_response(206)
        req.send_header("Content-Range", f"bytes {start}-{end}/{size}")
    else:
        req.send_response(200)
    req.send_header("Accept-Ranges", "bytes")
    req.send_header("Content-Type", "application/octet-stream")
    req.send_header("Content-Length", str(end - start + 1))
    req.end_headers()
    if head:
        return
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            req.wfile.write(chunk)
            left -= len(chunk)


def run_gateway(config: GatewayConfig) -> None:
    """Run in the foreground until SIGINT/SIGTERM (``edgewise gateway``)."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gateway = Gateway(config).start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
