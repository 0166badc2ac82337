"""Staged rollouts proven on a simulated fleet: ~24 virtual devices of two hardware classes on a real Mosquitto, a real
control plane, and the rollout REST API (POST /api/v1/rollouts). Each scenario starts from every device running
1.0.0 (and reporting on it, so ratios against the previous version have a baseline)."""

from __future__ import annotations

import secrets
import time

import pytest

from edgewise.sim.behaviour import VersionBehaviour
from edgewise.sim.virtual import VirtualFleet, specs_for
from test_agent_support import wait_for
from test_sim_support import Api, build_versions, start_control_plane

N = 24  # 12 per hardware class
CLASSES = ("rpi4", "x86-small")
BEHAVIOURS = {
    "1.0.0": VersionBehaviour(latency_ms={"*": 10.0}),
    "1.1.0": VersionBehaviour(latency_ms={"*": 10.0}),  # as good as 1.0.0
    "1.2.0": VersionBehaviour(latency_ms={"*": 10.0, "rpi4": 30.0}),  # three times slower on rpi4 only
    "1.3.0": VersionBehaviour(crash=True),  # crashes in its trial everywhere
    "1.4.0": VersionBehaviour(shadow_agreement=0.6),  # disagrees with 1.0.0 on 40% of the inputs
}
ERROR = "failed_fraction > 0.2 or crashes > 0 or p95_ratio > 1.5 or shadow_agreement < 0.9"
SUCCESS = "reporting >= 1 and error_rate <= 0.01"


@pytest.fixture(scope="module")
def plane(tmp_path_factory, mosquitto, keys_dir, signer, digits_models):
    d = tmp_path_factory.mktemp("rollout-scenarios")
    cp = start_control_plane(d / "cp", mosquitto, keys_dir / "signing.pub", rollout_tick_s=0.1)
    api = Api(cp)
    for path in build_versions(d / "bundles", digits_models["logreg"], signer, list(BEHAVIOURS)).values():
        api.upload(path)
    yield cp, api
    api.close()
    cp.stop()


@pytest.fixture
def fleet(plane, mosquitto):
    """24 virtual devices (tag unique to the test) on 1.0.0, deployed through the control plane, reporting on it."""
    cp, api = plane
    tag = f"sc{secrets.token_hex(3)}"
    specs = specs_for(N, prefix=tag, hardware_classes=CLASSES, tags=[tag], telemetry_s=0.2, install_s=0.1,
                      inference_rate=200)
    with VirtualFleet(mosquitto, cp.url, cp.admin_token, specs, BEHAVIOURS) as f:
        f.wait_connected(15)
        api.wait_registered([s.device_id for s in specs])
        api.deploy("1.0.0", tag=tag)
        f.wait_versions({s.device_id: "1.0.0" for s in specs}, 20)
        time.sleep(0.8)  # a few telemetry windows on 1.0.0: the baseline the gates compare with
        f.wait_flushed(10)
        f.tag = tag  # type: ignore[attr-defined]
        yield f


def _rollout(api: Api, tag: str, version: str, waves: list[dict]) -> int:
    body = {"model": "digits", "version": version, "tag": tag, "waves": waves}
    return api.call("POST", "/api/v1/rollouts", json=body, expect=201)["id"]


def _waves(**overrides) -> list[dict]:
    base = {"min_reporting": 1, "soak_s": 0, "success": SUCCESS, "error": ERROR, **overrides}
    return [{"name": "canary", "percent": 10, **base}, {"name": "half", "percent": 50, **base},
            {"name": "all", "percent": 100, **base}]


def _finished(api: Api, rid: int, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (r := api.call("GET", f"/api/v1/rollouts/{rid}"))["state"] in ("completed", "halted", "aborted") and r,
                    timeout, interval=0.2, what=f"rollout {rid} finished")


def _by_class(fleet: VirtualFleet) -> dict[str, set[str | None]]:
    versions = fleet.versions()
    out: dict[str, set[str | None]] = {c: set() for c in CLASSES}
    for spec in fleet.specs:
        out[spec.hardware_class].add(versions[spec.device_id])
    return out


