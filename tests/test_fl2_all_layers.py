"""All-layer local training of an MLP tail in numpy (issue 8 FL2, recipe ``layers = "all"``): the chain found in a real
ONNX model, exact gradients, and a real agent training every layer from a task and queuing a signed delta of them."""

from __future__ import annotations

import doctest
import uuid

import numpy as np
import pytest

from edgewise.learn import mlp as mlp_module
from edgewise.learn.local import Recipe
from edgewise.learn.mlp import ChainError, DenseLayer, chain_weights, forward, mlp_chain, train_mlp
from edgewise.protocol import Command, decode
from edgewise.protocol.messages import FLTask, FLUpdate, SampleArray
from test_agent_support import make_agent


def test_the_module_examples_run():
    assert doctest.testmod(mlp_module).failed == 0


def test_the_chain_of_the_demo_mlp_is_both_dense_layers_from_the_input_and_numpy_matches_onnx_runtime(digits_models, digits_data):
    import onnxruntime as ort

    from edgewise.lab.demo_model import PREPROCESSING

    model = digits_models["mlp"]
    chain = mlp_chain(model)
    assert [(l.weight, l.bias, l.relu) for l in chain] == [("coefficient", "intercepts", True), ("coefficient1", "intercepts1", False)]
    x = PREPROCESSING.apply(digits_data.x_test[:50]).astype(np.float32)
    probs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["probabilities"], {"x": x})[0]
    logits = forward(chain, chain_weights(model, chain), x)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert p / p.sum(axis=1, keepdims=True) == pytest.approx(probs, abs=1e-5)


def test_a_model_without_a_dense_head_is_refused_naming_why(digits_models):
    with pytest.raises(ChainError, match="no linear layer"):
        mlp_chain(digits_models["logreg"])  # skl2onnx's LinearClassifier


def test_one_full_batch_sgd_step_follows_the_exact_gradient_of_the_cross_entropy():
    rng = np.random.default_rng(3)
    chain = [DenseLayer("a", "x", "W1", "b1", True, True), DenseLayer("b", "h", "W2", "b2", False, False)]  # W1 stored transposed
    w = {"W1": rng.normal(0, 0.7, (6, 5)), "b1": rng.normal(0, 0.1, 6), "W2": rng.normal(0, 0.7, (6, 3)), "b2": rng.normal(0, 0.1, (1, 3))}
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)

    def loss(weights):
        z = forward(chain, weights, x)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(20), y] - np.log(np.exp(z).sum(axis=1))).mean())

    lr = 1e-3
    new, _ = train_mlp(chain, w, x, y, Recipe(epochs=1, batch_size=20, lr=lr, layers="all"), rng)
    for name, arr in w.items():
        analytic = (arr - new[name]) / lr
        numeric = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            up, down = {**w, name: arr.copy()}, {**w, name: arr.copy()}
            up[name][i] += 1e-6
            down[name][i] -= 1e-6
            numeric[i] = (loss(up) - loss(down)) / 2e-6
        assert analytic == pytest.approx(numeric, abs=1e-6), name


def test_fedprox_keeps_every_layer_closer_to_the_global_model():
    rng = np.random.default_rng(0)
    chain = [DenseLayer("a", "x", "W1", "b1", False, True), DenseLayer("b", "h", "W2", "b2", False, False)]
    w = {"W1": rng.normal(0, 0.5, (4, 8)), "b1": np.zeros(8), "W2": rng.normal(0, 0.5, (8, 3)), "b2": np.zeros(3)}
    x, y = rng.normal(size=(64, 4)), rng.integers(0, 3, 64)
    free, _ = train_mlp(chain, w, x, y, Recipe(epochs=20, batch_size=16, lr=0.2, layers="all"), np.random.default_rng(1))
    prox, _ = train_mlp(chain, w, x, y, Recipe(epochs=20, batch_size=16, lr=0.2, mu=1.0, layers="all"), np.random.default_rng(1))
    for name in w:
        assert np.linalg.norm(prox[name] - w[name]) < np.linalg.norm(free[name] - w[name])


# -- a real agent ----------------------------------------------------------------------------------------


@pytest.fixture()
def agent(tmp_path, keys_dir, bundles):
    a = make_agent(tmp_path / "dev", keys_dir, device_id=f"fla-{uuid.uuid4().hex[:6]}", capture=True, capture_destination="local",
                   capture_random_fraction=1.0, capture_low_confidence=0.0, capture_drift_window=0, capture_seed=0)
    assert a.install(bundles["1.1.0"]).result == "ok"
    yield a
    a.stop()


def _task(tensors, **kw):
    args = dict(job_id="fl-all", round=1, model="digits", version="1.1.0", base_version=0, min_confidence=0.5, min_samples=8,
                tensors=[SampleArray.of(k, v) for k, v in tensors.items()], deadline=0.0, seed=0,
                recipe={"epochs": 3, "batch_size": 16, "lr": 0.05, "layers": "all"})
    args.update(kw)
    return FLTask(**args)


