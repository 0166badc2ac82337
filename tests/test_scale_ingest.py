"""Several ingest workers share one device stream (issue 9 SCALE): MQTT v5 shared subscriptions on a real Mosquitto,
one SQLite file shared by the workers, a worker killed with SIGKILL mid-stream. Every message is stored exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import func, select

from edgewise import protocol as p
from edgewise.control.db import init_db
from edgewise.control.models import TelemetryRow
from edgewise.control.services import ControlServices, ControlStartError
from edgewise.control.settings import ServerSettings

ITEMS = 5  # telemetry records per message


def _batch(dev: str, first: int) -> bytes:
    return p.encode(p.Batch(device_id=dev, items=[p.Telemetry(device_id=dev, seq=s, ts=time.time())
                                                  for s in range(first, first + ITEMS)]))


class Devices:
    """Publishes ``n`` telemetry messages round-robin over ``devices`` devices (QoS 1), optionally paced."""

    def __init__(self, url: str, devices: int, prefix: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.ids = [f"{prefix}-{i}" for i in range(devices)]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
        self.client.max_inflight_messages_set(100)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.sent = 0

    def publish(self, n: int, *, per_second: float | None = None) -> None:
        infos = []
        t0 = time.monotonic()
        for k in range(n):
            dev = self.ids[k % len(self.ids)]
            seq = (k // len(self.ids)) * ITEMS + 1
            infos.append(self.client.publish(p.topics.telemetry(dev), _batch(dev, seq), qos=1))
            self.sent += 1
            if per_second:
                delay = t0 + (k + 1) / per_second - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rows(db) -> tuple[int, int]:
    """(rows, distinct (device, seq)) of telemetry."""
    with db.session() as s:
        rows = s.scalar(select(func.count()).select_from(TelemetryRow))
        distinct = s.scalar(select(func.count()).select_from(
            select(TelemetryRow.device_id, TelemetryRow.seq).distinct().subquery()))
    return rows, distinct


def _wait(pred, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_two_ingest_workers_share_one_stream_and_store_every_message_once(tmp_path, mosquitto):
    db_url = f"sqlite:///{tmp_path / 'cp.db'}"
    group = f"g{uuid.uuid4().hex[:6]}"
    tag = uuid.uuid4().hex[:6]
    workers = [ControlServices.open(ServerSettings(data_dir=tmp_path / "data", database_url=db_url, broker_url=mosquitto,
                                                   role="ingest", worker_id=f"{tag}-{i}", ingest_group=group))
               for i in range(2)]
    devices = Devices(mosquitto, 20, f"share-{tag}")
    try:
        assert all(w.bus.wait_connected(10) for w in workers)
        assert workers[0].bus.client_id != workers[1].bus.client_id
        assert all(t.startswith(f"$share/{group}/") for t in workers[0].bus.subscriptions)
        assert workers[0].rollouts is None and workers[0].monitor is None and workers[0].fl is None
        devices.publish(1000)
        db = workers[0].db
        assert _wait(lambda: _rows(db)[0] == 1000 * ITEMS), f"stored {_rows(db)} of {1000 * ITEMS}"
        # telemetry rows per worker (not messages: Mosquitto 2.0 also hands every shared subscriber the retained
        # device states already on the broker, here those of earlier tests' devices, when it subscribes)
        handled = [w.ingest.stats().telemetry_rows for w in workers]
        assert sum(handled) == 1000 * ITEMS and min(handled) > 100 * ITEMS, f"rows per worker: {handled}"  # shared, not copied
        assert _rows(db) == (1000 * ITEMS, 1000 * ITEMS)
        assert sum(w.ingest.stats().duplicates for w in workers) == 0
    finally:
        devices.close()
        for w in workers:
            w.close()


def _spawn_worker(data_dir: Path, db_url: str, broker: str, worker: str, group: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, EDGEWISE_INGEST_GROUP=group)
    return subprocess.Popen(
        [sys.executable, "-m", "edgewise.cli.main", "server", "--role", "ingest", "--worker-id", worker,
         "--data-dir", str(data_dir), "--database-url", db_url, "--broker-url", broker, "--log-level", "INFO"],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env,
    )


def _wait_log(log: Path, text: str, timeout: float = 60.0) -> None:
    assert _wait(lambda: text in log.read_text(errors="replace"), timeout), \
        f"{text!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}"


def test_an_ingest_worker_killed_mid_stream_loses_and_doubles_nothing(tmp_path, mosquitto):
    """Mosquitto keeps handing the dead worker's persistent session its share of the stream (queued, with the QoS 1
    messages it had in flight) until that session comes back or expires: the surviving worker does not take them
    over. Restarted with the same client id, the worker gets them all; (device, seq) makes redelivered ones harmless.

    The doomed worker is a separate process (``edgewise server --role ingest``) killed with SIGKILL; the survivor and
    the restarted worker run in this process (same settings, same client id) to keep the test fast."""
    data_dir, db_url = tmp_path / "data", f"sqlite:///{tmp_path / 'cp.db'}"
    init_db(db_url).dispose()  # migrate once, not from two processes at the same moment
    group, tag = f"g{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    log = tmp_path / "doomed.log"
    doomed = _spawn_worker(data_dir, db_url, mosquitto, f"{tag}-0", group, log)
    settings = [ServerSettings(data_dir=data_dir, database_url=db_url, broker_url=mosquitto, role="ingest",
                               worker_id=f"{tag}-{i}", ingest_group=group) for i in range(2)]
    survivor = ControlServices.open(settings[1])
    restarted = None
    devices = Devices(mosquitto, 10, f"kill-{tag}")
    db = survivor.db
    try:
        _wait_log(log, "MQTT bus connected")
        assert survivor.bus.wait_connected(10)
        total = 1500
        feeder = threading.Thread(target=devices.publish, args=(total,), kwargs={"per_second": 600})
        feeder.start()
        assert _wait(lambda: _rows(db)[0] >= 200 * ITEMS, 30)
        os.kill(doomed.pid, signal.SIGKILL)  # mid-stream, mid-batch: its unacked messages stay with its session
        doomed.wait(5)
        feeder.join(60)
        time.sleep(1.5)
        before_restart = _rows(db)[0]
        print(f"stored before the restart: {before_restart} of {total * ITEMS}")
        assert before_restart < total * ITEMS, "the survivor took over the dead worker's share (expected: queued)"
        restarted = ControlServices.open(settings[0])  # same client id, same session
        assert restarted.bus.client_id == f"edgewise-ingest-{socket.gethostname()}-{tag}-0"[:128]
        assert _wait(lambda: _rows(db)[0] == total * ITEMS, 60), f"stored {_rows(db)[0]} of {total * ITEMS}"
        time.sleep(0.5)
        assert _rows(db) == (total * ITEMS, total * ITEMS)  # nothing lost, nothing doubled
    finally:
        devices.close()
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
        survivor.close()
        if restarted is not None:
            restarted.close()


def test_an_ingest_role_on_the_embedded_broker_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ControlStartError, match="shared subscriptions.*--broker-url|--broker-url.*shared subscriptions"):
        ControlServices.open(ServerSettings(data_dir=tmp_path, role="ingest", embedded_broker_port=0))


def test_the_cli_refuses_a_split_role_without_an_external_broker(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "server", "--role", "engines", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--broker-url" in (r.stdout + r.stderr)


def test_ingest_workers_share_the_stream_over_mutual_tls_on_a_control_listener(tmp_path):
    """The generated Mosquitto configuration (mTLS, ACL) plus a control-plane listener without
    use_username_as_clientid (docs/scale-out.md): every worker presents the control certificate yet keeps a client id
    of its own, and the ACL's `topic readwrite edgewise/#` admits the $share subscriptions."""
    from conftest import free_port, wait_port
    from edgewise.control import mosquitto as mq

    port, control_port = free_port(), free_port()
    data_dir = tmp_path / "cp"
    ControlServices.open(ServerSettings(data_dir=data_dir, mosquitto=True, mosquitto_port=port)).close()  # writes it
    m = data_dir / "mosquitto"
    conf = (m / mq.CONF_FILE).read_text() + "\n".join([
        "", f"listener {control_port} 127.0.0.1", "protocol mqtt", f"cafile {m / mq.CA_FILE}",
        f"certfile {m / mq.SERVER_CERT}", f"keyfile {m / mq.SERVER_KEY}", "require_certificate true",
        "use_identity_as_username true", f"crlfile {m / mq.CRL_FILE}", ""])
    (m / "scale.conf").write_text(conf)
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(m / "scale.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers = []
    try:
        wait_port(control_port)
        url = f"mqtts://127.0.0.1:{control_port}"
        workers = [ControlServices.open(ServerSettings(data_dir=data_dir, broker_url=url, role="ingest", worker_id=str(i)))
                   for i in range(2)]
        assert all(w.bus.wait_connected(10) for w in workers)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
        pub.tls_set(ca_certs=str(m / mq.CA_FILE), certfile=str(m / mq.CONTROL_CERT), keyfile=str(m / mq.CONTROL_KEY))
        pub.connect("127.0.0.1", control_port)
        pub.loop_start()
        dev = f"tls-{uuid.uuid4().hex[:6]}"
        for k in range(100):
            pub.publish(p.topics.telemetry(dev), _batch(dev, k * ITEMS + 1), qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        db = workers[0].db
        assert _wait(lambda: _rows(db)[0] == 100 * ITEMS, 20), f"stored {_rows(db)} of {100 * ITEMS}"
        handled = [w.ingest.stats().messages for w in workers]
        assert sum(handled) == 100 and min(handled) > 0, handled
        assert all(w.bus.connected for w in workers)  # neither took the other's session
    finally:
        for w in workers:
            w.close()
        broker.terminate()
        broker.wait(10)
