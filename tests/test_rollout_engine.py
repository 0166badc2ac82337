"""The rollout engine end to end through the REST API, with devices played through the real ingest path
and the engine ticked by hand on a fake clock (see test_rollout_support)."""

from __future__ import annotations

import pytest

from test_rollout_support import ERROR, SUCCESS, T0, Behaviour, cp, make, open_control_plane, open_fleet, spec, wave  # noqa: F401


TEN = {f"ro-{i:02d}": ("rpi4" if i % 2 else "x86") for i in range(10)}


def test_a_healthy_candidate_goes_through_every_wave_to_the_whole_fleet(make):
    fleet = make(TEN)
    fleet.start(spec(fleet, wave("canary", 10, soak_s=60, success=SUCCESS, error=ERROR),
                     wave("half", 50, success=SUCCESS, error=ERROR), wave("all", 100, success=SUCCESS, error=ERROR)))
    st = fleet.tick(T0)
    assert st["state"] == "running"
    canary = [d for d, v in fleet.running.items() if fleet.device(d).desired_version == "1.1.0"]
    assert len(canary) == 2  # one of each hardware class (10% rounded up per class)
    assert {fleet.hw[d] for d in canary} == {"rpi4", "x86"}
    fleet.follow()
    fleet.report()
    st = fleet.tick(T0 + 30)
    assert all(c["wave"] == 0 for c in st["cohorts"])  # soaking: 60 s not over
    assert "soaking" in st["cohorts"][0]["note"]
    st = fleet.tick(T0 + 61)
    assert all(c["wave"] == 1 for c in st["cohorts"]), st["cohorts"]
    proceed = fleet.decisions("proceed")
    assert len(proceed) == 2 and proceed[0]["figures"]["reporting"] == 1 and proceed[0]["figures"]["error_rate"] == 0.0
    for t in range(62, 70):
        fleet.follow()
        fleet.report()
        st = fleet.tick(T0 + t)
    assert st["state"] == "completed", st
    assert st["updated"] == 10
    assert set(fleet.running.values()) == {"1.1.0"}
    assert [d["decision"] for d in st["decisions"]][-1] == "completed"


def test_the_error_condition_halts_the_canary_and_returns_its_devices_to_the_previous_version(make):
    fleet = make(TEN)
    fleet.behaviours["1.1.0"] = Behaviour(error_rate=0.2)
    fleet.start(spec(fleet, wave("canary", 10, soak_s=60, success=SUCCESS, error=ERROR), wave("all", 100)))
    fleet.tick(T0)
    canary = fleet.follow()
    assert len(canary) == 2
    fleet.report()
    st = fleet.tick(T0 + 1)
    assert st["state"] == "halted"
    halts = fleet.decisions("halt")
    assert len(halts) == 2 and all(h["figures"]["error_rate"] == pytest.approx(0.2) for h in halts)
    assert "error_rate > 0.05" in halts[0]["reason"]
    assert {d["decision"] for d in st["decisions"]} >= {"halt", "rollback", "halted"}
    for d in canary:
        dev = fleet.device(d)
        assert (dev.desired_version, dev.desired_rollback) == ("1.0.0", True)
    fleet.follow()
    assert set(fleet.running.values()) == {"1.0.0"}  # the other 8 were never touched
    assert st["reverted"] == 2


def test_only_the_hardware_class_where_the_candidate_is_slower_halts_and_rolls_back(make):
    fleet = make(TEN)
    fleet.behaviours["1.1.0"] = Behaviour(latency_ms={"rpi4": 30.0, "*": 10.0})  # 3x slower on rpi4 only
    fleet.start(spec(fleet, wave("canary", 10, success=SUCCESS, error=ERROR), wave("all", 100, success=SUCCESS, error=ERROR)))
    for t in range(6):
        fleet.tick(T0 + t)
        fleet.follow()
        fleet.report()
    st = fleet.tick(T0 + 10)
    assert st["state"] == "halted" and st["halted_cohorts"] == ["rpi4"]
    halt = fleet.decisions("halt")[0]
    assert halt["cohort"] == "rpi4" and halt["wave"] == 0 and halt["figures"]["p95_ratio"] == pytest.approx(3.0)
    fleet.follow()
    for d, hw in fleet.hw.items():
        assert fleet.running[d] == ("1.1.0" if hw == "x86" else "1.0.0"), d
    x86 = next(c for c in st["cohorts"] if c["cohort"] == "x86")
    assert x86["phase"] == "completed"


