"""The rollouts REST API: bad specs (422 naming what is wrong), access rules, groups with maintenance windows,
the shadow phase, and the desired state a device receives over the real MQTT bus."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest

from edgewise import protocol as p
from edgewise.control.auth import create_api_token, create_user
from test_rollout_support import ERROR, SUCCESS, T0, Behaviour, cp, make, spec, wave  # noqa: F401


def _detail(r) -> str:
    return str(r.json()["detail"])


def test_an_unknown_figure_is_a_422_naming_it_and_its_wave(make):
    fleet = make({"api-a": "x86"})
    r = fleet.client.post("/api/v1/rollouts", json=spec(fleet, wave("canary", 10, error="latency_ms > 20")))
    assert r.status_code == 422
    assert "unknown figure 'latency_ms'" in _detail(r) and "waves[0].error (canary)" in _detail(r)
    assert "p95_ratio" in _detail(r)  # it lists the known ones


@pytest.mark.parametrize("body, named", [
    ({"waves": [{"percent": 10}]}, "exactly one target"),
    ({"tag": "t", "group": "g", "waves": [{"percent": 10}]}, "exactly one target"),
    ({"tag": "t", "waves": []}, "waves"),
    ({"tag": "t", "waves": [{"percent": 50}, {"percent": 10}]}, "cumulative"),
    ({"tag": "t", "waves": [{"percent": 10, "devices": ["a"]}]}, "exactly one of percent"),
    ({"tag": "t", "waves": [{"percent": 10, "soak": 3}]}, "soak"),
    ({"tag": "t", "waves": [{"percent": 10, "success": "error_rate <"}]}, "does not parse"),
])
def test_a_bad_spec_is_a_422_that_says_what_is_wrong(cp, body, named):
    client, _ = cp
    r = client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.1.0", **body})
    assert r.status_code == 422, r.text
    assert named in r.text


def test_an_unknown_version_or_empty_target_is_a_404(make):
    fleet = make({"api-b": "x86"})
    r = fleet.client.post("/api/v1/rollouts", json={**spec(fleet, wave("all", 100)), "version": "9.9.9"})
    assert r.status_code == 404 and "9.9.9" in _detail(r)
    r = fleet.client.post("/api/v1/rollouts", json={**spec(fleet, wave("all", 100)), "tag": "nobody-has-this"})
    assert r.status_code == 404 and "nobody-has-this" in _detail(r)


def test_a_device_in_an_unfinished_rollout_of_the_model_cannot_join_another(make):
    fleet = make({"api-c": "x86"})
    fleet.start(spec(fleet, wave("all", 100)))
    r = fleet.client.post("/api/v1/rollouts", json=spec(fleet, wave("all", 100)))
    assert r.status_code == 409 and f"rollout {fleet.rollout_id}" in _detail(r)


def test_viewers_read_rollouts_and_only_operators_change_them(make):
    fleet = make({"api-d": "x86"})
    fleet.start(spec(fleet, wave("all", 100)))
    with fleet.services.db.session() as s:
        viewer = create_user(s, "ro-viewer", "correct horse battery", "viewer")
        vtoken = create_api_token(s, viewer, name="ro viewer")[0]
    h = {"Authorization": f"Bearer {vtoken}"}
    assert fleet.client.get("/api/v1/rollouts", headers=h).status_code == 200
    assert fleet.client.get(f"/api/v1/rollouts/{fleet.rollout_id}", headers=h).status_code == 200
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/pause", headers=h).status_code == 403
    assert fleet.client.post("/api/v1/rollouts", headers=h, json=spec(fleet, wave("all", 100))).status_code == 403
    listed = fleet.client.get("/api/v1/rollouts", params={"state": "pending"}).json()
    assert fleet.rollout_id in [r["id"] for r in listed] and "decisions" not in listed[0]
    assert fleet.client.get("/api/v1/rollouts", params={"state": "flying"}).status_code == 422
    assert fleet.client.get("/api/v1/rollouts/999999").status_code == 404


def _hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


def test_a_group_rollout_starts_devices_only_inside_the_groups_maintenance_window(make):
    fleet = make({"mw-a": "x86", "mw-b": "x86"})
    opens = datetime.fromtimestamp(T0, timezone.utc) + timedelta(hours=1)
    group = {"name": f"g-{fleet.tag}", "query": {"tags_all": [fleet.tag]},
             "maintenance": [{"start": _hhmm(opens), "end": _hhmm(opens + timedelta(hours=2))}]}
    assert fleet.client.post("/api/v1/groups", json=group).status_code == 201
    body = {**spec(fleet, wave("all", 100, min_reporting=0)), "tag": None, "group": group["name"]}
    fleet.start({k: v for k, v in body.items() if v is not None})
    st = fleet.tick(T0)
    assert st["target"] == {"kind": "group", "value": group["name"]}
    assert not fleet.follow()
    waits = fleet.decisions("wait_window")
    assert len(waits) == 1 and "maintenance window" in waits[0]["reason"]
    fleet.tick(T0 + 600)
    assert len(fleet.decisions("wait_window")) == 1  # recorded once, not every tick
    st = fleet.tick(T0 + 3600 + 60)
    assert len(fleet.follow()) == 2
    st = fleet.tick(T0 + 3600 + 61)
    assert st["state"] == "completed"


def test_a_groups_rate_limit_applies_to_its_rollouts(make):
    fleet = make({f"gr-{i}": "x86" for i in range(5)})
    group = {"name": f"g-{fleet.tag}", "query": {"tags_all": [fleet.tag]}, "rate_limit_per_min": 2}
    assert fleet.client.post("/api/v1/groups", json=group).status_code == 201
    fleet.start({"model": "digits", "version": "1.1.0", "group": group["name"], "waves": [wave("all", 100, min_reporting=0)]})
    fleet.tick(T0)
    assert len(fleet.follow()) == 2
    fleet.tick(T0 + 30)
    assert not fleet.follow()
    fleet.tick(T0 + 61)
    assert len(fleet.follow()) == 2


def test_the_shadow_phase_runs_the_candidate_beside_the_committed_model_then_installs_it(make):
    fleet = make({"sh-a": "x86", "sh-b": "x86"})
    fleet.start(spec(fleet, wave("canary", 50, shadow_s=120, soak_s=0, success=SUCCESS, error=ERROR), wave("all", 100)))
    fleet.tick(T0)
    canary = [d for d in fleet.hw if fleet.device(d).desired_shadow]
    assert len(canary) == 1
    shadow = fleet.device(canary[0]).desired_shadow
    assert (shadow["version"], shadow["sample_every"]) == ("1.1.0", 1) and shadow["artifact"]["sha256"]
    assert shadow["target"]  # a signed TUF target, verified by the agent exactly like an update
    fleet.follow()
    assert fleet.running[canary[0]] == "1.0.0"  # still serving the committed model
    fleet.report()
    st = fleet.tick(T0 + 60)
    assert st["cohorts"][0]["phase"] == "shadow" and st["cohorts"][0]["figures"]["shadow_agreement"] == 1.0
    st = fleet.tick(T0 + 121)
    assert fleet.decisions("shadow_passed")
    dev = fleet.device(canary[0])
    assert dev.desired_version == "1.1.0" and dev.desired_shadow is None
    for t in range(122, 126):
        fleet.follow()
        fleet.report()
        st = fleet.tick(T0 + t)
    assert st["state"] == "completed"


def test_low_shadow_agreement_halts_the_canary_before_it_installs(make):
    fleet = make({"sl-a": "x86", "sl-b": "x86"})
    fleet.behaviours["1.1.0"] = Behaviour(shadow_agreement=0.6)
    fleet.start(spec(fleet, wave("canary", 50, shadow_s=600, success=SUCCESS, error=ERROR), wave("all", 100)))
    fleet.tick(T0)
    canary = [d for d in fleet.hw if fleet.device(d).desired_shadow]
    fleet.follow()
    fleet.report()
    st = fleet.tick(T0 + 10)
    assert st["state"] == "halted"
    halt = fleet.decisions("halt")[0]
    assert halt["figures"]["shadow_agreement"] == pytest.approx(0.6) and "shadow_agreement < 0.9" in halt["reason"]
    dev = fleet.device(canary[0])
    assert dev.desired_shadow is None and dev.desired_version == "1.0.0"
    assert fleet.decisions("shadow_end")


def test_a_device_receives_the_shadow_candidate_in_its_retained_desired_state_over_mqtt(make):
    fleet = make({"mq-a": "x86"})
    device_id = next(iter(fleet.hw))
    with fleet.services.db.session() as s:
        from edgewise.control.auth import issue_device_token

        token = issue_device_token(s, device_id)
    got: list[p.DesiredState] = []
    seen = threading.Event()

    def on_message(client, userdata, msg):  # noqa: ANN001
        state = p.decode_for_topic(msg.topic, msg.payload)[1]
        got.append(state)
        if state.shadow is not None:
            seen.set()

    fleet.start(spec(fleet, wave("all", 100, shadow_s=60)))
    fleet.tick(T0)
    url = urlsplit(fleet.services.broker_url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(device_id, token)
    c.on_message = on_message
    c.connect(url.hostname, url.port)
    c.loop_start()
    try:
        c.subscribe(p.topics.desired(device_id), qos=1)
        assert seen.wait(10), f"no desired state with a shadow arrived: {got}"
    finally:
        c.disconnect()
        c.loop_stop()
    state = got[-1]
    assert state.shadow is not None and state.shadow.version == "1.1.0" and state.version == "1.0.0"
