"""The headline: staged rollouts operated from the dashboard in headless chromium, against a live control plane
whose devices are the in-process simulator (`edgewise.sim.virtual.VirtualFleet`, real MQTT).

A good model goes canary → approval (clicked) → everyone; then a bad one is started from the form, the canary
halts on its error rate, the decision shows its figures, and the canary devices return to the previous version.
"""

from __future__ import annotations

import json
import re

import pytest

from test_dashboard_fleet_support import browser, page, sign_in  # noqa: F401  (fixtures)
from test_sim_support import Api, build_versions, start_control_plane

virtual = pytest.importorskip("edgewise.sim.virtual")

GATES = {"success": "reporting >= 1 and error_rate <= 0.01", "error": "failed_fraction > 0.2 or error_rate > 0.05 or crashes > 0"}
IDS = [f"dash-ro-{i}" for i in range(5)]


@pytest.fixture()
def fleet_cp(tmp_path, keys_dir, digits_models, signer):
    """A control plane with digits 1.0.0, 1.1.0 (good) and 1.2.0 (bad: half its inferences fail) and five simulated
    rpi4 cameras running 1.0.0."""
    cp = start_control_plane(tmp_path / "cp", None, keys_dir / "signing.pub")
    api = Api(cp)
    for path in build_versions(tmp_path / "bundles", digits_models["logreg"], signer, ["1.0.0", "1.1.0", "1.2.0"]).values():
        api.upload(path)
    specs = [virtual.VirtualDeviceSpec(device_id=i, hardware_class="rpi4", tags=["cams"], model="digits", version="1.0.0",
                                       telemetry_s=0.3, install_s=0.2) for i in IDS]
    fleet = virtual.VirtualFleet(cp.broker_url, cp.url, cp.admin_token, specs,
                                 {"1.2.0": virtual.VersionBehaviour(error_rate=0.5)})
    fleet.start()
    try:
        yield cp, api, fleet
    finally:
        fleet.stop()
        api.close()
        cp.stop()


def _waves(canary_approval: bool) -> list[dict]:
    return [{"name": "canary", "percent": 20, "min_reporting": 1, "soak_s": 1.0, "approval": canary_approval, **GATES},
            {"name": "everyone", "percent": 100, "min_reporting": 1, "soak_s": 0.5, **GATES}]


def _start_from_form(page, version: str, waves: list[dict]) -> None:
    page.click("nav a[data-page='rollouts']")
    page.click("#rollout-create summary")
    page.select_option("#rf-model", "digits")
    page.select_option("#rf-version", version)
    page.select_option("#rf-target-kind", "tag")
    page.fill("#rf-target", "cams")
    page.fill("#rf-waves", json.dumps(waves))
    page.click("#rollout-form button[type=submit]")
    page.wait_for_selector(f"#page-rollout:not([hidden]) #rollout-title:has-text('digits {version}')")


def test_a_rollout_from_the_dashboard_proceeds_on_approval_then_a_bad_model_halts_at_the_canary_and_returns(fleet_cp, page):
    cp, api, fleet = fleet_cp
    sign_in(page, cp)  # a person: session cookie, and the CSRF header on every button

    # 1. a good model: the canary soaks, waits for approval (clicked), then everyone gets it
    _start_from_form(page, "1.1.0", _waves(canary_approval=True))
    page.wait_for_selector("#rollout-state:has-text('waiting_approval')", timeout=30_000)
    canary = page.inner_text(".wave[data-wave='canary'] tr[data-cohort='rpi4']")
    assert "waiting_approval" in canary and "1/1" in canary  # 20% of five rpi4s: one canary, updated
    page.click("#rollout-actions button[data-action='approve']")
    page.wait_for_selector("#rollout-state:has-text('completed')", timeout=30_000)
    fleet.wait_versions({i: "1.1.0" for i in IDS}, timeout=20)
    decisions = page.inner_text("#rollout-decisions-body")
    assert "approved" in decisions and "(user:admin)" in decisions and "complete" in decisions

    # 2. a bad model: the canary's error rate halts it, and the canary returns to 1.1.0 by itself
    _start_from_form(page, "1.2.0", _waves(canary_approval=False))
    page.wait_for_selector("#rollout-state:has-text('halted')", timeout=30_000)
    halt = page.wait_for_selector("tr.decision-halt")
    m = re.search(r"error_rate=([0-9.]+)", halt.inner_text())  # the figures that led to the halt
    assert m and float(m.group(1)) > 0.05, halt.inner_text()
    page.wait_for_selector("#rollout-devices-body tr.rollout-device-reverted td.running-other:has-text('1.1.0')",
                           timeout=30_000)
    assert "rollback" in page.inner_text("#rollout-decisions-body")
    assert page.is_disabled("#rollout-actions button[data-action='resume']")
    fleet.wait_versions({i: "1.1.0" for i in IDS}, timeout=20)  # the other waves never started
    # the rollouts list tells the same story
    page.click("nav a[data-page='rollouts']")
    halted = page.wait_for_selector("#rollouts-body tr.rollout-halted")
    assert "digits 1.2.0" in halted.inner_text() and "canary: rpi4 halted" in halted.inner_text()
    assert "digits 1.1.0" in page.inner_text("#rollouts-body tr.rollout-completed")


def test_pause_and_resume_buttons_hold_and_restart_a_rollout(fleet_cp, page):
    cp, api, fleet = fleet_cp
    r = api.call("POST", "/api/v1/rollouts", json={"model": "digits", "version": "1.1.0", "tag": "cams",
                                                   "waves": _waves(canary_approval=False), "start_paused": True})
    sign_in(page, cp, f"#/rollouts/{r['id']}")
    page.wait_for_selector("#rollout-state:has-text('paused')")
    assert page.is_disabled("#rollout-actions button[data-action='pause']")
    page.click("#rollout-actions button[data-action='resume']")
    page.wait_for_selector("#rollout-state:has-text('completed')", timeout=30_000)
    page.wait_for_selector("#rollout-actions button[data-action='abort']:disabled")
    assert api.call("GET", f"/api/v1/rollouts/{r['id']}")["updated"] == len(IDS)


def test_a_rollout_form_with_an_unknown_figure_shows_the_servers_reason(fleet_cp, page):
    cp, api, fleet = fleet_cp
    sign_in(page, cp, "#/rollouts")
    page.click("#rollout-create summary")
    page.select_option("#rf-model", "digits")
    page.select_option("#rf-version", "1.1.0")
    page.select_option("#rf-target-kind", "tag")
    page.fill("#rf-target", "cams")
    page.fill("#rf-waves", json.dumps([{"percent": 100, "success": "happiness > 3"}]))
    page.click("#rollout-form button[type=submit]")
    err = page.wait_for_selector("#rf-error:not([hidden])")
    assert "happiness" in err.inner_text()
