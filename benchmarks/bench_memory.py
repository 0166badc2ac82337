"""Resident memory of an idle `edgewise agent` process with the demo model (digits 1.0.0) loaded.

The agent runs as on a device: its own process, connected to a real broker (Mosquitto when
installed, else the broker URL points at a closed port and the agent keeps retrying), local API up,
telemetry on. RSS is read with psutil after the agent has settled.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from _common import build_demo_bundles, tempdir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLOOR = """
import sys, time, sqlite3, http.server, ssl
import numpy as np, onnxruntime as ort, pydantic, paho.mqtt.client
from cryptography.hazmat.primitives.asymmetric import ed25519
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(open(sys.argv[1], "rb").read(), so, providers=["CPUExecutionProvider"])
s.run(None, {"x": np.zeros((1, 64), np.float32)})
class Boundary(pydantic.BaseModel):  # pydantic at the boundaries: its first model loads its internals
    name: str
Boundary(name="x")
print("ready", flush=True)
time.sleep(600)
"""


def floor_rss(model_path: Path, settle_s: float) -> float:
    """RSS of a bare process holding only the libraries the agent must have, one pydantic model and one
    session of the same model: the baseline nothing in the agent can go below."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR, str(model_path)], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        time.sleep(settle_s)
        return psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.kill()
        proc.wait(5)


def run(settle_s: float = 8.0, env: dict | None = None) -> dict:
    root = tempdir("ew-bench-mem-")
    bundles, pub = build_demo_bundles(root)
    port = _free_port()
    broker = None
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe:
        conf = root / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = root / "state"
    cmd = [sys.executable, "-m", "edgewise.cli.main", "agent", "--state-dir", str(state),
           "--broker", f"mqtt://127.0.0.1:{port}", "--server", "http://127.0.0.1:9", "--device-id", "mem",
           "--api-port", "0", "--trust", str(pub), "--install", str(bundles["1.0.0"]), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (state / "api.port").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle_s)
        p = psutil.Process(proc.pid)
        mem = p.memory_full_info()
        rss_mb = mem.rss / 2**20
        from edgewise.bundle import verify_bundle
        from edgewise.security import TrustedKeys

        model_path = root / "model.onnx"
        model_path.write_bytes(verify_bundle(bundles["1.0.0"], TrustedKeys.from_paths([pub])).read_model())
        floor = floor_rss(model_path, 2.0)
        return {
            "rss_mb": round(rss_mb, 1),
            "floor_rss_mb": round(floor, 1),
            "agent_over_floor_mb": round(rss_mb - floor, 1),
            "uss_mb": round(mem.uss / 2**20, 1),
            "threads": p.num_threads(),
            "broker": "mosquitto" if broker else "none (retrying)",
            "limit": "rss <= 80 MB",
            "pass": rss_mb <= 80,
        }
    finally:
        proc.terminate()
        proc.wait(15)
        if broker:
            broker.terminate()
            broker.wait(5)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
