"""Helpers shared by the agent tests (no tests here): a bundle HTTP server, a stand-in control plane, a broker.

Imported as ``from test_agent_support import ...`` (pytest puts ``tests/`` on sys.path).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from edgewise.agent import Agent, load_config
from edgewise.sim.fleet import wait_until
from edgewise.protocol import ArtifactRef, DesiredState, ProtocolError, decode_for_topic, encode, topics


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> Any:
    """The simulator's poller with the agent tests' tighter defaults."""
    return wait_until(predicate, timeout, interval=interval, what=what)


def make_agent(state_dir: Path, keys_dir: Path, **overrides: Any) -> Agent:
    """An agent that trusts keys_dir/signing.pub, with a free API port and fast timers."""
    trust = state_dir / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(keys_dir / "signing.pub", trust / "signing.pub")
    settings: dict[str, Any] = dict(api_port=0, telemetry_interval_s=0.2, flush_interval_s=0.05, reconnect_base_s=0.05, reconnect_cap_s=0.5)
    settings.setdefault("update_trust", "signature-only")  # these tests are about the agent, not TUF (test_security_tuf*)
    settings.update(overrides)
    return Agent(load_config(state_dir, **settings))


def artifact_for(path: Path, url: str) -> ArtifactRef:
    data = Path(path).read_bytes()
    return ArtifactRef(url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


class BundleServer:
    """Serves byte strings over HTTP with Range support; can drop the first response of a path halfway."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the first response is cut
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                rng = self.headers.get("Range")
                outer.requests.append((path, rng))
                data = outer.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
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
                cut = outer.cut_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base_url + path

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ControlPlane:
    """Plays the control plane on a real broker: publishes desired state, collects what devices report."""

    def __init__(self, broker_url: str, *, client_id: str | None = None, clean_session: bool = True) -> None:
        parts = urlsplit(broker_url)
        self.messages: list[tuple[str, Any]] = []
        self.raw: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._retained: set[str] = set()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"cp-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv311, clean_session=clean_session,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        self.client.subscribe([(t, 1) for t in topics.CONTROL_SUBSCRIPTIONS])
        assert subscribed.wait(5), "control plane could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.raw.append((msg.topic, msg.payload))
            try:
                self.messages.append((msg.topic, decode_for_topic(msg.topic, msg.payload)[1]))
            except ProtocolError:
                pass

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        if retain:
            self._retained.add(topic)

    def desire(
        self, device_id: str, generation: int, *, model: str | None = None, version: str | None = None,
        artifact: ArtifactRef | None = None, rollback: bool = False,
    ) -> None:
        msg = DesiredState(
            device_id=device_id, generation=generation, model=model, version=version, artifact=artifact,
            rollback=rollback, issued_at=time.time(),
        )
        self.publish(topics.desired(device_id), encode(msg))

    def of(self, device_id: str, kind: str) -> list[Any]:
        """Messages of ``kind`` (state/telemetry/event) from one device; batches are flattened."""
        out: list[Any] = []
        with self._lock:
            msgs = list(self.messages)
        for _, m in msgs:
            items = m.items if m.type == "batch" else [m]
            out.extend(i for i in items if i.type == kind and i.device_id == device_id)
        return out

    def last_state(self, device_id: str) -> Any:
        states = self.of(device_id, "state")
        return states[-1] if states else None

    def close(self, *, clear_retained: bool = True) -> None:
        if clear_retained:
            for topic in self._retained:  # leave no retained desired state for the next test
                self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


class Mosquitto:
    """A broker the test starts and stops itself (for "the broker appears later")."""

    def __init__(self, port: int, workdir: Path, *, persistent: bool = False) -> None:
        self.port = port
        self.conf = workdir / "mosquitto.conf"
        self.store: Path | None = None
        conf = f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_type error\n"
        if persistent:  # sessions and queued messages survive a broker restart
            # Outside pytest's 0700 tmp tree: mosquitto started as root drops to its own user before it writes.
            self.store = Path(tempfile.mkdtemp(prefix="edgewise-mq-"))
            self.store.chmod(0o777)
            conf += f"persistence true\npersistence_location {self.store}/\nautosave_interval 0\n"
        else:
            conf += "persistence false\n"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)