def _run(agent, task):
    agent._run_command(Command(device_id=agent.device_id, id=uuid.uuid4().hex[:8], name="fl.train", args=task.model_dump(mode="json")))
    msgs = [decode(r.payload) for r in agent.outbox.peek(1000)]
    return [m for m in msgs if getattr(m, "kind", None) == "command.result"][-1], [m for m in msgs if isinstance(m, FLUpdate)]


def _base(bundles, agent):
    from edgewise.bundle import verify_bundle

    model = verify_bundle(bundles["1.1.0"], agent.updater.trusted()).read_model()
    return model, chain_weights(model, mlp_chain(model))


def test_a_layers_all_task_trains_every_layer_of_the_mlp_and_the_delta_written_back_still_classifies(agent, bundles, digits_data):
    import onnxruntime as ort

    from edgewise.data.adapt._graph import Adaptation, apply_adaptation
    from edgewise.lab.demo_model import PREPROCESSING

    agent.predict(digits_data.x_train[:120])
    model, weights = _base(bundles, agent)
    result, (update,) = _run(agent, _task(weights))
    assert result.detail["result"] == "ok", result.detail
    delta = {t.name: t.array() for t in update.tensors}
    assert {k: (v.shape, v.dtype) for k, v in delta.items()} == {k: (v.shape, v.dtype) for k, v in weights.items()}
    assert all(np.abs(v).max() > 0 for v in delta.values())  # the hidden layer moved too, not only the head
    assert update.signature and update.num_samples >= 8
    # the control plane's path: base + delta written into the model by name; the result still runs and classifies
    trained = apply_adaptation(model, Adaptation("federated", {k: weights[k] + delta[k] for k in weights}, update.num_samples))
    x = PREPROCESSING.apply(digits_data.x_test).astype(np.float32)
    pred = ort.InferenceSession(trained, providers=["CPUExecutionProvider"]).run(["probabilities"], {"x": x})[0].argmax(axis=1)
    assert (pred == digits_data.y_test).mean() > 0.9


def test_a_layers_all_task_carrying_only_the_head_is_refused_naming_the_chain(agent, bundles, digits_data):
    agent.predict(digits_data.x_train[:20])
    _, weights = _base(bundles, agent)
    head_only = {k: v for k, v in weights.items() if k.endswith("1")}
    result, updates = _run(agent, _task(head_only))
    assert result.detail["result"] == "failed" and "dense chain" in result.detail["reason"] and "coefficient" in result.detail["reason"]
    assert not updates


def test_torch_and_numpy_trainers_give_the_same_update_with_fedprox():
    pytest.importorskip("torch")
    from edgewise.learn.mlp import train_mlp_torch

    rng = np.random.default_rng(4)
    chain = [DenseLayer("a", "x", "W1", "b1", True, True), DenseLayer("b", "h", "W2", "b2", False, False)]
    w = {"W1": rng.normal(0, 0.5, (8, 5)), "b1": np.zeros(8), "W2": rng.normal(0, 0.5, (8, 3)), "b2": np.zeros((1, 3))}
    x, y = rng.normal(size=(50, 5)), rng.integers(0, 3, 50)
    recipe = Recipe(epochs=3, batch_size=16, lr=0.1, mu=0.5, layers="all")
    by_numpy, loss_np = train_mlp(chain, w, x, y, recipe, np.random.default_rng(7))
    by_torch, loss_t = train_mlp_torch(chain, w, x, y, recipe, np.random.default_rng(7))
    for name in w:
        assert by_torch[name].shape == w[name].shape and by_torch[name] == pytest.approx(by_numpy[name], abs=1e-9), name
    assert loss_t == pytest.approx(loss_np, rel=1e-9)


@pytest.mark.parametrize("fl_torch, used", [("auto", "train_mlp_torch"), ("never", "train_mlp")])
def test_the_agent_trains_all_layers_with_torch_when_it_has_it_unless_told_never(tmp_path, keys_dir, bundles, digits_data,
                                                                                 monkeypatch, fl_torch, used):
    pytest.importorskip("torch")
    from edgewise.learn import mlp

    called = []
    for name in ("train_mlp", "train_mlp_torch"):
        real = getattr(mlp, name)
        monkeypatch.setattr(mlp, name, lambda *a, _real=real, _name=name, **k: (called.append(_name), _real(*a, **k))[1])
    a = make_agent(tmp_path / "dev", keys_dir, device_id=f"flt-{uuid.uuid4().hex[:6]}", capture=True, capture_destination="local",
                   capture_random_fraction=1.0, capture_low_confidence=0.0, capture_drift_window=0, capture_seed=0, fl_torch=fl_torch)
    try:
        assert a.install(bundles["1.1.0"]).result == "ok"
        a.predict(digits_data.x_train[:60])
        _, weights = _base(bundles, a)
        result, (update,) = _run(a, _task(weights, recipe={"epochs": 1, "batch_size": 16, "lr": 0.05, "layers": "all"}))
        assert result.detail["result"] == "ok" and called == [used]
    finally:
        a.stop()
