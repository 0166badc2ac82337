"""On-device adaptation through the real agent: window, AdaBN/CORAL, golden gate, sealed delta, restart, local API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgewise.protocol.codec import decode
from test_agent_support import make_agent
from test_data_adapt_support import SHIFTS, bn_bundle, train_bn_cnn


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, signer):
    onnx_bytes, raw = train_bn_cnn()
    path = bn_bundle(tmp_path_factory.mktemp("adapt") / "digits-cnn-2.0.0.ewb", onnx_bytes, raw, signer)
    return path, raw


def _accuracy(agent, x: np.ndarray, y: np.ndarray) -> float:
    return float((agent.predict(x)["logits"].argmax(1) == y).mean())


def _events(agent, kind: str = "adaptation") -> list:
    return [m for m in (decode(r.payload) for r in agent.outbox.peek(1000)) if getattr(m, "kind", None) == kind]


def _serve(agent, x: np.ndarray, batch: int = 16) -> None:
    for i in range(0, len(x), batch):
        agent.predict(x[i : i + batch])


def test_adapting_to_a_gain_shift_commits_a_delta_and_improves_held_out_accuracy(tmp_path, keys_dir, cnn):
    path, raw = cnn
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="adapt-gain")
    try:
        assert agent.install(path).result == "ok"
        x = SHIFTS["gain"](raw["x_test"])
        held_out, y = x[256:], raw["y_test"][256:]
        _serve(agent, x[:256])
        before = _accuracy(agent, held_out, y)
        result = agent.adapt()
        after = _accuracy(agent, held_out, y)
        assert result.result == "ok", result.reason
        assert result.method == "adabn" and result.samples == 256
        assert after > before + 0.2, (before, after)
        assert result.after["golden_shifted"] >= result.before["golden_shifted"]
        assert (agent.state_dir / "adapt" / "committed.ewa").exists()
        assert agent.current_model.sha256 == agent.slots.record().sha256  # still the signed base bundle's identity
        (event,) = _events(agent)
        assert event.detail["result"] == "ok" and event.detail["before"] and event.detail["after"]
    finally:
        agent.stop()


def test_an_adaptation_worse_on_the_golden_inputs_is_rolled_back_and_the_model_keeps_serving(tmp_path, keys_dir, cnn):
    from edgewise.data.adapt import adabn

    path, raw = cnn
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="adapt-bad")
    try:
        assert agent.install(path).result == "ok"
        x = raw["x_test"][:128]
        _serve(agent, x)
        good = adabn(_model_bytes(agent), {"x": x / 16.0})
        bad = _scramble_means(good)
        live = agent.current_model
        expected = agent.predict(x[:8])["logits"]
        result = agent.adapt(adaptation=bad)
        assert result.result == "rolled_back", result.reason
        assert "worse on the golden inputs" in result.reason or "below the floor" in result.reason
        assert agent.current_model is live
        np.testing.assert_array_equal(agent.predict(x[:8])["logits"], expected)
        assert not (agent.state_dir / "adapt" / "committed.ewa").exists()
        assert not (agent.state_dir / "adapt" / "trial.ewa").exists()
        (event,) = _events(agent)
        assert event.severity == "warning" and event.detail["result"] == "rolled_back"
    finally:
        agent.stop()


def _model_bytes(agent) -> bytes:
    from edgewise.bundle import verify_bundle

    return verify_bundle(agent.slots.bundle(agent.slots.record().slot), agent.updater.trusted()).read_model()


def _scramble_means(good):
    """The same BatchNorm initializers (means and variances) moved far off: an adaptation that breaks the model."""
    from edgewise.data.adapt import Adaptation

    inits = {k: (np.abs(v) * 25.0 + 5.0).astype(v.dtype) for k, v in good.initializers.items()}
    return Adaptation(good.method, inits, good.samples, good.detail)


def test_a_committed_adaptation_is_reapplied_at_start_and_a_tampered_one_is_dropped(tmp_path, keys_dir, cnn):
    path, raw = cnn
    state = tmp_path / "dev"
    x = SHIFTS["contrast"](raw["x_test"])
    agent = make_agent(state, keys_dir, device_id="adapt-restart")
    try:
        assert agent.install(path).result == "ok"
        _serve(agent, x[:256])
        assert agent.adapt().result == "ok"
        adapted = agent.predict(x[256:300])["logits"]
    finally:
        agent.stop()
    agent = make_agent(state, keys_dir, device_id="adapt-restart")
    try:
        agent.start()
        np.testing.assert_allclose(agent.predict(x[256:300])["logits"], adapted, rtol=1e-5, atol=1e-5)
        assert agent.adapter.active["method"] == "adabn"
        assert agent.health()["adaptation"]["method"] == "adabn"
    finally:
        agent.stop()
    delta = state / "adapt" / "committed.ewa"
    blob = bytearray(delta.read_bytes())
    blob[-20] ^= 0x01
    delta.write_bytes(bytes(blob))
    agent = make_agent(state, keys_dir, device_id="adapt-restart")
    try:
        agent.start()
        assert agent.adapter.active is None
        assert not delta.exists()
        assert not np.allclose(agent.predict(x[256:300])["logits"], adapted, atol=1e-3)  # the signed model serves
        assert any(e.severity == "warning" and "dropped" in e.message for e in _events(agent))
    finally:
        agent.stop()


def test_a_delta_sealed_for_another_device_does_not_open(tmp_path, keys_dir, cnn):
    path, raw = cnn
    x = SHIFTS["gain"](raw["x_test"])
    one = make_agent(tmp_path / "one", keys_dir, device_id="adapt-one")
    try:
        one.install(path)
        _serve(one, x[:128])
        assert one.adapt().result == "ok"
    finally:
        one.stop()
    two = make_agent(tmp_path / "two", keys_dir, device_id="adapt-two")
    try:
        two.install(path)
        (two.state_dir / "adapt").mkdir(parents=True, exist_ok=True)
        (two.state_dir / "adapt" / "committed.ewa").write_bytes((tmp_path / "one" / "adapt" / "committed.ewa").read_bytes())
    finally:
        two.stop()
    two = make_agent(tmp_path / "two", keys_dir, device_id="adapt-two")
    try:
        two.start()
        assert two.adapter.active is None
        assert not (two.state_dir / "adapt" / "committed.ewa").exists()
    finally:
        two.stop()


def test_coral_adapts_a_model_without_batchnorm_on_the_device(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="adapt-coral")
    try:
        assert agent.install(bundles["1.1.0"]).result == "ok"  # skl2onnx MLP, no BatchNorm, 16 golden samples
        x = ((digits_data.x_test - 8.0) * 0.3 + 8.0).astype(np.float32)
        y = digits_data.y_test

        def acc() -> float:
            out = agent.predict(x[256:])
            probs = next(v for v in out.values() if v.ndim == 2)
            return float((probs.argmax(1) == y[256:]).mean())

        _serve(agent, x[:256])
        before = acc()
        result = agent.adapt()
        assert result.result == "ok", result.reason
        assert result.method == "coral-input"
        assert acc() > before + 0.2
    finally:
        agent.stop()


def test_post_v1_adapt_says_why_with_too_few_samples_then_adapts(tmp_path, keys_dir, cnn):
    path, raw = cnn
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="adapt-api")
    try:
        agent.install(path)
        agent.start()
        url = f"http://127.0.0.1:{agent.api_port}/v1/adapt"

        def post(body: bytes) -> tuple[int, dict]:
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, body = post(b"")
        assert status == 409 and "serve more predictions" in body["reason"]
        status, body = post(b'{"method": "magic"}')
        assert status == 400 and "adabn" in body["error"]
        _serve(agent, SHIFTS["offset"](raw["x_test"])[:128])
        status, body = post(b'{"method": "adabn"}')
        assert status == 200 and body["result"] == "ok" and body["trigger"] == "api"
    finally:
        agent.stop()


def test_request_adaptation_runs_in_the_background_once_per_cooldown(tmp_path, keys_dir, cnn):
    path, raw = cnn
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="adapt-drift")
    try:
        agent.install(path)
        _serve(agent, SHIFTS["gain"](raw["x_test"])[:128])
        assert agent.request_adaptation("drift") is True
        assert agent.request_adaptation("drift") is False  # cooldown
        agent._adapt_thread.join(30)
        (event,) = _events(agent)
        assert event.detail["trigger"] == "drift" and event.detail["result"] == "ok"
    finally:
        agent.stop()
