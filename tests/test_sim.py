"""The virtual fleet (sim.virtual) against a real Mosquitto and a real control plane: small fleets, real protocol."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from edgewise.control.models import EventRow, SummaryRow, TelemetryRow
from edgewise.protocol import DesiredState, encode, topics
from edgewise.protocol.messages import ArtifactRef, ShadowTarget
from edgewise.sim.behaviour import VersionBehaviour
from edgewise.sim.virtual import VirtualDeviceSpec, VirtualFleet, VirtualFleetError, specs_for
from test_agent_support import wait_for
from test_sim_support import Api, build_versions, start_control_plane


@pytest.fixture(scope="module")
def plane(tmp_path_factory, mosquitto, keys_dir, signer, digits_models):
    d = tmp_path_factory.mktemp("sim-cp")
    cp = start_control_plane(d / "cp", mosquitto, keys_dir / "signing.pub")
    api = Api(cp)
    for path in build_versions(d / "bundles", digits_models["logreg"], signer, ["1.0.0", "1.1.0", "1.2.0"]).values():
        api.upload(path)
    yield cp, api
    api.close()
    cp.stop()


def _ids(n: int, what: str) -> list[str]:
    stem = f"{what}-{secrets.token_hex(3)}"
    return [f"{stem}-{i}" for i in range(n)]


def _fleet(mosquitto, cp, specs, behaviours=None, **kw) -> VirtualFleet:
    return VirtualFleet(mosquitto, cp.url, cp.admin_token, specs, behaviours or {}, track_seqs=True, **kw)


def _rows(cp, table, device_ids):
    with cp.services.db.session() as s:
        return list(s.scalars(select(table).where(table.device_id.in_(device_ids))))


def test_virtual_devices_register_with_tags_and_hardware_class(plane, mosquitto):
    cp, api = plane
    tag = f"t{secrets.token_hex(3)}"
    specs = specs_for(4, prefix=f"reg{secrets.token_hex(2)}", hardware_classes=["rpi4", "x86-small"], tags=[tag, "sim"])
    with _fleet(mosquitto, cp, specs) as fleet:
        fleet.wait_connected(10)
        for spec in specs:
            dev = wait_for(lambda: _registered(api, spec.device_id), 10, what=f"{spec.device_id} registered")
            assert dev["status"] == "online"
            assert set(dev["tags"]) == {tag, "sim"}
            assert dev["hardware"]["hardware_class"] == spec.hardware_class
            assert dev["agent_version"].endswith("+sim")
    # A clean stop leaves the retained state offline.
    wait_for(lambda: api.device(specs[0].device_id)["status"] == "offline", 10, what="offline after stop")


def _registered(api, device_id):
    r = api.http.get(f"/api/v1/devices/{device_id}")
    return r.json() if r.status_code == 200 else None


def test_virtual_devices_follow_desired_state_and_report_the_update(plane, mosquitto):
    cp, api = plane
    tag = f"f{secrets.token_hex(3)}"
    specs = [VirtualDeviceSpec(device_id=i, tags=[tag], install_s=0.2) for i in _ids(3, "follow")]
    with _fleet(mosquitto, cp, specs) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([s.device_id for s in specs])
        api.deploy("1.0.0", tag=tag)
        fleet.wait_versions({s.device_id: "1.0.0" for s in specs}, 15)
        api.deploy("1.1.0", tag=tag)
        fleet.wait_versions({s.device_id: "1.1.0" for s in specs}, 15)
        for s in specs:
            dev = wait_for(lambda: (d := api.device(s.device_id))["in_sync"] and d["version"] == "1.1.0" and d, 10)
            assert dev["last_update"]["result"] == "ok"
        fleet.wait_flushed(10)
        events = wait_for(lambda: len(r := [e for e in _rows(cp, EventRow, [s.device_id for s in specs]) if e.kind == "update"]) == 6 and r, 10)
        assert {e.detail["version"] for e in events} == {"1.0.0", "1.1.0"}


def test_a_crashing_version_is_rolled_back_with_a_crash_event(plane, mosquitto):
    cp, api = plane
    specs = [VirtualDeviceSpec(device_id=i, install_s=0.1) for i in _ids(2, "crash")]
    ids = [s.device_id for s in specs]
    with _fleet(mosquitto, cp, specs, {"1.1.0": VersionBehaviour(crash=True)}) as fleet:
        fleet.wait_connected(10)
        api.wait_registered(ids)
        api.deploy("1.0.0", device_ids=ids)
        fleet.wait_versions(dict.fromkeys(ids, "1.0.0"), 15)
        api.deploy("1.1.0", device_ids=ids)
        wait_for(lambda: all((api.device(i)["last_update"] or {}).get("result") == "rolled_back" for i in ids), 15,
                 what="rolled_back reported")
        assert fleet.versions()[ids[0]] == "1.0.0"
        fleet.wait_flushed(10)
        kinds = wait_for(lambda: (k := [e.kind for e in _rows(cp, EventRow, ids)]).count("model.crash") == 2 and k, 10)
        assert kinds.count("update") == 4


def test_a_crashing_device_rolls_back_every_new_version(plane, mosquitto):
    cp, api = plane
    good, bad = _ids(2, "prof")
    specs = [VirtualDeviceSpec(device_id=good, install_s=0.1),
             VirtualDeviceSpec(device_id=bad, install_s=0.1, profile="crashing", model="digits", version="1.0.0")]
    with _fleet(mosquitto, cp, specs) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([good, bad])
        api.deploy("1.1.0", device_ids=[good, bad])
        fleet.wait_versions({good: "1.1.0"}, 15)
        wait_for(lambda: (api.device(bad)["last_update"] or {}).get("result") == "rolled_back", 15)
        assert fleet.versions()[bad] == "1.0.0"


def test_a_downgrade_needs_the_rollback_flag(plane, mosquitto):
    cp, api = plane
    (dev,) = _ids(1, "down")
    with _fleet(mosquitto, cp, [VirtualDeviceSpec(device_id=dev, install_s=0.1)]) as fleet:
        fleet.wait_connected(10)
        api.wait_registered([dev])
        api.deploy("1.2.0", device_ids=[dev])
        fleet.wait_versions({dev: "1.2.0"}, 15)
        api.deploy("1.0.0", device_ids=[dev])
        wait_for(lambda: (api.device(dev)["last_update"] or {}).get("result") == "failed", 15, what="downgrade refused")
        assert "rollback" in api.device(dev)["last_update"]["reason"]
        assert fleet.versions()[dev] == "1.2.0"
        api.deploy("1.0.0", device_ids=[dev], rollback=True)
        fleet.wait_versions({dev: "1.0.0"}, 15)


def test_telemetry_is_ingested_exactly_once(plane, mosquitto):
    cp, api = plane
    specs = [VirtualDeviceSpec(device_id=i, telemetry_s=0.1, model="digits", version="1.0.0", inference_rate=500) for i in _ids(3, "once")]
    ids = [s.device_id for s in specs]
    fleet = _fleet(mosquitto, cp, specs).start()
    try:
        fleet.wait_connected(10)
        time.sleep(1.5)
        fleet.wait_flushed(10)
        sent = fleet.call(lambda: {d.id: (set(d.stats.seqs_acked), d.stats.records) for d in fleet.devices.values()})
    finally:
        fleet.stop()
    stored = wait_for(lambda: _seqs(cp, ids) if sum(len(v) for v in _seqs(cp, ids).values()) >= sum(len(s) for s, _ in sent.values()) else None, 10)
    for i in ids:
        acked, records = sent[i]
        assert len(acked) == records >= 10
        assert sorted(stored[i]) == sorted(acked)  # every record once, none twice (the list would repeat a seq)
    rows = _rows(cp, TelemetryRow, ids)
    assert all(r.latency_p95_ms and r.model == "digits" and r.version == "1.0.0" for r in rows)


def _seqs(cp, ids):
    out: dict[str, list[int]] = {i: [] for i in ids}
    for table in (TelemetryRow, EventRow):
        for r in _rows(cp, table, ids):
            out[r.device_id].append(r.seq)
    return out


def test_an_offline_device_reconnects_and_delivers_what_it_queued(plane, mosquitto):
    cp, api = plane
    (dev,) = _ids(1, "off")
    spec = VirtualDeviceSpec(device_id=dev, telemetry_s=0.5, profile="offline(2,4)", model="digits", version="1.0.0")
    with _fleet(mosquitto, cp, [spec], time_scale=4.0) as fleet:  # offline from 0.5 s to 1.5 s of wall clock
        fleet.wait_connected(5)
        wait_for(lambda: api.device(dev)["status"] == "offline", 10, what="the broker's last will marks it offline")
        assert not fleet.devices[dev].connected
        wait_for(lambda: fleet.devices[dev].connected, 10, what="reconnected")
        wait_for(lambda: api.device(dev)["status"] == "online", 10)
        fleet.wait_flushed(10)
        acked = fleet.call(lambda: set(fleet.devices[dev].stats.seqs_acked))
        assert fleet.devices[dev].stats.connects == 2
    stored = wait_for(lambda: (s := _seqs(cp, [dev])[dev]) and set(s) >= acked and s, 10)
    assert len(stored) == len(set(stored))
    assert len(acked) >= 8  # ticks while offline were queued and delivered after the reconnect


def test_shadow_stats_follow_the_desired_shadow_candidate(plane, mosquitto):
    cp, api = plane
    (dev,) = _ids(1, "shadow")
    spec = VirtualDeviceSpec(device_id=dev, telemetry_s=0.2, model="digits", version="1.0.0", inference_rate=100)
    behaviours = {"1.1.0": VersionBehaviour(shadow_agreement=0.5, latency_ms={"*": 30.0})}
    with _fleet(mosquitto, cp, [spec], behaviours) as fleet:
        fleet.wait_connected(5)
        desired = DesiredState(
            device_id=dev, generation=1, model="digits", version="1.0.0",
            shadow=ShadowTarget(model="digits", version="1.1.0", artifact=ArtifactRef(url="x", sha256="0" * 64, size=0)),
        )
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{secrets.token_hex(3)}")
        host, port = mosquitto.removeprefix("mqtt://").split(":")
        c.connect(host, int(port))
        c.loop_start()
        c.publish(topics.desired(dev), encode(desired), qos=1, retain=True).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        rows = wait_for(lambda: (r := [x for x in _rows(cp, TelemetryRow, [dev]) if x.shadow_compared]) and len(r) >= 3 and r, 10)
    compared = sum(r.shadow_compared for r in rows)
    agreed = sum(r.shadow_agreed for r in rows)
    assert rows[0].shadow_version == "1.1.0" and rows[0].shadow_latency_p95_ms == pytest.approx(30.0)
    assert 0.35 < agreed / compared < 0.65


def test_summary_mode_sends_summaries_with_drift_and_slow_latency(plane, mosquitto):
    cp, api = plane
    fast, slow = _ids(2, "summ")
    common = dict(telemetry_s=0.2, model="digits", version="1.0.0", record="summary", inference_rate=50)
    specs = [VirtualDeviceSpec(device_id=fast, profile="drifted(2.5)", **common),
             VirtualDeviceSpec(device_id=slow, profile="slow(4)", **common)]
    with _fleet(mosquitto, cp, specs, {"1.0.0": VersionBehaviour(latency_ms={"*": 10.0})}) as fleet:
        fleet.wait_connected(5)
        rows = wait_for(lambda: (r := _rows(cp, SummaryRow, [fast, slow])) and len({x.device_id for x in r}) == 2 and r, 10)
    by = {r.device_id: r for r in rows}
    assert by[fast].drift_score == pytest.approx(2.5)
    assert by[slow].latency_p95_ms / by[fast].latency_p95_ms == pytest.approx(4.0, rel=0.15)
    assert sum(by[fast].confidence_hist) == by[fast].predictions


def test_devices_log_in_with_device_tokens_when_the_broker_requires_them(tmp_path, keys_dir):
    cp = start_control_plane(tmp_path / "cp", None, keys_dir / "signing.pub")  # embedded broker, devices must log in
    try:
        specs = specs_for(3, prefix=f"auth{secrets.token_hex(2)}")
        with VirtualFleet(cp.broker_url, cp.url, cp.admin_token, specs, {}) as fleet:
            fleet.wait_connected(15)
            assert fleet.summary()["refused_connections"] == 0
        with pytest.raises(VirtualFleetError, match="refuses anonymous devices"):
            VirtualFleet(cp.broker_url, None, None, specs, {}).start()
    finally:
        cp.stop()


def test_sim_command_runs_a_fleet_and_prints_a_json_summary(mosquitto):
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.main", "sim", "--devices", "5", "--broker", mosquitto, "--duration", "2",
         "--telemetry-s", "0.2", "--prefix", f"cli{secrets.token_hex(2)}", "--profile", "healthy:4,slow:1", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["devices"] == 5 and summary["connects"] >= 5 and summary["acked"] > 0
    assert summary["profiles"] == {"healthy": 4.0, "slow(3)": 1.0}


def test_sim_command_names_a_bad_profile(mosquitto):
    out = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "sim", "--broker", mosquitto, "--profile", "flaky:3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown profile 'flaky'" in out.stderr


def test_sim_command_splits_a_fleet_over_processes_without_overlap(plane, mosquitto):
    cp, api = plane
    prefix = f"mp{secrets.token_hex(2)}"
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.main", "sim", "--devices", "5", "--processes", "2", "--broker", mosquitto,
         "--duration", "2", "--telemetry-s", "0.5", "--prefix", prefix, "--json"],
        capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["processes"] == 2 and summary["devices"] == 5 and summary["connects"] == 5
    registered = {d["id"] for d in api.call("GET", "/api/v1/devices") if d["id"].startswith(prefix)}
    assert registered == {f"{prefix}-{i:05d}" for i in range(1, 6)}