def test_a_wave_that_needs_approval_waits_until_an_operator_approves(make):
    fleet = make(TEN)
    fleet.start(spec(fleet, wave("canary", 10, success=SUCCESS, error=ERROR, approval=True), wave("all", 100)))
    fleet.tick(T0)
    fleet.follow()
    fleet.report()
    st = fleet.tick(T0 + 1)
    assert st["state"] == "waiting_approval"
    st = fleet.tick(T0 + 100)
    assert st["state"] == "waiting_approval" and all(c["wave"] == 0 for c in st["cohorts"])
    r = fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/approve")
    assert r.status_code == 200, r.text
    assert fleet.decisions("approved")[0]["actor"].endswith("(user:admin)")
    st = fleet.tick(T0 + 101)
    assert st["state"] == "running" and all(c["wave"] == 1 for c in st["cohorts"])
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/approve").status_code == 409


def test_pause_holds_the_rollout_resume_continues_and_abort_with_rollback_returns_devices(make):
    fleet = make(TEN)
    fleet.start(spec(fleet, wave("canary", 10, success=SUCCESS, error=ERROR), wave("all", 100), start_paused=True))
    st = fleet.tick(T0)
    assert st["state"] == "paused"
    assert all(fleet.device(d).desired_version == "1.0.0" for d in fleet.hw)
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/resume").status_code == 200
    st = fleet.tick(T0 + 1)
    assert st["state"] == "running"
    canary = fleet.follow()
    assert len(canary) == 2
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/pause").json()["state"] == "paused"
    fleet.report()
    st = fleet.tick(T0 + 2)
    assert st["state"] == "paused" and all(c["wave"] == 0 for c in st["cohorts"])
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/resume").status_code == 200
    r = fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/abort", json={"rollback": True})
    assert r.status_code == 200 and r.json()["state"] == "aborted"
    fleet.tick(T0 + 3)
    fleet.follow()
    assert set(fleet.running.values()) == {"1.0.0"}
    assert fleet.client.post(f"/api/v1/rollouts/{fleet.rollout_id}/resume").status_code == 409


def test_crash_events_from_the_canary_halt_it(make):
    fleet = make(TEN)
    fleet.start(spec(fleet, wave("canary", 10, soak_s=300, success=SUCCESS, error=ERROR), wave("all", 100)))
    fleet.tick(T0)
    canary = fleet.follow()
    fleet.event(canary[0], "model.crash", version="1.1.0")
    st = fleet.tick(T0 + 1)
    halt = fleet.decisions("halt")
    assert len(halt) == 1 and halt[0]["figures"]["crashes"] == 1 and halt[0]["cohort"] == fleet.hw[canary[0]]
    assert st["halted_cohorts"] == [fleet.hw[canary[0]]]


def test_a_trial_rolled_back_for_a_crash_counts_as_a_crash_and_as_rolled_back(make):
    fleet = make({"rb-1": "x86", "rb-2": "x86"})
    fleet.behaviours["1.1.0"] = Behaviour(install="rolled_back", reason="model crashed during trial (exit -11)")
    fleet.start(spec(fleet, wave("canary", 50, soak_s=300, success=SUCCESS, error="crashes > 0"), wave("all", 100)))
    fleet.tick(T0)
    fleet.follow()
    st = fleet.tick(T0 + 1)
    halt = fleet.decisions("halt")[0]
    assert halt["figures"]["crashes"] == 1 and halt["figures"]["rolled_back"] == 1
    assert halt["figures"]["failed_fraction"] == 1.0
    assert st["state"] == "halted"


def test_rate_limit_starts_at_most_that_many_devices_per_minute(make):
    fleet = make(TEN)
    fleet.start(spec(fleet, wave("all", 100, success="true", error=ERROR, min_reporting=0), rate_limit_per_min=3))
    started = []
    for t in (0, 10, 59, 61, 62, 125, 190, 250):
        fleet.tick(T0 + t)
        started.append(sum(fleet.device(d).desired_version == "1.1.0" for d in fleet.hw))
    assert started == [3, 3, 3, 6, 6, 9, 10, 10]
    assert fleet.decisions("wait_rate_limit")
    assert fleet.status()["state"] == "completed"


