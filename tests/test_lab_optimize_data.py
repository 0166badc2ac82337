"""Calibration/eval .npz handling and automatic metric selection."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_lab_optimize_models import cnn, mlp, tiny_graph  # noqa: F401 - session fixtures

from edgewise.lab.optimize import DataError, MetricError, load_npz
from edgewise.lab.optimize.data import ModelIO, bind_inputs, check_labels
from edgewise.lab.optimize.metrics import choose_metric


def _io(path) -> ModelIO:  # type: ignore[no-untyped-def]
    return ModelIO.from_session(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))


def test_npz_with_x_key_and_labels(tmp_path, cnn):  # noqa: F811
    arrays, labels = load_npz(cnn.calib)
    assert list(arrays) == ["x"] and labels is None
    bound = bind_inputs(arrays, _io(cnn.model), what="calibration")
    assert list(bound) == ["image"] and bound["image"].dtype == np.float32

    arrays, labels = load_npz(cnn.eval)
    assert list(arrays) == ["image"] and labels is not None and len(labels) == len(arrays["image"])


def test_npz_float64_is_cast_and_labels_checked(tmp_path, mlp):  # noqa: F811
    np.savez(tmp_path / "e.npz", x=np.zeros((5, 64)), y=np.array([1.0, 2, 3, 4, 5]))
    arrays, labels = load_npz(tmp_path / "e.npz")
    assert bind_inputs(arrays, _io(mlp.model))["x"].dtype == np.float32
    assert check_labels(labels, 5).dtype == np.int64
    with pytest.raises(DataError, match=r"one class label per sample"):
        check_labels(np.arange(4), 5)
    with pytest.raises(DataError, match="not class indices"):
        check_labels(np.array([0.5, 1, 2, 3, 4]), 5)


def test_wrong_key_or_shape_is_a_clear_error(tmp_path, cnn):  # noqa: F811
    io = _io(cnn.model)
    with pytest.raises(DataError, match=r"do not match the model's inputs \['image'\].*or 'x'"):
        bind_inputs({"pixels": np.zeros((2, 1, 16, 16), np.float32)}, io, what="eval")
    with pytest.raises(DataError, match=r"expects rank 4"):
        bind_inputs({"x": np.zeros((2, 256), np.float32)}, io)
    with pytest.raises(DataError, match=r"axis 2 is 8, should be 16"):
        bind_inputs({"image": np.zeros((2, 1, 8, 16), np.float32)}, io)
    np.savez(tmp_path / "only_y.npz", y=np.arange(3))
    with pytest.raises(DataError, match="no input arrays"):
        load_npz(tmp_path / "only_y.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")


def test_metric_auto_selection(cnn, mlp):  # noqa: F811
    def pick(path, labels, override=None):  # type: ignore[no-untyped-def]
        return choose_metric(_io(path), has_labels=labels, override=override, model_path=path)[0].name

    assert pick(cnn.model, True) == "accuracy"
    assert pick(cnn.model, False) == "top1_agreement"  # output named "logits"
    assert pick(mlp.model, False) == "top1_agreement"  # integer label output
    assert pick(tiny_graph("classifier"), False) == "top1_agreement"  # Softmax producer, neutral name
    assert pick(tiny_graph("embedding"), False) == "cosine"  # LpNormalization producer
    assert pick(tiny_graph("regressor", "features"), False) == "cosine"  # embedding-like name
    assert pick(tiny_graph("regressor"), False) == "max_abs_err"
    assert pick(cnn.model, True, "max_abs_err") == "max_abs_err"
    with pytest.raises(MetricError, match="needs labels"):
        pick(cnn.model, False, "accuracy")
    with pytest.raises(MetricError, match="unknown metric"):
        pick(cnn.model, True, "f1")


def test_metric_scores_use_the_right_output(mlp):  # noqa: F811
    io = _io(mlp.model)
    m, _ = choose_metric(io, has_labels=True, model_path=mlp.model)
    label = np.array([3, 1, 2])
    probs = np.eye(10, dtype=np.float32)[[0, 1, 2]]  # argmax disagrees with the label output on purpose
    assert m.score([label, probs], [label, probs], np.array([3, 1, 0])) == pytest.approx(2 / 3)  # reads "label"
