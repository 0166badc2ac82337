"""The local HTTP API: predict, health, metrics, and clear errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from test_agent_support import make_agent


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode()), ctype


@pytest.fixture(scope="module")
def served(tmp_path_factory, keys_dir, bundles):
    agent = make_agent(tmp_path_factory.mktemp("api") / "dev", keys_dir, device_id="api-1")
    assert agent.install(bundles["1.0.0"]).result == "ok"
    agent.start()
    yield agent
    agent.stop()


def test_http_predict_returns_the_models_outputs_and_version(served, digits_data):
    x = digits_data.x_test[:3]
    status, body, _ = call(served.api_port, "POST", "/v1/predict", json.dumps({"inputs": {"x": x.tolist()}}).encode())
    assert status == 200
    assert (body["model"], body["version"]) == ("digits", "1.0.0")
    direct = served.predict(x)
    assert body["outputs"]["label"] == direct["label"].tolist()
    np.testing.assert_allclose(body["outputs"]["probabilities"], direct["probabilities"], rtol=1e-6)
    assert body["latency_ms"] >= 0


def test_http_predict_accepts_a_bare_input_mapping_and_integer_pixels(served):
    status, body, _ = call(served.api_port, "POST", "/v1/predict", json.dumps({"x": [[0] * 64]}).encode())
    assert status == 200 and len(body["outputs"]["label"]) == 1


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"inputs": {"x": [[0.0] * 63]}}).encode(), "'x': expected shape [?, 64], got [1, 63]"),
        (json.dumps({"inputs": {"x": [["a"] * 64]}}).encode(), "'x': expected numbers for dtype float32, got strings"),
        (json.dumps({"inputs": {"x": [[0.0] * 64, [0.0]]}}).encode(), "'x'"),
        (json.dumps({"inputs": {"y": [[0.0] * 64]}}).encode(), "missing input(s) ['x']"),
    ],
    ids=["bad-json", "not-object", "wrong-shape", "wrong-dtype", "ragged", "wrong-name"],
)
def test_http_predict_bad_input_is_a_400_naming_the_problem(served, body, needle):
    errors = served.monitor.errors
    status, reply, _ = call(served.api_port, "POST", "/v1/predict", body)
    assert status == 400
    assert needle in reply["error"]
    assert served.monitor.errors == errors + 1
    ok, _, _ = call(served.api_port, "POST", "/v1/predict", json.dumps({"x": [[1.0] * 64]}).encode())
    assert ok == 200  # and it keeps serving


def test_http_predict_without_a_model_is_a_503(tmp_path, keys_dir):
    agent = make_agent(tmp_path / "empty", keys_dir, device_id="api-2")
    agent.start()
    try:
        status, body, _ = call(agent.api_port, "POST", "/v1/predict", json.dumps({"x": [[0.0] * 64]}).encode())
        assert status == 503 and "no model installed" in body["error"]
        assert call(agent.api_port, "GET", "/v1/health")[1]["status"] == "degraded"
    finally:
        agent.stop()


def test_health_reports_device_model_counters_and_outbox(served):
    status, body, _ = call(served.api_port, "GET", "/v1/health")
    assert status == 200
    assert {"status", "device_id", "model", "version", "connected", "outbox_pending", "seq_issued", "inferences", "errors", "uptime_s"} <= set(body)
    assert (body["device_id"], body["model"], body["version"], body["connected"]) == ("api-1", "digits", "1.0.0", False)
    assert body["seq_issued"] >= 2  # the install and start events


def test_metrics_are_prometheus_text_with_edgewise_agent_names(served):
    from prometheus_client.parser import text_string_to_metric_families

    served.predict(np.zeros((1, 64), np.float32))
    status, text, ctype = call(served.api_port, "GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["edgewise_agent_inferences"].samples[0].value >= 1
    assert "edgewise_agent_latency_seconds" in families
    info = families["edgewise_agent_model_info"].samples[0].labels
    assert info == {"model": "digits", "version": "1.0.0"}
    assert all(name.startswith("edgewise_agent_") for name in families)


def test_two_agents_in_one_process_have_separate_registries(served, tmp_path, keys_dir):
    other = make_agent(tmp_path / "other", keys_dir, device_id="api-3")
    try:
        assert other.monitor.registry is not served.monitor.registry
        assert other.monitor.registry.get_sample_value("edgewise_agent_inferences_total") == 0
    finally:
        other.stop()


def test_the_bound_port_is_written_to_the_state_dir(served):
    assert (served.state_dir / "api.port").read_text().strip() == str(served.api_port)
    assert served.api_port > 0


def test_unknown_routes_are_404_with_a_hint(served):
    status, body, _ = call(served.api_port, "GET", "/nope")
    assert status == 404 and "/v1/predict" in body["error"]