def test_explicit_device_waves_start_with_exactly_those_devices(make):
    fleet = make(TEN)
    lab = sorted(fleet.hw)[3:5]
    fleet.start(spec(fleet, wave("lab", devices=lab, success=SUCCESS, error=ERROR), wave("all", 100)))
    fleet.tick(T0)
    assert sorted(fleet.follow()) == lab


def test_a_restarted_control_plane_resumes_the_rollout_from_the_database(tmp_path, keys_dir, bundles):
    devices = {f"rs-{i}": "x86" for i in range(4)}
    client, settings = open_control_plane(tmp_path / "cp", keys_dir, bundles)
    fleet = open_fleet(client, settings, devices, tag="restart")
    try:
        fleet.start(spec(fleet, wave("canary", 25, soak_s=60, success=SUCCESS, error=ERROR), wave("all", 100, success=SUCCESS)))
        fleet.tick(T0)
        canary = fleet.follow()
        fleet.report()
        st = fleet.tick(T0 + 10)
        assert st["cohorts"][0]["phase"] == "soaking"
        rid = fleet.rollout_id
    finally:
        client.__exit__(None, None, None)
    client2, settings2 = open_control_plane(tmp_path / "cp", keys_dir, bundles)
    fleet2 = open_fleet(client2, settings2, {}, tag="restart")
    try:
        for attr in ("hw", "running", "generation"):
            setattr(fleet2, attr, getattr(fleet, attr))
        fleet2._seq = fleet._seq  # noqa: SLF001 - the devices' sequence numbers go on
        fleet2.rollout_id = rid
        st = fleet2.tick(T0 + 30)
        assert st["cohorts"][0]["phase"] == "soaking" and st["cohorts"][0]["wave"] == 0  # soak measured from the stored start
        st = fleet2.tick(T0 + 71)
        assert st["cohorts"][0]["wave"] == 1
        fleet2.follow()
        fleet2.report()
        st = fleet2.tick(T0 + 72)
        assert st["state"] == "completed"
        assert len(canary) == 1 and set(fleet2.running.values()) == {"1.1.0"}
    finally:
        client2.__exit__(None, None, None)


def test_a_shift_in_prediction_confidence_against_the_previous_version_halts(make):
    fleet = make({"cs-a": "x86", "cs-b": "x86"})
    fleet.behaviours["1.1.0"] = Behaviour(confidence=0.55)  # 1.0.0 reports 0.85
    fleet.start(spec(fleet, wave("canary", 50, soak_s=60, success=SUCCESS, error="confidence_shift > 0.2"),
                     wave("all", 100)))
    fleet.tick(T0)
    fleet.follow()
    fleet.report()
    fleet.tick(T0 + 1)
    halt = fleet.decisions("halt")[0]
    assert halt["figures"]["confidence_shift"] == pytest.approx(0.3)


def test_telemetry_counters_give_the_error_rate_since_the_start_and_drift_is_averaged(make):
    fleet = make({"tm-a": "x86"})
    device_id = next(iter(fleet.hw))
    fleet.telemetry(device_id, inferences=5000, errors=400, p95_ms=10.0)  # 1.0.0: errors before the start do not count
    fleet.start(spec(fleet, wave("all", 100, soak_s=600, success=SUCCESS, error="error_rate > 0.05 or drift_score > 0.5")))
    fleet.tick(T0)
    fleet.follow()
    fleet.telemetry(device_id, inferences=5100, errors=401, p95_ms=12.0, drift=0.2)
    fleet.telemetry(device_id, inferences=5200, errors=402, p95_ms=14.0, drift=0.4)
    st = fleet.tick(T0 + 1)
    f = st["cohorts"][0]["figures"]
    assert f["error_rate"] == pytest.approx(2 / 200) and f["inferences"] == 200
    assert f["p95_ms"] == pytest.approx(13.0) and f["drift_score"] == pytest.approx(0.3)
    assert f["p95_ratio"] == pytest.approx(13.0 / 10.0)
    assert st["state"] == "running"
    fleet.telemetry(device_id, inferences=5300, errors=402, p95_ms=14.0, drift=0.9)
    fleet.telemetry(device_id, inferences=5400, errors=402, p95_ms=14.0, drift=0.9)
    assert fleet.tick(T0 + 2)["state"] == "halted"
