"""Fixture models for the `edgewise optimize` tests, built once per test process, and checks on them.

- a small CNN on scikit-learn's bundled digits, upsampled to 16x16, trained for a few
  seconds with torch and exported with the TorchScript exporter (``dynamo=False``: the
  dynamo exporter needs onnxscript, which the lab does not install);
- the skl2onnx digits MLP from ``edgewise.lab.demo_model``;
- tiny hand-built graphs (softmax classifier, embedding, regressor) for metric selection.

Other ``test_lab_optimize_*`` modules import the builders from here.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="edgewise-optimize-fixtures-"))


@dataclass(frozen=True)
class Fixture:
    model: Path
    calib: Path  # .npz keyed "x"
    eval: Path  # .npz keyed by the input name, with labels "y"
    input_name: str
    n_classes: int = 10


def _digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy((x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy(), y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def digits_cnn(size: int = 16, width: int = 16, epochs: int = 5) -> Fixture:
    """Conv-BN-ReLU-Pool x2 + MLP head; ~95 % test accuracy after a few seconds on 2 cores."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)  # robust when other processes share the two cores (OpenMP spin-waits)
    x, y = _digits_images(size)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(train))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    d = _ROOT / f"cnn{size}x{width}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "cnn.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter says it is legacy
        torch.onnx.export(
            model, xt[:1], str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False, opset_version=17,
        )
    np.savez(d / "calib.npz", x=x[train[:256]])
    np.savez(d / "eval.npz", image=x[test], y=y[test])
    return Fixture(path, d / "calib.npz", d / "eval.npz", "image")


@functools.lru_cache(maxsize=None)
def digits_mlp() -> Fixture:
    from edgewise.lab.demo_model import PREPROCESSING, load_digits_split, train_digits_onnx

    data = load_digits_split()
    d = _ROOT / "mlp"
    d.mkdir(parents=True, exist_ok=True)
    (d / "mlp.onnx").write_bytes(train_digits_onnx("mlp", data))
    np.savez(d / "calib.npz", x=PREPROCESSING.apply(data.x_train[:256]))
    np.savez(d / "eval.npz", x=PREPROCESSING.apply(data.x_test), y=data.y_test)
    return Fixture(d / "mlp.onnx", d / "calib.npz", d / "eval.npz", "x")


def tiny_graph(kind: str, out_name: str | None = None) -> Path:
    """A one-layer graph: ``classifier`` (Gemm+Softmax), ``embedding`` (Gemm+LpNormalization) or ``regressor`` (Gemm)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(6, np.float32), "b")
    name = out_name or {"classifier": "out", "embedding": "out", "regressor": "out"}[kind]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h" if kind != "regressor" else name], name="gemm")]
    if kind == "classifier":
        nodes.append(helper.make_node("Softmax", ["h"], [name], name="softmax", axis=-1))
    elif kind == "embedding":
        nodes.append(helper.make_node("LpNormalization", ["h"], [name], name="norm", axis=-1, p=2))
    g = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 6])], [w, b],
    )
    path = _ROOT / f"tiny-{kind}-{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def invoke_optimize(args: list[str]):  # type: ignore[no-untyped-def]
    """Run `edgewise optimize ARGS` in-process (the command as cli/main.py registers it); a click Result."""
    import typer
    from typer.testing import CliRunner

    from edgewise.cli.main import app as main_app
    from edgewise.cli.optimize_cmd import optimize as command

    if any(c.name == "optimize" for c in main_app.registered_commands):
        return CliRunner().invoke(main_app, ["optimize", *args])
    app = typer.Typer(pretty_exceptions_enable=False)  # not registered yet: the same function, its own app
    app.command("optimize")(command)
    app.command("version")(lambda: None)  # two commands, so typer keeps the subcommand name
    return CliRunner().invoke(app, ["optimize", *args])


@pytest.fixture(scope="session")
def cnn() -> Fixture:
    return digits_cnn()


@pytest.fixture(scope="session")
def mlp() -> Fixture:
    return digits_mlp()


def test_cnn_fixture_exports_a_dynamic_batch_classifier(cnn):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(cnn.model), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    with np.load(cnn.eval) as f:
        x, y = f["image"], f["y"]
    logits = sess.run(None, {"image": x})[0]
    assert logits.shape == (len(x), 10)
    assert np.mean(logits.argmax(1) == y) > 0.85


def test_mlp_fixture_has_label_and_probability_outputs(mlp):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(mlp.model), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
