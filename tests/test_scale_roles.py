"""Control-plane roles (issue 9 SCALE): an API process that deploys without subscribing, engines that run once per
fleet however many engines processes there are. Real Mosquitto, real HTTP, one SQLite file shared."""

from __future__ import annotations

import queue
import time
import uuid

import httpx
import paho.mqtt.client as mqtt

from conftest import admin_headers
from edgewise import protocol as p
from edgewise.control.db import init_db
from edgewise.control.server import ControlPlane
from edgewise.control.services import ControlServices
from edgewise.control.settings import ServerSettings


def _wait(pred, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _subscriber(url: str, topic: str) -> tuple[mqtt.Client, queue.Queue]:
    host, port = url.removeprefix("mqtt://").split(":")
    got: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}")
    c.on_message = lambda _c, _u, msg: got.put(msg)
    c.connect(host, int(port))
    c.subscribe(topic, qos=1)
    c.loop_start()
    return c, got


def test_an_api_process_deploys_and_publishes_the_desired_state_without_subscribing(tmp_path, mosquitto, keys_dir, bundles):
    dev = f"api-{uuid.uuid4().hex[:6]}"
    settings = ServerSettings(data_dir=tmp_path / "cp", port=0, broker_url=mosquitto, role="api",
                              trust=[keys_dir / "signing.pub"])
    sub, got = _subscriber(mosquitto, p.topics.desired(dev))
    try:
        with ControlPlane(settings) as cp:
            services = cp.services
            assert services.bus.subscriptions == () and not services.bus.persistent
            assert services.rollouts is None and services.monitor is None and services.fl is None
            assert services.bus.client_id.startswith("edgewise-api-")
            h = admin_headers(settings.data_dir)
            r = httpx.post(cp.url + "/api/v1/models", content=bundles["1.0.0"].read_bytes(),
                           headers={**h, "Content-Type": "application/octet-stream"}, timeout=30)
            assert r.status_code == 201, r.text
            assert httpx.post(cp.url + "/api/v1/devices", json={"id": dev}, headers=h).status_code == 201
            r = httpx.post(cp.url + "/api/v1/deployments", json={"model": "digits", "version": "1.0.0", "device_id": dev},
                           headers=h)
            assert r.status_code == 201, r.text
            msg = got.get(timeout=10)
            _, desired = p.decode_for_topic(msg.topic, msg.payload)
            assert (desired.model, desired.version, desired.generation) == ("digits", "1.0.0", 1)
    finally:
        sub.publish(p.topics.desired(dev), b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained message
        sub.disconnect()
        sub.loop_stop()


def _engines(tmp_path, db_url: str, broker: str, worker: str) -> ControlServices:
    return ControlServices.open(ServerSettings(
        data_dir=tmp_path / "cp", database_url=db_url, broker_url=broker, role="engines", worker_id=worker,
        monitor_tick_s=0.05, rollout_tick_s=0.05, fl_tick_s=0.05, lease_ttl_s=2.0, lease_renew_s=0.25,
    ))


def test_of_two_engines_processes_only_the_lease_holder_ticks_and_the_other_takes_over_when_it_stops(tmp_path, mosquitto):
    db_url = f"sqlite:///{tmp_path / 'cp.db'}"
    init_db(db_url).dispose()
    first = _engines(tmp_path, db_url, mosquitto, "a")
    second = _engines(tmp_path, db_url, mosquitto, "b")
    open_ = [first, second]
    try:
        assert first.bus.subscriptions == () and first.ingest.drift.lease is None  # engines consume no stream
        assert _wait(lambda: first.monitor.ticks >= 5 and first.rollouts.ticks >= 5)
        assert second.monitor.ticks == 0 and second.rollouts.ticks == 0
        open_.remove(first)
        first.close()  # a clean stop releases the lease: the standby takes over at its next renewal
        assert _wait(lambda: second.monitor.ticks > 0 and second.rollouts.ticks > 0, 5)
    finally:
        for services in open_:
            services.close()


def test_a_headless_engines_process_runs_until_told_to_stop_then_releases_its_lease(tmp_path, mosquitto):
    import threading

    from edgewise.control.lease import current_holder
    from edgewise.control.roles import run_headless
    from edgewise.control.timeutil import utcnow

    db_url = f"sqlite:///{tmp_path / 'cp.db'}"
    db = init_db(db_url)
    stop = threading.Event()
    settings = ServerSettings(data_dir=tmp_path / "cp", database_url=db_url, broker_url=mosquitto, role="engines")
    runner = threading.Thread(target=run_headless, args=(settings,), kwargs={"stop": stop})
    runner.start()
    try:
        assert _wait(lambda: (h := current_holder(db, "engines")) is not None and h[1] > utcnow(), 30)
        stop.set()
        runner.join(30)
        assert not runner.is_alive()
        assert current_holder(db, "engines")[1] < utcnow()  # released, not left to expire
    finally:
        stop.set()
        runner.join(30)
        db.dispose()
