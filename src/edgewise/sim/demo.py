"""`edgewise demo`: the whole loop on one machine, with no external service and no download.

Trains two real classifiers on scikit-learn's bundled digits, signs them into
bundles, starts the control plane (embedded MQTT broker + SQLite in a temporary
folder) and N agents as separate processes, deploys 1.0.0, has every agent
classify held-out digits, rolls out 1.1.0, waits until every agent runs it,
classifies again, and reports what the control plane received.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .fleet import AgentProcess, FleetError, http_json, wait_until

Progress = Callable[[str], None]


@dataclass
class DeviceSummary:
    device_id: str
    version: str | None
    inferences: int
    correct: int
    p95_ms: float | None
    telemetry_issued: int
    telemetry_received: int


@dataclass
class DemoResult:
    devices: int
    deployed: int
    final_version: str
    inferences: int
    accuracy: float
    telemetry_received: int
    telemetry_lost: int
    wall_time_s: float
    dashboard: str
    per_device: list[DeviceSummary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_bundle(server: str, path: Path, token: str | None = None) -> dict[str, Any]:
    """POST a signed bundle; ``token`` is an operator's or admin's API token (e.g. ``ControlPlane.admin_token``)."""
    headers = {"Content-Type": "application/octet-stream", "X-Filename": path.name}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{server}/api/v1/models", data=path.read_bytes(), method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        import json

        return json.loads(resp.read())


def _device_versions(server: str, token: str) -> dict[str, str | None]:
    return {d["id"]: d.get("version") for d in http_json("GET", f"{server}/api/v1/devices", token=token)}


def _feed(fleet: list[AgentProcess], x: np.ndarray, stop: threading.Event, per_second: float = 5.0) -> None:
    rng = np.random.default_rng(1)
    while not stop.wait(1.0 / per_second):
        for dev in fleet:
            j = int(rng.integers(len(x)))
            with contextlib.suppress(Exception):
                dev.predict(x[j : j + 1])


def run_demo(
    agents: int = 3,
    samples_per_agent: int = 60,
    workdir: Path | None = None,
    port: int = 0,
    mqtt_port: int = 0,
    keep_running: Callable[[str], None] | None = None,
    progress: Progress = lambda msg: None,
) -> DemoResult:
    """Run the demo end to end and return its figures; ``keep_running`` blocks before teardown."""
    from ..bundle import build_bundle
    from ..control.server import ControlPlane
    from ..control.settings import ServerSettings
    from ..lab.demo_model import LABELS, PREPROCESSING, load_digits_split, train_digits_onnx
    from ..security import generate_keypair, load_signer

    t0 = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="edgewise-demo-") if workdir is None else None
    root = Path(tmp.name) if tmp else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    fleet: list[AgentProcess] = []
    cp = None
    try:
        progress("training 1.0.0 (logistic regression) and 1.1.0 (MLP) on scikit-learn's bundled digits")
        data = load_digits_split()
        models = {"1.0.0": train_digits_onnx("logreg", data), "1.1.0": train_digits_onnx("mlp", data)}

        progress("generating a signing key and signing two bundles")
        keys = root / "keys"
        generate_keypair(keys / "signing.key", keys / "signing.pub", overwrite=True)
        signer = load_signer(keys / "signing.key")
        paths = {}
        for version, model in models.items():
            paths[version] = root / "bundles" / f"digits-{version}.ewb"
            build_bundle(model, name="digits", version=version, signer=signer, out=paths[version],
                         labels=LABELS, preprocessing=PREPROCESSING, golden=({"x": data.x_test[:16]},))

        progress("starting the control plane (embedded MQTT broker, SQLite)")
        settings = ServerSettings(
            data_dir=root / "control", port=port or _free_port(),
            embedded_broker_port=mqtt_port or _free_port(), trust=[keys / "signing.pub"],
        )
        cp = ControlPlane(settings)
        cp.start()
        server = cp.url
        token = cp.admin_token  # the bootstrap admin token: the demo acts as the fleet's admin
        for version in models:
            upload_bundle(server, paths[version], token)

        progress(f"starting {agents} agents as separate processes")
        for i in range(agents):
            dev = AgentProcess(
                device_id=f"demo-{i + 1}", state_dir=root / "agents" / f"demo-{i + 1}", server_url=server,
                broker_url=settings.effective_broker_url, trust=keys / "signing.pub", tags=["demo"],
                telemetry_interval_s=1.0, device_token=cp.issue_device_token(f"demo-{i + 1}"),
                tuf_root=settings.data_dir / "tuf" / "metadata" / "1.root.json",  # provisioning: updates go through TUF
            )
            dev.start()
            fleet.append(dev)
        for dev in fleet:
            dev.wait_ready()
        wait_until(lambda: len(_device_versions(server, token)) >= agents, 60, what="every agent to register")

        correct = {d.device_id: 0 for d in fleet}
        served = {d.device_id: 0 for d in fleet}
        order = np.random.default_rng(0).permutation(len(data.x_test))
        chunks = np.array_split(order, agents)

        def classify(phase: int) -> None:
            for dev, idx in zip(fleet, chunks):
                half = idx[phase::2][:samples_per_agent]
                for j in half:
                    out = dev.predict(data.x_test[j : j + 1])
                    served[dev.device_id] += 1
                    correct[dev.device_id] += int(int(out["outputs"]["label"][0]) == int(data.y_test[j]))

        for phase, version in enumerate(models):
            progress(f"deploying digits {version} to every device tagged 'demo'")
            http_json("POST", f"{server}/api/v1/deployments", {"model": "digits", "version": version, "tag": "demo"},
                      token=token)
            wait_until(
                lambda: all(v == version for v in _device_versions(server, token).values()), 90,
                what=f"every agent to report {version}",
            )
            progress(f"every agent runs {version}; classifying held-out digits")
            classify(phase)

        progress("waiting for the agents' outboxes to drain")
        time.sleep(1.5)  # one more telemetry sample each, after the last prediction

        def drained() -> list[dict[str, Any]] | None:
            hs = [d.health() for d in fleet]
            return hs if all(h["outbox_pending"] == 0 and h["connected"] for h in hs) else None

        healths = wait_until(drained, 30, what="outboxes to drain")
        devices = {d["id"]: d for d in http_json("GET", f"{server}/api/v1/devices", token=token)}
        per_device = []
        for dev, h in zip(fleet, healths):
            info = devices.get(dev.device_id, {})
            received = len(http_json("GET", f"{server}/api/v1/devices/{dev.device_id}/telemetry?limit=100000", token=token))
            events = len(http_json("GET", f"{server}/api/v1/devices/{dev.device_id}/events?limit=100000", token=token))
            per_device.append(DeviceSummary(
                device_id=dev.device_id, version=info.get("version"), inferences=served[dev.device_id],
                correct=correct[dev.device_id], p95_ms=info.get("latency_p95_ms"),
                telemetry_issued=int(h["seq_issued"]), telemetry_received=received + events,
            ))
        total = sum(served.values())
        result = DemoResult(
            devices=agents,
            deployed=sum(1 for d in per_device if d.version == "1.1.0"),
            final_version="1.1.0",
            inferences=total,
            accuracy=round(sum(correct.values()) / total, 4) if total else 0.0,
            telemetry_received=sum(d.telemetry_received for d in per_device),
            telemetry_lost=sum(max(0, d.telemetry_issued - d.telemetry_received) for d in per_device),
            wall_time_s=round(time.monotonic() - t0, 1),
            dashboard=f"{server}/",
            per_device=per_device,
        )
        if keep_running is not None:
            # Keep a trickle of real traffic going so the dashboard shows live rates.
            stop_feed = threading.Event()
            feeder = threading.Thread(target=_feed, args=(fleet, data.x_test, stop_feed), daemon=True)
            feeder.start()
            try:
                keep_running(f"{server}/#token={token}")  # signs the browser in (loopback demo only; see docs)
            finally:
                stop_feed.set()
                feeder.join(5)
        return result
    finally:
        progress("shutting down")
        for dev in fleet:
            with contextlib.suppress(Exception):
                dev.stop()
        if cp is not None:
            with contextlib.suppress(Exception):
                cp.stop()
        if tmp is not None:
            tmp.cleanup()


__all__ = ["DemoResult", "FleetError", "run_demo"]
