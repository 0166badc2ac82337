"""The dashboard's federated-jobs pages (issue 8 FL2), clicked through in headless chromium against a live control plane
running a real DP job whose updates arrive signed through the real ingest path."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import free_port
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import http_json, wait_until
from test_dashboard_fleet_support import browser, page  # noqa: F401  (fixtures)
from test_fl_support import deliver, head_shapes, job, register_fake, signed_update, wait_round


@pytest.fixture(scope="module")
def fl_server(tmp_path_factory, keys_dir, bundles):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    cp = ControlPlane(ServerSettings(data_dir=tmp_path_factory.mktemp("fl-dash"), port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"], fl_signing_key=keys_dir / "signing.key", fl_tick_s=0.05))
    cp.start()
    upload_bundle(cp.url, bundles["1.1.0"], cp.admin_token)
    yield cp
    cp.stop()


@pytest.fixture(scope="module")
def dp_job(fl_server):
    """A DP job over two wire-only devices: two rounds released, one NaN update rejected, stopped when the budget is spent."""
    from edgewise.learn.dp import epsilon_after

    cp = fl_server
    shapes = head_shapes(cp)
    devs = ["fld-a", "fld-b"]
    for d in devs:
        register_fake(cp, d)
    keys = {d: ec.generate_private_key(ec.SECP256R1()) for d in devs}
    z, delta = 2.0, 1e-5
    eps = [epsilon_after(n, 1.0, z, delta) for n in (1, 2, 3)]
    body = {"name": "dash dp", "model": "digits", "base_version": "1.1.0", "devices": devs, "cohort_size": 2, "rounds": 10,
            "round_deadline_s": 30, "eval_set": "digits", "min_updates": 1, "max_updates": 1, "clip_norm": 0.5,
            "dp": {"epsilon": (eps[1] + eps[2]) / 2, "delta": delta, "noise_multiplier": z}}
    j = http_json("POST", f"{cp.url}/api/v1/fl/jobs", body, token=cp.admin_token)
    rng = np.random.default_rng(0)
    for n in (1, 2):
        wait_round(cp, j["id"], n)
        if n == 1:  # a broken device: NaN in its update, rejected on arrival
            nan = {k: rng.normal(0, 1e-3, size=s).astype(np.float32) for k, s in shapes.items()}
            next(iter(nan.values())).flat[0] = np.nan
            deliver(cp, signed_update(devs[1], j["id"], n, n - 1, nan, key=keys[devs[1]]))
        good = {k: rng.normal(0, 1e-3, size=s).astype(np.float32) for k, s in shapes.items()}
        deliver(cp, signed_update(devs[0], j["id"], n, n - 1, good, key=keys[devs[0]]))
        wait_round(cp, j["id"], n, "closed")
    return wait_until(lambda: (s := job(cp, j["id"]))["state"] != "running" and s, 20, what="the job to stop")


def test_the_federated_page_lists_jobs_with_state_accuracy_and_epsilon_spent_of_the_budget(fl_server, dp_job, page):
    page.goto(f"{fl_server.url}/#/fl&token={fl_server.admin_token}")
    row = f"tr.fl-job[data-job='{dp_job['id']}']"
    page.wait_for_selector(row)
    text = page.inner_text(row)
    assert "dash dp" in text and "digits 1.1.0" in text and "stopped" in text
    assert f"{dp_job['epsilon']:.2f} / {dp_job['epsilon_budget']:.3f}" in page.inner_text(f"{row} .fl-epsilon")
    assert re.search(r"\b2 / 1\b", text)  # updates used (one per round) / rejected (the NaN one)
    assert page.get_attribute("#nav a[data-page='fl']", "class") == "active"


def test_a_jobs_page_shows_each_round_with_participants_rejections_accuracy_and_epsilon_and_charts_them(fl_server, dp_job, page):
    page.goto(f"{fl_server.url}/#/fl&token={fl_server.admin_token}")
    page.click(f"tr.fl-job[data-job='{dp_job['id']}'] a")
    page.wait_for_selector("#page-fl-job:not([hidden]) tr.fl-round[data-round='2']")
    assert f"#/fl/{dp_job['id']}" in page.url
    for r in dp_job["rounds"]:
        cells = page.eval_on_selector_all(f"tr.fl-round[data-round='{r['number']}'] td", "tds => tds.map(t => t.textContent)")
        number, state, cohort, participants, used, late, rejected, clipped, accuracy, epsilon = cells[:10]
        assert (number, state, cohort, participants, used) == (str(r["number"]), "closed", "2", "1", "1")
        assert rejected == str(r["rejected"]) and accuracy == f"{r['accuracy']:.3f}" and epsilon == f"{r['epsilon']:.3f}"
    assert [r["rejected"] for r in dp_job["rounds"]] == [1, 0]  # the NaN update counts against round 1
    assert "not_finite" in page.inner_text("#fl-rejected-body") and "fld-b" in page.inner_text("#fl-rejected-body")
    assert "budget" in page.inner_text("#fl-job-meta")
    page.wait_for_selector(".chart[data-chart='ε spent'] canvas")
    page.wait_for_selector(".chart[data-chart='Accuracy per round'] canvas")
    legend = page.inner_text(".chart[data-chart='ε spent']")
    assert "epsilon" in legend and "budget" in legend
