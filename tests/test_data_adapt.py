"""AdaBN and CORAL on real ONNX models (numpy + onnx + ONNX Runtime), DANN in the lab."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.data.adapt import Adaptation, AdaptationError, adabn, apply_adaptation, batchnorm_nodes, coral, source_statistics
from test_data_adapt_support import SHIFTS, train_bn_cnn


@pytest.fixture(scope="module")
def bn_cnn():
    return train_bn_cnn()


def _accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return float((sess.run(None, {name: x.astype(np.float32)})[0].argmax(1) == y).mean())


@pytest.mark.parametrize("shift", ["gain", "contrast"])
def test_adabn_recovers_accuracy_on_held_out_shifted_digits(bn_cnn, shift):
    model, raw = bn_cnn
    x = SHIFTS[shift](raw["x_test"]) / 16.0  # the feed: after the bundle's scale step
    window, held_out, y = x[:200], x[200:], raw["y_test"][200:]
    adapted = apply_adaptation(model, adabn(model, {"x": window}))
    before, after = _accuracy(model, held_out, y), _accuracy(adapted, held_out, y)
    assert after > before + 0.2, (before, after)
    assert after > 0.85


def test_adabn_on_unshifted_data_keeps_accuracy(bn_cnn):
    model, raw = bn_cnn
    x, y = raw["x_test"] / 16.0, raw["y_test"]
    adapted = apply_adaptation(model, adabn(model, [{"x": x[i : i + 50]} for i in range(0, 200, 50)]))
    assert _accuracy(adapted, x[200:], y[200:]) >= _accuracy(model, x[200:], y[200:]) - 0.02


def test_adabn_updates_every_batchnorm_mean_and_variance_and_nothing_else(bn_cnn):
    model, raw = bn_cnn
    nodes = batchnorm_nodes(model)
    assert len(nodes) == 3
    ad = adabn(model, {"x": raw["x_test"][:64] / 16.0})
    assert set(ad.initializers) == {n.mean for n in nodes} | {n.var for n in nodes}
    assert ad.samples == 64 and ad.method == "adabn"


def test_adabn_refuses_a_model_without_batchnorm_and_names_coral(digits_models):
    with pytest.raises(AdaptationError, match="CORAL"):
        adabn(digits_models["mlp"], {"x": np.zeros((16, 64), np.float32)})


def test_adabn_refuses_a_window_with_nan_naming_the_input(bn_cnn):
    model, raw = bn_cnn
    x = raw["x_test"][:32] / 16.0
    x[3, 0, 0, 0] = np.nan
    with pytest.raises(AdaptationError, match="input 'x'.*NaN"):
        adabn(model, {"x": x})


def test_adabn_refuses_a_window_too_small_to_estimate(bn_cnn):
    model, raw = bn_cnn
    with pytest.raises(AdaptationError, match="holds 4 samples"):
        adabn(model, {"x": raw["x_test"][:4] / 16.0})


def test_coral_runs_on_a_model_without_batchnorm_and_undoes_a_contrast_shift(digits_models, digits_data):
    model = digits_models["mlp"]  # skl2onnx MLP: MatMul + Add, no BatchNorm
    assert batchnorm_nodes(model) == []
    x_src = (digits_data.x_train / 16.0).astype(np.float32)
    stats = source_statistics(model, {"x": x_src})
    x = ((digits_data.x_test / 16.0 - 0.5) * 0.3 + 0.5).astype(np.float32)
    y = digits_data.y_test
    ad = coral(model, {"x": x[:256]}, stats)
    adapted = apply_adaptation(model, ad)
    assert ad.method == "coral-input" and len(ad.initializers) == 2

    def acc(m: bytes) -> float:
        sess = ort.InferenceSession(m, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x[256:]})
        probs = next(o for o in out if getattr(o, "ndim", 0) == 2)
        return float((probs.argmax(1) == y[256:]).mean())

    assert acc(adapted) > acc(model) + 0.3, (acc(model), acc(adapted))


def test_coral_on_the_penultimate_features_folds_into_the_last_layer(digits_models, digits_data):
    model = digits_models["mlp"]
    stats = source_statistics(model, {"x": (digits_data.x_train / 16.0).astype(np.float32)}, where="features")
    ad = coral(model, {"x": (digits_data.x_test[:200] / 16.0).astype(np.float32)}, stats)
    assert ad.method == "coral-features"
    assert stats.layer == ad.detail["layer"]
    apply_adaptation(model, ad)  # applies: same names, shapes, dtypes


def test_an_adaptation_for_another_model_is_refused_by_name(bn_cnn, digits_models):
    model, raw = bn_cnn
    ad = adabn(model, {"x": raw["x_test"][:32] / 16.0})
    with pytest.raises(AdaptationError, match="made for another model"):
        apply_adaptation(digits_models["mlp"], ad)


def test_an_adaptation_round_trips_through_its_bytes(bn_cnn):
    model, raw = bn_cnn
    ad = adabn(model, {"x": raw["x_test"][:32] / 16.0})
    back = Adaptation.from_bytes(ad.to_bytes())
    assert back.method == ad.method and back.samples == ad.samples and back.detail == ad.detail
    assert all(np.array_equal(back.initializers[k], v) for k, v in ad.initializers.items())
    with pytest.raises(AdaptationError, match="not an adaptation"):
        Adaptation.from_bytes(b"garbage")


def test_dann_trains_on_unlabeled_target_samples_and_exports_with_batchnorm(one_torch_thread):
    from edgewise.lab.dann import DANN, export_keep_batchnorm, train_dann
    from edgewise.lab.datasets import load_digits_images

    data = load_digits_images(size=8).subset(300, 100)
    target = data.x_train * 0.4
    model = DANN.from_digits_cnn(width=0.5, size=8)
    result = train_dann(model, data, target, epochs=2, seed=0, target_eval=(data.x_test * 0.4, data.y_test))
    assert len(result.history) == 2 and result.target_accuracy is not None
    assert 0.0 <= result.domain_accuracy <= 1.0 and np.isfinite(result.class_loss)
    onnx_bytes = export_keep_batchnorm(model, data.x_test[:2])
    assert len(batchnorm_nodes(onnx_bytes)) == 3


def test_dann_refuses_target_samples_of_another_shape():
    from edgewise.lab.dann import DANN, train_dann
    from edgewise.lab.datasets import load_digits_images

    data = load_digits_images(size=8).subset(50, 20)
    with pytest.raises(ValueError, match="preprocessed like the source"):
        train_dann(DANN.from_digits_cnn(width=0.25, size=8), data, np.zeros((10, 64), np.float32), epochs=1)


def test_edgewise_dann_writes_an_onnx_model_from_an_unlabeled_target_npz(tmp_path, one_torch_thread):
    from typer.testing import CliRunner

    from edgewise.cli.main import app
    from edgewise.lab.datasets import load_digits_images

    data = load_digits_images(size=8)
    np.savez(tmp_path / "target.npz", samples=data.x_train[:200] * 0.4)
    res = CliRunner().invoke(app, ["dann", "--target", str(tmp_path / "target.npz"), "--out", str(tmp_path / "m.onnx"), "--epochs", "1"])
    assert res.exit_code == 1 and "--target-key" in res.output
    res = CliRunner().invoke(app, ["dann", "--target", str(tmp_path / "target.npz"), "--target-key", "samples",
                                   "--out", str(tmp_path / "m.onnx"), "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert len(batchnorm_nodes((tmp_path / "m.onnx").read_bytes())) == 3
