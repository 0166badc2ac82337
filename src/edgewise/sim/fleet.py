"""Agents as real OS processes on one machine: for the demo, end-to-end tests and benchmarks.

Each agent runs `python -m edgewise.cli.main agent` in its own state folder with
its local API on a free port (read back from STATE/api.port), exactly as on a
device; nothing is shared but the broker and the control plane's URL.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import atomic_write


class FleetError(RuntimeError):
    pass


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 10.0, *, token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> Any:
    """Small JSON-over-HTTP client (stdlib): the demo must not need more.

    ``token`` is sent as ``Authorization: Bearer`` (the control plane's API needs one: e.g. ``ControlPlane.admin_token``);
    ``context`` verifies an HTTPS server against a private CA or self-signed certificate.
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise FleetError(f"{method} {url} -> HTTP {exc.code}: {detail}") from None
    return json.loads(raw) if raw else None


@dataclass
class AgentProcess:
    device_id: str
    state_dir: Path
    server_url: str
    broker_url: str
    trust: Path
    tags: list[str] = field(default_factory=list)
    telemetry_interval_s: float = 1.0
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    api_port: int | None = None
    device_token: str | None = None  # written to state/keys/device.token: the agent sends it to the control plane
    tuf_root: Path | None = None  # the control plane's TUF root.json; None: fetched from the server on first start (simulator only)
    update_trust: str | None = None  # "signature-only" for agents without TUF

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.device_token:
            keys = self.state_dir / "keys"
            keys.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(keys / "device.token", (self.device_token + "\n").encode(), mode=0o600)
        (self.state_dir / "api.port").unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "edgewise.cli.main", "agent",
            "--state-dir", str(self.state_dir), "--server", self.server_url, "--broker", self.broker_url,
            "--device-id", self.device_id, "--api-port", "0",
            "--telemetry-interval", str(self.telemetry_interval_s), "--trust", str(self.trust),
        ]
        for t in self.tags:
            cmd += ["--tag", t]
        if self.update_trust:
            cmd += ["--update-trust", self.update_trust]
        if self.update_trust != "signature-only":
            root = self.tuf_root or self._fetch_tuf_root()
            if root is not None:
                cmd += ["--tuf-root", str(root)]
        log = open(self.log_path or (self.state_dir / "agent.log"), "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def _fetch_tuf_root(self) -> Path | None:
        """Trust on first use, for simulated devices only: a real device gets root.json at provisioning.

        None when the device already has a root or the server cannot be reached (an agent started while the
        control plane is down): the agent then serves its committed model and refuses updates until it has one.
        """
        import urllib.error
        import urllib.request

        if (self.state_dir / "trust" / "root.json").is_file():
            return None
        dest = self.state_dir / "tuf-root-provisioned.json"
        if not dest.is_file():
            headers = {"Authorization": f"Bearer {self.device_token}"} if self.device_token else {}
            req = urllib.request.Request(self.server_url.rstrip("/") + "/api/v1/tuf/metadata/1.root.json", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    atomic_write(dest, resp.read())
            except (urllib.error.URLError, OSError):
                return None
        return dest

    def wait_ready(self, timeout: float = 60.0) -> None:
        port_file = self.state_dir / "api.port"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise FleetError(f"agent {self.device_id} exited with {self.proc.returncode}; see {self.state_dir / 'agent.log'}")
            if port_file.exists():
                try:
                    self.api_port = int(port_file.read_text().strip())
                    self.health()
                    return
                except (ValueError, OSError, FleetError):
                    pass
            time.sleep(0.1)
        raise FleetError(f"agent {self.device_id} did not answer within {timeout}s; see {self.state_dir / 'agent.log'}")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def health(self) -> dict[str, Any]:
        return http_json("GET", f"{self.api_url}/v1/health", timeout=5)

    def predict(self, x: np.ndarray) -> dict[str, Any]:
        return http_json("POST", f"{self.api_url}/v1/predict", {"inputs": {"x": x.tolist()}})

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; raise FleetError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}")
