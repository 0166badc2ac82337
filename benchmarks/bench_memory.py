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
        return {
            "rss_mb": round(rss_mb, 1),
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
