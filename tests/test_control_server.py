"""`run_server` in a real process: it serves, and SIGINT/SIGTERM shut it down cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from conftest import free_port, wait_port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_process_stops_cleanly_on_a_signal(tmp_path, sig):
    port, mqtt_port = free_port(), free_port()
    code = (
        "from edgewise.control import ServerSettings, run_server\n"
        f"run_server(ServerSettings(data_dir={str(tmp_path / 'cp')!r}, port={port}, embedded_broker_port={mqtt_port}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 30)
        health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5).json()
        assert health["mqtt"] == {"broker_url": f"mqtt://127.0.0.1:{mqtt_port}", "embedded": True, "connected": True}
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "MQTT bus disconnected" in out and "embedded MQTT broker stopped" in out
    assert "Traceback" not in out


def test_server_that_cannot_start_exits_with_the_reason(tmp_path):
    bad_key = tmp_path / "nope.pub"
    code = (
        "from edgewise.control import ServerSettings, run_server\n"
        f"run_server(ServerSettings(data_dir={str(tmp_path / 'cp')!r}, port={free_port()}, embedded_broker_port=0, "
        f"trust=[{str(bad_key)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "cannot load a trusted key" in r.stderr and "nope.pub" in r.stderr


def test_control_plane_never_imports_the_agent():
    code = (
        "import sys, edgewise.control, edgewise.control.api, edgewise.control.broker\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('edgewise.agent'))\n"
        "assert not leaked, leaked\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
