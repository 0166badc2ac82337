"""An external broker keeps the control plane's session: nothing devices send while it is down is lost."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

from conftest import free_port
from edgewise import protocol as p
from edgewise.sim.fleet import FleetError, http_json, wait_until


def _rows(cp) -> list:
    """Telemetry rows of sensor-9; none yet (404: the device is unknown until its first record lands)."""
    try:
        return http_json("GET", f"{cp.url}/api/v1/devices/sensor-9/telemetry", token=cp.admin_token)
    except FleetError:
        return []


def _device_publishes(broker_url: str, device_id: str, seqs: range) -> None:
    host, port = broker_url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    c.connect(host, int(port))
    c.loop_start()
    items = [p.Telemetry(device_id=device_id, seq=s, ts=time.time()) for s in seqs]
    c.publish(p.topics.telemetry(device_id), p.encode(p.Batch(device_id=device_id, items=items)), qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def test_telemetry_sent_while_the_control_plane_is_down_arrives_after_restart(tmp_path, mosquitto):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "cp", port=free_port(), broker_url=mosquitto)
    with ControlPlane(settings) as cp:
        _device_publishes(mosquitto, "sensor-9", range(0, 3))
        wait_until(lambda: len(_rows(cp)) == 3, 15, what="the first three samples")

    _device_publishes(mosquitto, "sensor-9", range(3, 8))  # nobody from edgewise is listening now

    with ControlPlane(settings) as cp:
        rows = wait_until(
            lambda: (lambda r: r if len(r) == 8 else None)(_rows(cp)),
            15, what="the five samples queued by the broker",
        )
        assert [r["seq"] for r in rows] == list(range(8))


def test_two_control_planes_with_different_data_dirs_do_not_share_a_session(tmp_path):
    from edgewise.control.settings import ServerSettings

    a = ServerSettings(data_dir=tmp_path / "a").effective_mqtt_client_id
    b = ServerSettings(data_dir=tmp_path / "b").effective_mqtt_client_id
    assert a != b and a.startswith("edgewise-control-")
