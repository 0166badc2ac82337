"""The dashboard's pages, clicked through in headless chromium (Playwright) against a live control plane whose
devices are scripted over MQTT with real protocol messages."""

from __future__ import annotations

import re

from edgewise.bundle.build import build_bundle
from edgewise.sim.fleet import http_json, wait_until
from test_data_fleet_drift_e2e import upload
from test_dashboard import live_server  # noqa: F401  (fixture: a control plane with its embedded broker)
from test_dashboard_fleet_support import ScriptedDevice, browser, page, sign_in  # noqa: F401  (fixtures)


def _devices(cp, specs):
    """Scripted devices: {id: dict(state kwargs)}; waits until the control plane has them all."""
    devs = []
    for device_id, kw in specs.items():
        d = ScriptedDevice(cp, device_id)
        d.state(**kw)
        devs.append(d)
    token = cp.admin_token
    wait_until(lambda: {x["id"] for x in http_json("GET", f"{cp.url}/api/v1/devices", token=token)} >= set(specs), 15,
               what="the scripted devices to register")
    return devs


def test_fleet_overview_counts_devices_by_status_version_and_hardware_class(live_server, page):
    devs = _devices(live_server, {
        "ov-a": dict(hardware_class="rpi4"), "ov-b": dict(hardware_class="rpi4"),
        "ov-c": dict(hardware_class="jetson", version="1.1.0"), "ov-d": dict(hardware_class="jetson", status="degraded"),
    })
    try:
        page.goto(f"{live_server.url}/#token={live_server.admin_token}")
        page.wait_for_selector(".tile[data-device='ov-d']")
        hw = page.inner_text("#count-hardware")
        assert re.search(r"rpi4\s+2", hw) and re.search(r"jetson\s+2", hw)
        assert re.search(r"digits 1\.0\.0\s+3", page.inner_text("#count-version"))
        assert re.search(r"digits 1\.1\.0\s+1", page.inner_text("#count-version"))
        status = page.inner_text("#count-status")
        assert re.search(r"online\s+3", status) and re.search(r"degraded\s+1", status)
        assert page.get_attribute(".tile[data-device='ov-d']", "class") == "tile tile-bad"
        assert page.get_attribute(".tile[data-device='ov-a']", "class") == "tile tile-ok"
        assert "#token=" not in page.url  # the token left the address bar at once
    finally:
        for d in devs:
            d.close()


def test_clicking_a_health_tile_opens_the_device_with_charts_slots_events_and_adaptations(live_server, page):
    (dev,) = _devices(live_server, {"det-1": dict(hardware_class="rpi5", tags=["shelf-9"])})
    try:
        dev.telemetry(12, p95_ms=4.0, errors_per_sample=1)
        dev.event("update", "installed digits 1.0.0", detail={"version": "1.0.0"})
        dev.event("adaptation", "adaptation ok: prediction entropy fell", detail={
            "result": "ok", "method": "bn_stats", "reason": "prediction entropy fell", "samples": 256,
            "trigger": "drift", "before": {"entropy": 0.91}, "after": {"entropy": 0.42}})
        token = live_server.admin_token
        wait_until(lambda: len(http_json("GET", f"{live_server.url}/api/v1/devices/det-1/events", token=token)) == 2, 15,
                   what="both events")
        page.goto(f"{live_server.url}/#token={token}")
        page.click(".tile[data-device='det-1']")
        page.wait_for_selector("#page-device:not([hidden]) #device-title:has-text('det-1')")
        assert "#/device/det-1" in page.url
        # real charts: uPlot draws on a canvas, one per series group that has data
        page.wait_for_selector(".chart[data-chart='Latency (ms)'] canvas")
        charts = page.eval_on_selector_all(".chart", "els => els.map(e => e.dataset.chart)")
        assert {"Latency (ms)", "Inference rate (/s)", "Error rate", "CPU (%)"} <= set(charts)
        assert "latency_p95_ms" in page.inner_text(".chart[data-chart='Latency (ms)']")  # the legend
        slots = page.inner_text("#device-slots")
        assert "digits 1.0.0" in slots and "shelf-9" in slots
        assert "rpi5" in page.inner_text("#device-hardware")
        events = page.inner_text("#device-events-body")
        assert "installed digits 1.0.0" in events and "adaptation ok" in events
        adapt = page.inner_text("#device-adaptations-body")
        assert "bn_stats" in adapt and "drift" in adapt and "entropy 0.91 → 0.42" in adapt
    finally:
        dev.close()


