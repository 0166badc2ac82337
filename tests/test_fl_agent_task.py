"""The device's side of a round (agent.fl) without a control plane: what it trains on, what it refuses, what it sends."""

from __future__ import annotations

import base64
import uuid

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.agent.outbox import drain_once
from edgewise.protocol import Command, decode
from edgewise.protocol.messages import FLTask, FLUpdate, SampleArray
from test_agent_support import make_agent


@pytest.fixture()
def agent(tmp_path, keys_dir, bundles):
    a = make_agent(tmp_path / "dev", keys_dir, device_id=f"flt-{uuid.uuid4().hex[:6]}", capture=True, capture_destination="local",
                   capture_random_fraction=1.0, capture_low_confidence=0.0, capture_drift_window=0, capture_seed=0)
    assert a.install(bundles["1.1.0"]).result == "ok"
    yield a
    a.stop()


def _base_head(bundles, trusted):
    from edgewise.bundle import verify_bundle
    from edgewise.data.adapt._graph import initializer_array, load_model
    from edgewise.data.adapt.coral import linear_layer

    vb = verify_bundle(bundles["1.1.0"], trusted)
    proto = load_model(vb.read_model())
    layer = linear_layer(proto, "features")
    return {n: initializer_array(proto, n) for n in (layer.weight, layer.bias)}


def _run(agent, bundles, **kw):
    head = _base_head(bundles, agent.updater.trusted())
    args = dict(job_id="fl-t", round=1, model="digits", version="1.1.0", base_version=0, min_confidence=0.5, min_samples=8,
                tensors=[SampleArray.of(k, v) for k, v in head.items()], deadline=0.0, seed=0)
    args.update(kw)
    agent._run_command(Command(device_id=agent.device_id, id=uuid.uuid4().hex[:8], name="fl.train",
                               args=FLTask(**args).model_dump(mode="json")))
    msgs = [decode(r.payload) for r in agent.outbox.peek(1000)]
    result = [m for m in msgs if getattr(m, "kind", None) == "command.result"][-1]
    return result, [m for m in msgs if isinstance(m, FLUpdate)], head


def test_a_task_trains_the_head_on_confident_local_samples_and_queues_a_signed_delta_of_the_head_shape(agent, bundles, digits_data):
    agent.predict(digits_data.x_train[:40])
    result, (update,), head = _run(agent, bundles)
    assert result.detail["result"] == "ok" and update.num_samples == result.detail["num_samples"] >= 8
    delta = {t.name: t.array() for t in update.tensors}
    assert {k: v.shape for k, v in delta.items()} == {k: v.shape for k, v in head.items()}
    assert all(np.isfinite(v).all() for v in delta.values()) and any(np.abs(v).max() > 0 for v in delta.values())
    key = serialization.load_pem_public_key(update.public_key.encode())
    key.verify(base64.b64decode(update.signature), update.signed_bytes(), ec.ECDSA(hashes.SHA256()))  # raises if wrong
    assert update.job_id == "fl-t" and update.round == 1 and update.labels == "pseudo"
    assert agent.capture.sink.count() == 40  # the samples stay on the device


def test_the_update_leaves_the_outbox_on_the_fl_telemetry_topic(agent, bundles, digits_data):
    agent.predict(digits_data.x_train[:20])
    _run(agent, bundles)
    sent = []
    drain_once(agent.outbox, agent.device_id, lambda topic, payload: sent.append((topic, decode(payload))) or True)
    fl = [(t, m) for t, m in sent if t.endswith("/telemetry/fl")]
    assert len(fl) == 1 and isinstance(fl[0][1].items[0], FLUpdate)


def test_a_task_for_another_version_or_with_too_few_confident_samples_is_refused_with_the_reason(agent, bundles, digits_data):
    result, updates, _ = _run(agent, bundles, version="9.9.9")
    assert result.detail["result"] == "failed" and "runs digits 1.1.0" in result.detail["reason"] and not updates
    agent.predict(digits_data.x_train[:3])
    result, updates, _ = _run(agent, bundles)
    assert result.detail["result"] == "failed" and "needs at least 8" in result.detail["reason"] and not updates


def test_a_task_whose_tensors_are_not_the_models_head_is_refused(agent, bundles, digits_data):
    agent.predict(digits_data.x_train[:20])
    result, updates, _ = _run(agent, bundles, tensors=[SampleArray.of("W", np.zeros((2, 2), np.float32))])
    assert result.detail["result"] == "failed" and "not this model's head" in result.detail["reason"] and not updates


def test_a_device_without_a_local_sample_store_refuses_and_says_how_to_configure_one(tmp_path, keys_dir, bundles):
    a = make_agent(tmp_path / "nocap", keys_dir, device_id="flt-nocap")
    try:
        assert a.install(bundles["1.1.0"]).result == "ok"
        result, updates, _ = _run(a, bundles)
        assert result.detail["result"] == "failed" and 'capture_destination = "local"' in result.detail["reason"]
    finally:
        a.stop()
