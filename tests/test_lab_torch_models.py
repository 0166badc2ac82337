"""The lab's torch models and data: bundled data sets, the .ts parser, seeded training, checked ONNX export."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgewise.lab import datasets as ds  # noqa: E402
from edgewise.lab.export import export_onnx, measure_latency, onnx_accuracy, onnx_predict  # noqa: E402
from edgewise.lab.torch_models import (  # noqa: E402
    DigitsCNN,
    DigitsMLP,
    MotionCNN,
    accuracy,
    count_params,
    example_input,
    model_stats,
    predict_logits,
    train,
    width_scaled,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits32():
    return ds.load_digits_images()


@pytest.fixture(scope="module")
def trained_cnn(digits32):
    """The digits CNN on a short schedule (full train split, 4 epochs: about a second)."""
    torch.manual_seed(0)
    model = DigitsCNN()
    result = train(model, digits32, epochs=4, lr=3e-3, seed=0)
    return model, result


# --------------------------------------------------------------------------- data


def test_digits_images_are_upsampled_copies_of_the_feature_split(digits32):
    flat = ds.load_digits_features()
    assert digits32.x_train.shape == (len(flat.x_train), 1, 32, 32) and digits32.x_train.dtype == np.float32
    assert 0.0 <= digits32.x_train.min() and digits32.x_train.max() <= 1.0
    np.testing.assert_array_equal(digits32.y_test, flat.y_test)
    # Bilinear upsampling, the same as torch's (align_corners=False).
    ref = torch.nn.functional.interpolate(torch.from_numpy(flat.x_test[:20].reshape(-1, 1, 8, 8)), size=32, mode="bilinear")
    np.testing.assert_allclose(digits32.x_test[:20], ref.numpy(), atol=1e-6)
    assert digits32.num_classes == 10


TS = """# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true up down
@data
1,2,3:4,5,6:up
0.5,?,-1:7,8,9e-1:down
"""


def test_parse_ts_reads_dimensions_labels_and_missing_values(tmp_path):
    path = tmp_path / "Tiny_TRAIN.ts"
    path.write_text(TS)
    x, labels, header = ds.parse_ts(path)
    assert x.shape == (2, 2, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], [[1, 2, 3], [4, 5, 6]])
    assert np.isnan(x[1, 0, 1]) and x[1, 1, 2] == pytest.approx(0.9)
    assert list(labels) == ["up", "down"] and header["class_labels"] == ["up", "down"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (TS.replace("@timeStamps false", "@timeStamps true"), "time-stamped"),
        (TS.replace("1,2,3:4,5,6:up", "1,2:4,5,6:up"), "unequal length"),
        (TS.replace("@data\n", ""), "@header"),
        (TS.replace("@dimensions 2", "@dimensions 3"), "3 dimensions"),
    ],
)
def test_parse_ts_rejects_what_it_does_not_support(tmp_path, bad, message):
    path = tmp_path / "bad.ts"
    path.write_text(bad)
    with pytest.raises(ds.DataError, match=message):
        ds.parse_ts(path)


def test_basic_motions_names_the_package_when_absent(tmp_path):
    with pytest.raises(ds.DatasetNotAvailableError, match="pip install aeon"):
        ds.load_basic_motions(tmp_path)


def test_basic_motions_cnn_learns_the_four_activities():
    if ds.find_basic_motions() is None:
        pytest.skip("BasicMotions ships with aeon/sktime, neither installed (pip install aeon)")
    data = ds.load_basic_motions()
    assert data.x_train.shape == (40, 6, 100) and data.x_test.shape == (40, 6, 100)
    assert set(data.classes) == {"Standing", "Running", "Walking", "Badminton"}
    torch.manual_seed(0)
    model = MotionCNN()
    result = train(model, data, epochs=30, lr=3e-3, batch_size=16)
    assert result.test_accuracy >= 0.8


def test_npz_round_trip_and_clear_errors(tmp_path, digits32):
    small = digits32.subset(50, 20)
    back = ds.load_npz(small.save_npz(tmp_path / "d.npz"))
    np.testing.assert_array_equal(back.x_train, small.x_train)
    assert back.classes == small.classes and back.y_test.dtype == np.int64

    np.savez(tmp_path / "wrong.npz", X=small.x_train, y=small.y_train)
    with pytest.raises(ds.DataError, match="lacks x_train, y_train, x_test, y_test; it holds X, y"):
        ds.load_npz(tmp_path / "wrong.npz")
    np.savez(tmp_path / "short.npz", x_train=small.x_train, y_train=small.y_train[:-1], x_test=small.x_test, y_test=small.y_test)
    with pytest.raises(ds.DataError, match="y_train must have shape"):
        ds.load_npz(tmp_path / "short.npz")
    with pytest.raises(ds.DataError, match="no such file"):
        ds.load_npz(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- models and training


def test_digits_cnn_reaches_a_sane_accuracy_on_a_short_schedule(trained_cnn, digits32):
    model, result = trained_cnn
    assert result.test_accuracy > 0.9
    assert result.test_accuracy == pytest.approx(accuracy(model, digits32.x_test, digits32.y_test))
    assert len(result.history) == 4 and result.history[-1]["loss"] < result.history[0]["loss"]
    stats = model_stats(model, example_input(digits32))
    assert stats.params == count_params(model) and stats.macs > 2_000_000  # three conv blocks on 32x32


def test_training_is_deterministic_for_a_seed(digits32):
    small = digits32.subset(200, 50)
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        m = DigitsCNN(width=0.5)
        train(m, small, epochs=1, lr=3e-3, seed=7)
        weights.append([p.detach().clone() for p in m.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_width_scaled_student_is_smaller_and_checks_its_factory():
    teacher = DigitsCNN()
    student = width_scaled(DigitsCNN, 0.5)
    assert count_params(student) < count_params(teacher) / 2
    assert student.features[0].out_channels == 8
    assert count_params(width_scaled(DigitsMLP, 0.25)) < count_params(DigitsMLP())
    with pytest.raises(TypeError, match="no `width`"):
        width_scaled(lambda: DigitsCNN(), 0.5)
    with pytest.raises(ValueError):
        width_scaled(DigitsCNN, 0)


# --------------------------------------------------------------------------- export


def test_onnx_export_matches_torch_with_a_dynamic_batch(tmp_path, trained_cnn, digits32):
    import onnx

    model, _ = trained_cnn
    res = export_onnx(model, example_input(digits32, 2), tmp_path / "cnn.onnx")
    assert res.path.stat().st_size == res.size_bytes and res.max_abs_diff < 1e-4
    proto = onnx.load(str(res.path))
    assert [i.name for i in proto.graph.input] == ["x"] and proto.graph.output[0].name == "logits"
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = digits32.x_test[:37]  # a batch size it was not traced with
    np.testing.assert_allclose(onnx_predict(res.path, x), predict_logits(model, x).numpy(), rtol=1e-3, atol=1e-4)
    assert onnx_accuracy(res.path, digits32.x_test, digits32.y_test) == pytest.approx(
        accuracy(model, digits32.x_test, digits32.y_test), abs=2 / len(digits32.y_test)
    )
    lat = measure_latency(res.path, digits32.x_test[:1], runs=5, warmup=1)
    assert lat.batch == 1 and lat.p50_ms > 0


class _Noisy(torch.nn.Module):
    """Adds fresh noise on every call: torch and ONNX Runtime draw different numbers, so they cannot agree."""

    def forward(self, x):
        return x + torch.rand_like(x)


def test_an_export_that_does_not_reproduce_the_model_is_refused(tmp_path):
    from edgewise.lab.export import ExportMismatchError

    with pytest.raises(ExportMismatchError, match="differs from torch"):
        export_onnx(_Noisy(), torch.zeros(4, 8), tmp_path / "noisy.onnx")
    assert export_onnx(_Noisy(), torch.zeros(4, 8), tmp_path / "noisy.onnx", verify=False).max_abs_diff == 0.0


@pytest.mark.parametrize("factory, shape", [(DigitsMLP, (3, 64)), (MotionCNN, (3, 6, 100))])
def test_the_other_models_export_too(tmp_path, factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    res = export_onnx(model, x, tmp_path / "m.onnx", dynamic_batch=False)
    np.testing.assert_allclose(onnx_predict(res.path, x.numpy()), model(x).detach().numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["datasets", "export", "torch_models", "prune", "distill"])
def test_docstring_examples_run(name):
    module = importlib.import_module(f"edgewise.lab.{name}")
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