def test_models_page_lists_versions_and_variants_with_manifest_figures(live_server, page, digits_models, signer, tmp_path):
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    token = live_server.admin_token
    for version, variant in (("2.0.0", None), ("2.1.0", {
            "name": "int8-qdq", "recipe": "int8-qdq-minmax", "profile": "rpi4",
            "figures": {"size_bytes": 12345, "latency_b1_median_ms": 0.31, "latency_b1_p95_ms": 0.52,
                        "peak_rss_mb": 41.5, "metric": "accuracy", "metric_value": 0.95, "drop": 0.004}}),
            ("2.1.0", {"name": "fp32", "profile": "x86-gateway", "figures": {"latency_b1_median_ms": 0.9}})):
        path = tmp_path / f"vision-{version}-{(variant or {}).get('name')}.ewb"
        build_bundle(digits_models["logreg"], name="vision", version=version, signer=signer, out=path,
                     labels=LABELS, preprocessing=PREPROCESSING, variant=variant)
        upload(live_server, path)
    page.goto(f"{live_server.url}/#/models&token={token}")
    row = page.wait_for_selector(".model[data-model='vision'] tr[data-version='2.1.0'][data-variant='int8-qdq']")
    text = row.inner_text()
    assert "int8-qdq" in text and "rpi4" in text and "12.1 kB" in text and "0.31 ms" in text and "0.52 ms" in text
    assert "41.5 MB" in text and "accuracy 0.95 (drop 0.004)" in text
    fp32 = page.inner_text(".model[data-model='vision'] tr[data-version='2.1.0'][data-variant='fp32']")
    assert "x86-gateway" in fp32 and "0.90 ms" in fp32
    plain = page.inner_text(".model[data-model='vision'] tr[data-version='2.0.0']")
    assert "default" in plain


def test_device_page_shows_its_placed_models_with_their_reported_status_and_the_budget(live_server, page, digits_models,
                                                                                       signer, tmp_path):
    from edgewise.lab.demo_model import LABELS, PREPROCESSING
    from edgewise.protocol.messages import HostedModel

    path = tmp_path / "keyword-1.0.0.ewb"
    build_bundle(digits_models["logreg"], name="keyword", version="1.0.0", signer=signer, out=path, labels=LABELS,
                 preprocessing=PREPROCESSING)
    upload(live_server, path)
    (dev,) = _devices(live_server, {"pl-1": dict(hardware_class="rpi4")})
    try:
        token = live_server.admin_token
        http_json("PUT", f"{live_server.url}/api/v1/devices/pl-1/placements",
                  {"placements": [{"model": "keyword", "version": "1.0.0", "threads": 1, "memory_mb": 64}]}, token=token)
        dev.state(hardware_class="rpi4", hosted=[HostedModel(model="keyword", version="1.0.0", status="serving",
                                                                threads=1, memory_mb=64, rss_mb=31.5)])
        page.goto(f"{live_server.url}/#/device/pl-1&token={token}")
        row = page.wait_for_selector("#device-placements-body tr.hosted-serving[data-model='keyword']")
        assert "1.0.0" in row.inner_text() and "31.5" in row.inner_text() and "64" in row.inner_text()
        assert "RAM 2048 MB" in page.inner_text("#device-budget")
    finally:
        dev.close()


def test_audit_page_after_signing_in_with_the_form_shows_who_changed_what(live_server, page):
    http_json("POST", f"{live_server.url}/api/v1/devices", {"id": "cam-audited", "tags": ["dock"]},
              token=live_server.admin_token)
    sign_in(page, live_server)
    page.click("#nav-audit")
    page.wait_for_selector("#audit:not([hidden]) #audit-body tr")
    body = page.inner_text("#audit-body")
    assert "POST /api/v1/devices" in body
    assert "user:admin" in body  # the sign-in itself is audited