def _ever_installed(fleet: VirtualFleet, version: str) -> list[str]:
    return fleet.call(lambda: [d.id for d in fleet.devices.values() if (version, "ok") in d.stats.history])


def test_a_good_model_rolls_out_through_every_wave(plane, fleet):
    cp, api = plane
    rid = _rollout(api, fleet.tag, "1.1.0", _waves())
    r = _finished(api, rid)
    assert r["state"] == "completed", r["reason"]
    fleet.wait_versions({s.device_id: "1.1.0" for s in fleet.specs}, 20)
    assert {d["wave_name"] for d in r["decisions"] if d["wave_name"]} >= {"canary", "half", "all"}  # each wave decided
    assert r["halted_cohorts"] == [] and r["reverted"] == 0


def test_a_model_slower_on_one_hardware_class_halts_at_the_canary_and_rolls_back_only_there(plane, fleet):
    cp, api = plane
    rid = _rollout(api, fleet.tag, "1.2.0", _waves())
    r = _finished(api, rid)
    assert r["state"] == "halted" and r["halted_cohorts"] == ["rpi4"], r["reason"]
    wait_for(lambda: _by_class(fleet) == {"rpi4": {"1.0.0"}, "x86-small": {"1.2.0"}}, 20, what="rpi4 back on 1.0.0, x86 on 1.2.0")
    halt = next(d for d in r["decisions"] if d["cohort"] == "rpi4" and "halt" in d["decision"])
    assert halt["wave_name"] == "canary" and halt["figures"]["p95_ratio"] > 1.5
    rpi4_ids = {s.device_id for s in fleet.specs if s.hardware_class == "rpi4"}
    tried = set(_ever_installed(fleet, "1.2.0")) & rpi4_ids
    assert 0 < len(tried) <= 2  # only the rpi4 canaries (10% of 12, rounded up) ever ran it


def test_a_crashing_model_rolls_back(plane, fleet):
    cp, api = plane
    rid = _rollout(api, fleet.tag, "1.3.0", _waves())
    r = _finished(api, rid)
    assert r["state"] == "halted", r["reason"]
    assert set(r["halted_cohorts"]) == set(CLASSES)
    assert any((d["figures"] or {}).get("crashes", 0) > 0 for d in r["decisions"] if "halt" in d["decision"] and d["cohort"])
    assert _by_class(fleet) == {"rpi4": {"1.0.0"}, "x86-small": {"1.0.0"}}
    assert _ever_installed(fleet, "1.3.0") == []
    crashed = fleet.call(lambda: [d.id for d in fleet.devices.values() if ("1.3.0", "rolled_back") in d.stats.history])
    assert 0 < len(crashed) <= 4  # the canaries only


def test_a_model_with_low_shadow_agreement_never_leaves_the_canary(plane, fleet):
    cp, api = plane
    waves = _waves()
    waves[0].update(shadow_s=1.0, success="shadow_compared >= 100 and shadow_agreement >= 0.9")
    rid = _rollout(api, fleet.tag, "1.4.0", waves)
    r = _finished(api, rid)
    assert r["state"] == "halted", r["reason"]
    assert all(c["wave"] == 0 for c in r["cohorts"])
    halts = [d for d in r["decisions"] if "halt" in d["decision"] and d["cohort"]]  # per cohort (the rollout's own has none)
    assert {d["cohort"] for d in halts} == set(CLASSES) and all(d["wave_name"] == "canary" for d in halts)
    assert all(d["figures"]["shadow_agreement"] < 0.9 for d in halts)
    assert _ever_installed(fleet, "1.4.0") == []  # it only ever ran in shadow mode
    shadowed = fleet.call(lambda: [d.id for d in fleet.devices.values() if "1.4.0" in d.stats.shadowed])
    assert 0 < len(shadowed) <= 4
    assert _by_class(fleet) == {"rpi4": {"1.0.0"}, "x86-small": {"1.0.0"}}
