"""Peer distribution: devices on one network hand verified bundles to each other (issue 9, edge-to-edge).

Three small pieces, each usable alone:

- :class:`HeldBundles` — which verified bundles this device can hand out, by sha256: the slots
  (committed, previous, on trial: each recorded in ``slots/state.json`` after its signature was checked;
  an encrypted slot is decrypted into memory and its signature checked again before serving), placed
  models and the shadow candidate (``placed/*/<sha256>.ewb``, ``shadow/<sha256>.ewb``: served only if the
  file verifies against this device's trusted keys and hashes to its name; checked once per file version).
- :class:`PeerServer` — a read-only HTTP server: ``GET|HEAD /v1/peer/bundles/{sha256}`` with ``Range``
  (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), 404 for anything it does not hold. No listing, no writes,
  at most ``max_uploads`` transfers at once (503 + ``Retry-After`` beyond).
- :class:`PeerFetcher` — the updater's :class:`~edgewise.agent.updater.Fetcher` that asks peers first (the
  desired state's ``peers`` hint, then mDNS), with a short socket timeout, resuming one ``.part`` file across
  sources with ``Range``, and falls back to the control plane. **Trust does not change**: the size and
  sha256 it checks are the signed TUF target's (or, in signature-only mode, the desired state's), and the
  updater verifies the bundle signature after it; a peer that serves other bytes is banned for
  ``ban_s`` and the bytes are fetched again from elsewhere. A hostile peer wastes time, never installs.

mDNS (:class:`MdnsPeers`, python-zeroconf from the ``peer`` extra) advertises ``_edgewise-peer._tcp`` with
12-hex-digit *prefixes* of the sha256s held (enough to pick peers, not the full name a request needs).
:class:`Peers` ties them to an :class:`~edgewise.agent.service.Agent`. See docs/peer-distribution.md.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlsplit

from ..protocol import ArtifactRef
from .updater import FetchError, HttpFetcher, WrongBytesError

if TYPE_CHECKING:
    from ..security import TrustedKeys
    from .config import AgentConfig
    from .slots import Slots

log = logging.getLogger("edgewise.agent.peers")

ROUTE = "/v1/peer/bundles/"
SERVICE_TYPE = "_edgewise-peer._tcp.local."
HINT_HEX = 12  # sha256 prefix length advertised over mDNS
MAX_ADVERTISED = 16  # prefixes in one TXT record (13 bytes each: well inside a packet)
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 64 * 1024


# -- what this device holds -------------------------------------------------------------------------


@dataclass
class _Held:
    """One servable bundle: a plaintext file on disk, or plaintext bytes decrypted from a sealed slot."""

    sha256: str
    size: int
    path: Path | None = None
    data: bytes | bytearray | memoryview | None = None

    def chunks(self, start: int, end: int) -> Iterable[bytes]:
        """Bytes ``start`` .. ``end`` (inclusive), in chunks."""
        if self.data is not None:
            view = memoryview(self.data)
            for off in range(start, end + 1, _CHUNK):
                yield bytes(view[off:min(end + 1, off + _CHUNK)])
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


class HeldBundles:
    """The verified bundles this device can serve to peers, found by sha256 (see the module docstring)."""

    def __init__(self, slots: "Slots", trusted: Callable[[], "TrustedKeys"], dirs: Iterable[Path] = ()) -> None:
        self.slots = slots
        self.trusted = trusted
        self.dirs = [Path(d) for d in dirs]  # placed/ (one folder per model) and shadow/
        self._verified: dict[Path, tuple[tuple[int, int], bool]] = {}  # file -> (stat key, verified and named right)
        self._memory: tuple[str, Any] | None = None  # last decrypted slot (sha256, plaintext), reused for range requests
        self._memory_at = 0.0
        self._lock = threading.Lock()

    def _slot_records(self) -> dict[str, str]:
        """sha256 -> slot, for what state.json says each slot holds now (a trial replaces what its slot held before)."""
        out: dict[str, str] = {}
        trial = self.slots.trial()
        for rec in (self.slots.previous(), self.slots.record(), trial):
            if rec is None or (trial is not None and rec is not trial and rec.slot == trial.slot):
                continue
            for sha, slot in list(out.items()):
                if slot == rec.slot:
                    del out[sha]
            out[rec.sha256] = rec.slot
        return out

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for d in self.dirs:
            if not d.is_dir():
                continue
            files.extend(p for p in d.glob("*.ewb") if _SHA.match(p.stem))
            files.extend(p for p in d.glob("*/*.ewb") if _SHA.match(p.stem))
        return files

    def _file_ok(self, path: Path) -> bool:
        """The file verifies against the trusted keys and its sha256 is its name (cached per size + mtime)."""
        from ..bundle import BundleError, verify_bundle

        try:
            st = path.stat()
        except OSError:
            return False
        key = (st.st_size, st.st_mtime_ns)
        known = self._verified.get(path)
        if known is not None and known[0] == key:
            return known[1]
        try:
            ok = verify_bundle(path, self.trusted()).sha256 == path.stem
        except (BundleError, OSError):
            ok = False
        if not ok:
            log.warning("not serving %s to peers: it does not verify or its sha256 is not its name", path)
        self._verified[path] = (key, ok)
        return ok

    def holds(self) -> list[str]:
        """sha256 of every bundle this device can serve (slot records first, newest committed first)."""
        with self._lock:
            out = list(reversed(list(self._slot_records())))
            for p in self._files():
                if p.stem not in out and self._file_ok(p):
                    out.append(p.stem)
            return out

    def open(self, sha256: str) -> _Held | None:
        """The bundle named ``sha256``, checked again before it is served; None if this device does not hold it."""
        if not _SHA.match(sha256):
            return None
        with self._lock:
            if self._memory is not None and self._memory[0] == sha256:
                self._memory_at = time.monotonic()
                data = self._memory[1]
                return _Held(sha256, len(data), data=data)
            self._memory = None  # one decrypted bundle in memory at most
            slot = self._slot_records().get(sha256)
            if slot is not None:
                return self._open_slot(sha256, slot)
            for p in self._files():
                if p.stem == sha256 and self._file_ok(p):
                    return _Held(sha256, p.stat().st_size, path=p)
        return None

    def _open_slot(self, sha256: str, slot: str) -> _Held | None:
        from ..bundle import BundleError, verify_bundle
        from .slots import SealedSlotBundle

        path = self.slots.bundle(slot)
        try:
            vb = verify_bundle(path, self.trusted())  # a sealed slot is decrypted into memory, never to disk
        except (BundleError, OSError) as exc:
            log.warning("not serving slot %s to peers: %s", slot, exc)
            return None
        if vb.sha256 != sha256:
            log.warning("not serving slot %s to peers: it holds %s…, state.json records %s…", slot, vb.sha256[:12], sha256[:12])
            return None
        if isinstance(path, SealedSlotBundle) and vb.data is not None:
            self._memory, self._memory_at = (sha256, vb.data), time.monotonic()
            return _Held(sha256, len(vb.data), data=vb.data)
        return _Held(sha256, vb.size, path=Path(path))

    def forget_memory(self, idle_s: float = 60.0) -> None:
        """Drop the decrypted copy once no peer asked for it for ``idle_s`` (called by the server's housekeeping)."""
        with self._lock:
            if self._memory is not None and time.monotonic() - self._memory_at > idle_s:
                self._memory = None


# -- serving ------------------------------------------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end)`` inclusive for a single byte range, None for the whole file, "unsatisfiable" for 416.

    Several ranges, or a header that is not a byte range, are answered with the whole file (RFC 9110 lets a
    server ignore Range); a client that asked for a suffix it already has gets 416.
    """
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32


class PeerServer:
    """Read-only HTTP server for :class:`HeldBundles` (``GET|HEAD /v1/peer/bundles/{sha256}``, Range supported)."""

    def __init__(self, held: HeldBundles, host: str = "0.0.0.0", port: int = 0, *, max_uploads: int = 4) -> None:
        self.held = held
        self.uploads = threading.BoundedSemaphore(max_uploads)
        self.bytes_served = 0
        self.requests = 0
        self._count_lock = threading.Lock()
        handler = type("PeerHandler", (_PeerHandler,), {"peer": self})
        self._server = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_served += n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgewise-peer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


class _PeerHandler(BaseHTTPRequestHandler):
    peer: PeerServer
    protocol_version = "HTTP/1.1"
    server_version = "edgewise-peer"
    timeout = 15  # a peer that stops reading gives its thread back

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _plain(self, status: int, text: str, **headers: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        with self.peer._count_lock:
            self.peer.requests += 1
        path = self.path.split("?", 1)[0]
        if not path.startswith(ROUTE):
            self._plain(404, f"no route {path}; peers serve only GET {ROUTE}<sha256>")
            return
        sha = path[len(ROUTE):].lower()
        if not _SHA.match(sha):
            self._plain(400, f"{sha!r} is not a sha256 (64 hex digits)")
            return
        if not self.peer.uploads.acquire(blocking=False):
            self._plain(503, "this peer is busy serving others; ask another source", Retry_After="5")
            return
        try:
            held = self.peer.held.open(sha)
            if held is None:
                self._plain(404, f"this device holds no verified bundle {sha}")
                return
            rng = parse_range(self.headers.get("Range"), held.size)
            if rng == "unsatisfiable":
                self._plain(416, f"range {self.headers.get('Range')!r} is outside the {held.size} bytes", Content_Range=f"bytes */{held.size}")
                return
            if rng is None:
                start, end = 0, held.size - 1
                self.send_response(200)
            else:
                start, end = rng  # type: ignore[misc]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{held.size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Content-Length", str(max(0, end - start + 1)))
            self.end_headers()
            if self.command == "HEAD" or held.size == 0:
                return
            try:
                for chunk in held.chunks(start, end):
                    self.wfile.write(chunk)
                    self.peer.count(len(chunk))
            except OSError:
                self.close_connection = True  # the peer went away: its next request resumes with Range
        finally:
            self.peer.uploads.release()


# -- fetching -----------------------------------------------------------------------------------------


class _PeerHttp(HttpFetcher):
    """HttpFetcher toward a peer: never sends the device token (peers are not the control plane)."""

    def headers(self) -> dict[str, str]:
        return {"User-Agent": "edgewise-agent-peer"}


@dataclass
class PeerStats:
    """What peer distribution did on this device (``Peers.stats``, ``/v1/health``)."""

    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    fetched_from_peer: int = 0
    fetched_from_origin: int = 0
    peer_failures: dict[str, int] = field(default_factory=dict)
    bad_peers: dict[str, int] = field(default_factory=dict)


class PeerFetcher:
    """Peers first (hints, then mDNS), the control plane (``origin``) last; see the module docstring.

    ``hint(urls)`` sets the peers the latest desired state named; ``discovered(sha256)`` (optional) returns
    peers found another way (mDNS). ``self_url`` is never asked. Thread-safe: the updater, shadow and
    placements may fetch at the same time (one ``.part`` file each).
    """

    def __init__(
        self,
        origin: HttpFetcher | None,
        *,
        timeout: float = 3.0,
        ban_s: float = 600.0,
        discovered: Callable[[str], list[str]] | None = None,
        self_url: Callable[[], str | None] = lambda: None,
        enabled: bool = True,
    ) -> None:
        self.origin = origin
        self.enabled = enabled  # False (peer_fetch = false): straight to the origin, peers never asked
        self.timeout = timeout
        self.ban_s = ban_s
        self.discovered = discovered
        self.self_url = self_url
        self.stats = PeerStats()
        self._hints: list[str] = []
        self._banned: dict[str, float] = {}
        self._lock = threading.Lock()

    # HttpFetcher's interface, for code that uses the fetcher's headers or URL resolution (TUF client, agent releases).
    @property
    def base_url(self) -> str | None:
        return self.origin.base_url if self.origin is not None else None

    def headers(self) -> dict[str, str]:
        return self.origin.headers() if self.origin is not None else {"User-Agent": "edgewise-agent"}

    def resolve(self, url: str) -> str:
        if self.origin is None:
            raise FetchError(f"artifact URL {url!r} cannot be resolved: the agent has no server URL")
        return self.origin.resolve(url)

    def hint(self, urls: Iterable[str]) -> None:
        """The peers the control plane named for the current desired state (replaces the previous hint)."""
        clean = []
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme in ("http", "https") and parts.hostname and u not in clean:
                clean.append(u.rstrip("/"))
        with self._lock:
            self._hints = clean

    def banned(self) -> dict[str, float]:
        """Peers not asked until the given monotonic time (those that served wrong bytes)."""
        now = time.monotonic()
        with self._lock:
            self._banned = {u: t for u, t in self._banned.items() if t > now}
            return dict(self._banned)

    def ban(self, url: str, reason: str) -> None:
        with self._lock:
            self._banned[url] = time.monotonic() + self.ban_s
            self.stats.bad_peers[url] = self.stats.bad_peers.get(url, 0) + 1
        log.warning("peer %s served wrong bytes (%s); not asking it again for %.0f s", url, reason, self.ban_s)

    def candidates(self, sha256: str) -> list[str]:
        """Peers to ask for ``sha256``, in order: hinted, then discovered; never self, never banned."""
        if not self.enabled:
            return []
        banned = self.banned()
        me = (self.self_url() or "").rstrip("/")
        with self._lock:
            urls = list(self._hints)
        if self.discovered is not None:
            try:
                urls += [u for u in self.discovered(sha256) if u not in urls]
            except Exception:  # discovery is a hint; it must never fail a download
                log.debug("peer discovery failed", exc_info=True)
        return [u for u in urls if u != me and u not in banned]

    def fetch(self, artifact: ArtifactRef, dest: Path) -> Path:
        dest = Path(dest)
        if dest.exists() and self.origin is not None:
            return self.origin.fetch(artifact, dest)  # already complete (checked there), or fetched again
        part = dest.with_name(dest.name + ".part")
        contributors: list[str] = []  # peers whose bytes are in the .part file (a final mismatch bans them all)
        for peer in self.candidates(artifact.sha256):
            before = _size(part)
            src = _PeerHttp(timeout=self.timeout)
            ref = ArtifactRef(url=f"{peer}{ROUTE}{artifact.sha256}", sha256=artifact.sha256, size=artifact.size)
            try:
                src.fetch(ref, dest)
            except WrongBytesError as exc:
                for bad in {*contributors, peer}:
                    self.ban(bad, str(exc))
                contributors.clear()
                continue
            except FetchError as exc:
                got = _size(part) - before
                if got > 0:
                    contributors.append(peer)
                    self._count(peer=got)
                with self._lock:
                    self.stats.peer_failures[peer] = self.stats.peer_failures.get(peer, 0) + 1
                log.info("peer %s could not serve %s… (%s); trying the next source", peer, artifact.sha256[:12], exc)
                continue
            self._count(peer=max(0, artifact.size - before), done_peer=True)
            log.info("fetched %s… (%d bytes) from peer %s", artifact.sha256[:12], artifact.size, peer)
            return dest
        if self.origin is None:
            raise FetchError(f"no peer could serve {artifact.sha256[:12]}… and the agent has no server URL")
        before = _size(part)
        try:
            path = self.origin.fetch(artifact, dest)
        except WrongBytesError as exc:
            if not contributors:
                raise
            for bad in contributors:  # a peer's bytes earlier in the file spoiled the origin's resume: start over
                self.ban(bad, str(exc))
            before = 0
            path = self.origin.fetch(artifact, dest)
        except FetchError:
            self._count(origin=max(0, _size(part) - before))
            raise
        self._count(origin=max(0, artifact.size - before), done_origin=True)
        return path

    def _count(self, *, peer: int = 0, origin: int = 0, done_peer: bool = False, done_origin: bool = False) -> None:
        with self._lock:
            self.stats.bytes_from_peers += peer
            self.stats.bytes_from_origin += origin
            self.stats.fetched_from_peer += done_peer
            self.stats.fetched_from_origin += done_origin


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- mDNS ---------------------------------------------------------------------------------------------


class MdnsPeers:
    """Advertise this device's peer server and browse for others (python-zeroconf, ``_edgewise-peer._tcp``).

    TXT record: ``id`` (device id), ``h`` (comma-separated 12-hex prefixes of the sha256s held, at most 16),
    ``p`` (the URL path prefix). ``peers_for(sha256)`` returns the URLs of peers whose hints match.
    """

    def __init__(self, device_id: str, *, port: int | None, address: str | None, holds: Callable[[], list[str]],
                 interfaces: Any = None, refresh_s: float = 5.0) -> None:
        try:
            from zeroconf import InterfaceChoice, ServiceBrowser, ServiceStateChange, Zeroconf  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("mDNS peer discovery needs python-zeroconf: pip install 'edgewise[peer]'") from exc
        self.device_id = device_id
        self.port = port
        self.address = address
        self._holds = holds
        self.refresh_s = refresh_s
        self._interfaces = interfaces if interfaces is not None else InterfaceChoice.All
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._advertised: list[str] | None = None
        self._peers: dict[str, tuple[str, set[str]]] = {}  # service name -> (url, hash prefixes)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def service_name(self) -> str:
        return f"{self.device_id}.{SERVICE_TYPE}"

    def start(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        self._zc = Zeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        if self.port is not None:
            self._advertise()
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        self._thread = threading.Thread(target=self._loop, name="edgewise-peer-mdns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._zc is not None:
            try:
                if self._browser is not None:
                    self._browser.cancel()
                if self._info is not None:
                    self._zc.unregister_service(self._info)
            finally:
                self._zc.close()
            self._zc = None

    def _txt(self, holds: list[str]) -> dict[str, str]:
        return {"id": self.device_id, "h": ",".join(h[:HINT_HEX] for h in holds[:MAX_ADVERTISED]), "p": ROUTE}

    def _advertise(self) -> None:
        from zeroconf import ServiceInfo

        holds = self._holds()
        if holds == self._advertised:
            return
        info = ServiceInfo(SERVICE_TYPE, self.service_name, port=self.port, properties=self._txt(holds),
                           addresses=[socket.inet_aton(self.address or "127.0.0.1")], server=f"{self.device_id}.local.")
        if self._info is None:
            self._zc.register_service(info, allow_name_change=True)
        else:
            self._zc.update_service(info)
        self._info, self._advertised = info, holds

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if self.port is not None:
                    self._advertise()
                for name in list(self._peers):
                    self._resolve(name)
            except Exception:
                log.debug("mDNS refresh failed", exc_info=True)

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if name == self.service_name or (self._info is not None and name == self._info.name):
            return
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._peers.pop(name, None)
            return
        threading.Thread(target=self._resolve, args=(name,), daemon=True).start()  # never block zeroconf's loop

    def _resolve(self, name: str) -> None:
        from zeroconf import ServiceInfo

        if self._zc is None:
            return
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.request(self._zc, 3000):
            return
        props = {k.decode(): (v or b"").decode() for k, v in (info.properties or {}).items()}
        addrs = info.parsed_addresses()
        if not addrs or not info.port:
            return
        url = f"http://{addrs[0]}:{info.port}"
        with self._lock:
            self._peers[name] = (url, {h for h in props.get("h", "").split(",") if h})

    def peers(self) -> dict[str, tuple[str, set[str]]]:
        with self._lock:
            return dict(self._peers)

    def peers_for(self, sha256: str) -> list[str]:
        """URLs of discovered peers that advertise holding ``sha256`` (by its prefix)."""
        prefix = sha256[:HINT_HEX]
        return [url for url, hints in self.peers().values() if prefix in hints]


# -- the agent's peer stack ---------------------------------------------------------------------------


def primary_address(toward: str | None = None) -> str:
    """The local address the OS routes toward ``toward`` (a URL or host; default a public address), no packet sent."""
    host = urlsplit(toward).hostname if toward and "//" in toward else toward
    target = host or "192.0.2.1"  # TEST-NET-1: only used to pick a route
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class Peers:
    """One agent's peer distribution: serve what it holds (``peer_port``), fetch from peers, find them by mDNS.

    Built by the agent from its configuration (:meth:`for_agent`); ``fetcher`` replaces the agent's plain
    HTTP fetcher, ``peer_url`` and ``holds()`` go into its DeviceState, ``hint`` takes DesiredState.peers.
    """

    def __init__(self, held: HeldBundles, fetcher: PeerFetcher, *, device_id: str, port: int | None, host: str = "0.0.0.0",
                 url: str | None = None, mdns: bool = False, toward: str | None = None) -> None:
        self.held = held
        self.fetcher = fetcher
        self.device_id = device_id
        self._port, self._host, self._url, self._mdns_on, self._toward = port, host, url, mdns, toward
        self.server: PeerServer | None = None
        self.mdns: MdnsPeers | None = None
        self._stop = threading.Event()
        fetcher.self_url = lambda: self.peer_url
        fetcher.discovered = self._discovered

    @classmethod
    def for_agent(cls, config: "AgentConfig", slots: "Slots", trusted: Callable[[], "TrustedKeys"], origin: HttpFetcher | None) -> "Peers":
        state = Path(config.state_dir)
        held = HeldBundles(slots, trusted, [state / "placed", state / "shadow"])
        fetcher = PeerFetcher(origin, timeout=config.peer_timeout_s, ban_s=config.peer_ban_s, enabled=config.peer_fetch)
        return cls(held, fetcher, device_id=config.device_id, port=config.peer_port, host=config.peer_host, url=config.peer_url,
                   mdns=config.peer_mdns, toward=config.server_url)

    @property
    def serving(self) -> bool:
        return self.server is not None

    @property
    def peer_url(self) -> str | None:
        """Where peers reach this device (None while it does not serve)."""
        if self.server is None:
            return None
        if self._url:
            return self._url.rstrip("/")
        host = self.server.host
        if host in ("0.0.0.0", ""):
            host = primary_address(self._toward)
        return f"http://{host}:{self.server.port}"

    def holds(self) -> list[str]:
        """What this device serves (empty while it does not serve)."""
        if self.server is None:
            return []
        try:
            return self.held.holds()
        except Exception:  # a report must never fail on this
            log.debug("cannot list held bundles", exc_info=True)
            return []

    def hint(self, urls: Iterable[str]) -> None:
        self.fetcher.hint(urls)

    def _discovered(self, sha256: str) -> list[str]:
        return self.mdns.peers_for(sha256) if self.mdns is not None else []

    def start(self) -> None:
        """Open the peer server (when a port is configured) and mDNS (when asked); failures are logged, not fatal."""
        if self._port is not None:
            try:
                self.server = PeerServer(self.held, self._host, self._port)
                self.server.start()
                log.info("%s serves verified bundles to peers at %s", self.device_id, self.peer_url)
            except OSError as exc:
                self.server = None
                log.error("cannot open the peer server on %s:%s: %s; serving nothing to peers", self._host, self._port, exc.strerror or exc)
        if self._mdns_on:
            try:
                addr = urlsplit(self.peer_url).hostname if self.peer_url else None
                # mDNS on the peer server's interface when it binds one address (the site LAN), else on all of them
                interfaces = [self._host] if self._host not in ("0.0.0.0", "", "::") else None
                self.mdns = MdnsPeers(self.device_id, port=self.server.port if self.server else None, address=addr, holds=self.holds,
                                      interfaces=interfaces)
                self.mdns.start()
            except Exception as exc:  # no zeroconf, no multicast: peers from hints still work
                self.mdns = None
                log.error("mDNS peer discovery is off: %s", exc)
        threading.Thread(target=self._housekeeping, name="edgewise-peer-housekeeping", daemon=True).start()

    def _housekeeping(self) -> None:
        while not self._stop.wait(10.0):
            self.held.forget_memory()

    def stop(self) -> None:
        self._stop.set()
        if self.mdns is not None:
            self.mdns.stop()
            self.mdns = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def describe(self) -> dict[str, Any]:
        """For ``/v1/health``: where it serves, what it holds, where its bytes came from, who is banned."""
        s = self.fetcher.stats
        return {
            "peer_url": self.peer_url,
            "holds": self.holds(),
            "bytes_served": self.server.bytes_served if self.server else 0,
            "bytes_from_peers": s.bytes_from_peers,
            "bytes_from_origin": s.bytes_from_origin,
            "fetched_from_peer": s.fetched_from_peer,
            "fetched_from_origin": s.fetched_from_origin,
            "peer_failures": dict(s.peer_failures),
            "bad_peers": dict(s.bad_peers),
            "banned": sorted(self.fetcher.banned()),
            "mdns_peers": sorted(u for u, _ in self.mdns.peers().values()) if self.mdns else [],
        }


__all__ = ["HeldBundles", "MdnsPeers", "PeerFetcher", "PeerServer", "PeerStats", "Peers", "parse_range", "primary_address",
           "ROUTE", "SERVICE_TYPE"]