def test_a_viewer_sees_no_audit_page_and_no_operator_buttons(live_server, page):
    token = live_server.admin_token
    http_json("POST", f"{live_server.url}/api/v1/users", {"username": "wall", "password": "a long pass phrase",
                                                           "role": "viewer"}, token=token)
    viewer = http_json("POST", f"{live_server.url}/api/v1/auth/login", {"username": "wall",
                                                                         "password": "a long pass phrase"})
    assert viewer  # the viewer can sign in; the wall display uses an API token instead:
    viewer_token = http_json("POST", f"{live_server.url}/api/v1/tokens", {"name": "wall", "username": "wall"},
                             token=token)["token"]
    page.goto(f"{live_server.url}/#/rollouts&token={viewer_token}")
    page.wait_for_selector("#whoami-name:has-text('wall (viewer)')")
    assert page.is_hidden("#nav-audit")
    assert page.is_hidden("#rollout-create")


def test_the_chart_library_is_served_by_the_control_plane_itself(live_server, page):
    (dev,) = _devices(live_server, {"cdn-1": dict(hardware_class="rpi4")})
    try:
        dev.telemetry(3)
        page.goto(f"{live_server.url}/#/device/cdn-1&token={live_server.admin_token}")
        page.wait_for_selector(".chart canvas")
        assert page.evaluate("typeof uPlot") == "function"
        assert any(u.endswith("/dashboard/vendor/uPlot.iife.min.js") for u in page.requested)
        assert all(u.startswith(live_server.url) for u in page.requested), [u for u in page.requested
                                                                              if not u.startswith(live_server.url)]
    finally:
        dev.close()


def test_a_link_with_a_route_and_a_token_works_in_a_tab_that_is_already_open(live_server, page):
    token = live_server.admin_token
    page.goto(f"{live_server.url}/#token={token}")
    page.wait_for_selector("#page-fleet:not([hidden])")
    page.goto(f"{live_server.url}/#/audit&token={token}")  # same document: only the fragment changes
    page.wait_for_selector("#audit:not([hidden])")
    assert page.url.endswith("/#/audit")
    assert page.is_hidden("#error")


def test_an_unknown_device_page_says_so(live_server, page):
    page.goto(f"{live_server.url}/#/device/nobody-here&token={live_server.admin_token}")
    page.wait_for_selector("#error:not([hidden])")
    assert "404" in page.inner_text("#error")


def test_alerts_page_shows_a_device_raised_alert_and_an_operator_acknowledges_it(live_server, page):
    (dev,) = _devices(live_server, {"hot-1": dict(hardware_class="rpi4")})
    try:
        dev.event("alert.overheat", "CPU at 92 °C", severity="warning", detail={"temperature_c": 92})
        token = live_server.admin_token
        wait_until(lambda: http_json("GET", f"{live_server.url}/api/v1/alerts?status=firing", token=token), 15,
                   what="the device-raised alert")
        sign_in(page, live_server, "#/alerts")
        row = page.wait_for_selector("tr.alert-status-firing:has-text('CPU at 92')")
        assert "alert.overheat" in row.inner_text() and "hot-1" in row.inner_text()
        assert page.inner_text("#nav-alerts") == "1"
        row.query_selector("button.ack").click()  # a POST with the session cookie and the CSRF header
        page.wait_for_selector("tr.alert-status-acknowledged:has-text('CPU at 92')")
        alerts = http_json("GET", f"{live_server.url}/api/v1/alerts", token=token)
        assert [a["status"] for a in alerts if a["device_id"] == "hot-1"] == ["acknowledged"]
        assert "by user:admin" in page.inner_text("tr.alert-status-acknowledged")
        page.click("tr.alert-status-acknowledged button.resolve")
        page.wait_for_selector("#alerts-body tr.empty")  # gone from "firing and acknowledged"
        assert page.is_hidden("#nav-alerts")
        page.select_option("#alerts-status", "resolved")
        page.wait_for_selector("tr.alert-status-resolved:has-text('CPU at 92')")
    finally:
        dev.close()
