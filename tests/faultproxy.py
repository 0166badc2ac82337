"""A small threaded TCP proxy on loopback for link-fault tests (no tests here).

Put it between an agent and its broker: ``FaultProxy(upstream_port)`` listens on
``proxy.port`` and, depending on ``mode``:

- ``"forward"``: copies bytes both ways (the normal link; ``rate_bytes_s`` makes it a slow one);
- ``"drop"``: closes every open connection and closes new ones right after accepting
  (a link that is down: connection refused/reset);
- ``"stall"``: keeps connections open but forwards nothing in either direction, and new
  connections are accepted but never forwarded (a black hole: the worst case for
  keepalives and PUBACK timeouts).

Switching from ``"stall"`` back to ``"forward"`` resumes the stalled connections that were
forwarded before (a link that recovers without a reset); connections accepted while stalled
never reach the upstream and are closed by the next ``"drop"``.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Literal

Mode = Literal["forward", "drop", "stall"]


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, rate_bytes_s: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rate_bytes_s = rate_bytes_s  # a slow link (each direction), so a sync takes long enough to interrupt
        self._mode: Mode = "forward"
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket | None]] = []
        self._closed = threading.Event()
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        if mode not in ("forward", "drop", "stall"):
            raise ValueError(mode)
        with self._lock:
            self._mode = mode
            conns = list(self._conns) if mode == "drop" else []
            if mode == "drop":
                self._conns.clear()
        for pair in conns:
            _close(*pair)

    def forward(self) -> None:
        self.set_mode("forward")

    def drop(self) -> None:
        self.set_mode("drop")

    def stall(self) -> None:
        self.set_mode("stall")

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._closed.set()
        self.set_mode("drop")
        self._listener.close()

    # -- internals ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            mode = self._mode
            if mode == "drop":
                _close(client, None)
                continue
            upstream: socket.socket | None = None
            if mode == "forward":
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    _close(client, None)  # broker down: the client sees the connection closed
                    continue
            with self._lock:
                self._conns.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), name="faultproxy-pump", daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        try:
            if upstream is None:  # accepted while stalled: never forwarded; wait until dropped
                while not self._closed.is_set() and client.fileno() != -1:
                    if self._mode == "drop":
                        break
                    self._closed.wait(0.1)
                return
            socks = [client, upstream]
            peer = {client: upstream, upstream: client}
            while not self._closed.is_set():
                if client.fileno() == -1 or upstream.fileno() == -1:
                    return
                if self._mode != "forward":  # stall: stop reading, let the kernel buffers fill
                    if self._mode == "drop":
                        return
                    self._closed.wait(0.05)
                    continue
                try:
                    readable, _, _ = select.select(socks, [], [], 0.05)
                except (OSError, ValueError):
                    return
                for s in readable:
                    if self._mode != "forward":
                        break
                    rate = self.rate_bytes_s
                    try:
                        data = s.recv(max(1024, rate // 20) if rate else 65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if rate:
                        time.sleep(len(data) / rate)
                    try:
                        peer[s].sendall(data)
                    except OSError:
                        return
        finally:
            with self._lock:
                if (client, upstream) in self._conns:
                    self._conns.remove((client, upstream))
            _close(client, upstream)


def _close(a: socket.socket, b: socket.socket | None) -> None:
    for s in (a, b):
        if s is None:
            continue
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


# -- agents as real processes, seeded offline --------------------------------------------------------

def seed_device(state_dir, device_id: str, keys_dir, bundle=None, **settings):  # type: ignore[no-untyped-def]
    """Prepare a device state dir (trust, config.toml with fast timers) and install ``bundle`` offline."""
    from pathlib import Path

    from edgewise.agent.config import load_config
    from edgewise.agent.service import Agent

    state_dir = Path(state_dir)
    (state_dir / "trust").mkdir(parents=True, exist_ok=True)
    (state_dir / "trust" / "signing.pub").write_bytes((Path(keys_dir) / "signing.pub").read_bytes())
    # crash safety and links are under test here, not TUF (tests/test_security_tuf*.py): bundles come from a plain server
    conf = dict(flush_interval_s=0.1, reconnect_base_s=0.1, reconnect_cap_s=1.0, update_trust="signature-only")
    conf.update(settings)
    seed = Agent(load_config(state_dir, device_id=device_id, **conf))
    try:
        if bundle is not None:
            result = seed.install(bundle)
            assert result.result == "ok", result
    finally:
        seed.stop()


def agent_process(state_dir, device_id: str, keys_dir, broker_url: str, *, server_url: str = "http://127.0.0.1:9",  # type: ignore[no-untyped-def]
                  telemetry_interval_s: float = 0.5):
    from pathlib import Path

    from edgewise.sim.fleet import AgentProcess

    return AgentProcess(
        device_id=device_id, state_dir=Path(state_dir), server_url=server_url, broker_url=broker_url,
        trust=Path(keys_dir) / "signing.pub", telemetry_interval_s=telemetry_interval_s,
    )
