"""The site gateway as its own process (`edgewise gateway --config gateway.toml`): kill -9 loses nothing it acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid

import pytest
from conftest import free_port, wait_port
from test_agent_support import wait_for
from test_gateway_support import Uplink, assert_exactly_once, drained, site_agent, start_control_plane, stored_seqs


def _write_config(path, uplink, ids, mqtt_port, http_port, token) -> None:
    path.write_text(
        f'site = "crash-{uuid.uuid4().hex[:6]}"\nstate_dir = "gw-state"\n'
        f'upstream_server = "{uplink.server}"\nupstream_broker = "{uplink.mqtt.url}"\napi_token = "{token}"\n'
        f'listen_host = "127.0.0.1"\nmqtt_port = {mqtt_port}\nhttp_port = {http_port}\n'
        f"device_ids = {json.dumps(ids)}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5\n"
    )


def _start(config, mqtt_port, http_port) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgewise.cli.main", "gateway", "--config", str(config),
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(mqtt_port, 60)  # a loaded CI machine: the process imports amqtt and paho first
        wait_port(http_port, 60)
    except Exception:
        proc.kill()
        raise AssertionError(proc.communicate(timeout=5)[1].decode(errors="replace")[-2000:]) from None
    return proc


def _health(http_port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/health", timeout=5) as r:
        return json.loads(r.read())


def test_killing_the_gateway_process_loses_nothing_it_acknowledged(tmp_path, keys_dir, bundles):
    cp = start_control_plane(tmp_path, keys_dir, bundles)
    uplink = Uplink(cp)
    ids = [f"gwk-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    mqtt_port, http_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    _write_config(config, uplink, ids, mqtt_port, http_port, cp.admin_token)
    proc = _start(config, mqtt_port, http_port)
    agents = []
    try:
        mqtt_url, http_url = f"mqtt://127.0.0.1:{mqtt_port}", f"http://127.0.0.1:{http_port}"
        for d in ids:
            agents.append(site_agent(tmp_path, keys_dir, cp, mqtt_url, http_url, d, bundles["1.0.0"]))
        for d in ids:
            wait_for(lambda d=d: len(stored_seqs(cp, d)) >= 2, 30, what=f"telemetry of {d} through the gateway")

        uplink.cut()  # the gateway holds the site's records ...
        wait_for(lambda: not _health(http_port)["uplink"], 30, what="the gateway to see the uplink down")
        wait_for(lambda: _health(http_port)["pending"] >= 20, 30, what="records to pile up at the gateway")
        for a in agents:
            wait_for(drained(a), 60, what="each device's outbox acknowledged by the gateway")
        held = _health(http_port)["pending"]
        os.kill(proc.pid, signal.SIGKILL)  # ... and dies with them, mid-stream
        proc.wait(10)

        proc = _start(config, mqtt_port, http_port)  # devices log in again from the token cache: the uplink is still cut
        assert _health(http_port)["pending"] >= held
        for a in agents:
            wait_for(drained(a), 60, what="each device to reconnect to the restarted gateway and drain")
        uplink.restore()
        wait_for(lambda: (h := _health(http_port))["uplink"] and h["pending"] <= 4, 60,
                 what="the restarted gateway to forward what it held")
        for a, d in zip(agents, ids):
            stats = assert_exactly_once(cp, a, d)
            assert stats["stored"] >= 10, stats
    finally:
        for a in agents:
            a.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        uplink.close()
        cp.stop()


def test_gateway_command_with_a_missing_config_exits_2_naming_the_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "gateway", "--config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "nope.toml does not exist" in r.stderr


@pytest.mark.parametrize("line, named", [("upstream_server = 'ftp://x'", "upstream_server"),
                                         ("upstream_server = 'http://c:8000'\nbogus = 1", "bogus")])
def test_gateway_command_with_a_bad_config_exits_2_naming_the_key(tmp_path, line, named):
    config = tmp_path / "gateway.toml"
    config.write_text(f'state_dir = "s"\n{line}\n')
    r = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "gateway", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and named in r.stderr, r.stderr
