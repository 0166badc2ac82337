"""Helpers for the peer distribution tests (no tests here): an HTTP artifact server that counts what it serves
and can misbehave (tampered bytes, a connection dropped mid-file), as the control plane's or a hostile peer's.

Imported as ``from test_peer_support import ...``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgewise.agent.peers import ROUTE
from edgewise.protocol import ArtifactRef, DesiredState, encode, topics


class CountingServer:
    """Serves byte strings with Range support and counts requests and body bytes per path.

    ``tamper``: paths whose bytes are served with one byte flipped; ``cut_after``: path -> bytes sent before the
    connection is dropped (every response to it, until removed).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.files: dict[str, bytes] = {}
        self.tamper: set[str] = set()
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent: dict[str, int] = {}
        self.authorization: list[str | None] = []  # the Authorization header of every request
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                rng = self.headers.get("Range")
                with outer._lock:
                    outer.requests.append((path, rng))
                    outer.authorization.append(self.headers.get("Authorization"))
                data = outer.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in outer.tamper:
                    i = len(data) // 3  # one byte flipped, a third of the way in
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = outer.cut_after.get(path)
                if cut is not None:
                    body = body[:cut]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                with outer._lock:
                    outer.bytes_sent[path] = outer.bytes_sent.get(path, 0) + len(body)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base_url + path

    def add_as_peer(self, data: bytes) -> str:
        """Serve ``data`` the way a peer does (``/v1/peer/bundles/<sha256>``); returns the peer's base URL."""
        self.files[ROUTE + hashlib.sha256(data).hexdigest()] = data
        return self.base_url

    def sent(self, path: str) -> int:
        with self._lock:
            return self.bytes_sent.get(path, 0)

    def requests_for(self, path: str) -> list[str | None]:
        with self._lock:
            return [r for p, r in self.requests if p == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def artifact(path: Path, url: str) -> ArtifactRef:
    data = Path(path).read_bytes()
    return ArtifactRef(url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def desire(cp: Any, device_id: str, generation: int, ref: ArtifactRef, *, model: str = "digits", version: str = "1.1.0",
           peers: list[str] | None = None) -> None:
    """Publish a desired state (retained) through the test's stand-in control plane, with a peers hint."""
    msg = DesiredState(device_id=device_id, generation=generation, model=model, version=version, artifact=ref,
                       peers=peers or [], issued_at=time.time())
    cp.publish(topics.desired(device_id), encode(msg))
