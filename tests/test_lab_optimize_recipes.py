"""Every recipe builds a model that ONNX Runtime loads and that answers with the right shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_lab_optimize_models import cnn  # noqa: F401 - session fixture

from edgewise.lab.optimize import RECIPES, load_npz, load_profile
from edgewise.lab.optimize.data import CalibrationSet, ModelIO, bind_inputs
from edgewise.lab.optimize.recipes import DEFAULT_RECIPES, Recipe, get_recipe


@pytest.fixture(scope="module")
def calib(cnn, tmp_path_factory):  # noqa: F811
    io = ModelIO.from_session(ort.InferenceSession(str(cnn.model), providers=["CPUExecutionProvider"]))
    inputs = bind_inputs(load_npz(cnn.calib)[0], io)
    return CalibrationSet(inputs, cache_dir=tmp_path_factory.mktemp("calib-cache"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_builds_a_runnable_variant(name, cnn, calib, tmp_path):  # noqa: F811
    recipe = get_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    profile = load_profile("x86-gateway")
    assert isinstance(recipe.params(profile), dict)
    out = recipe.build(cnn.model, calib, profile, tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = load_npz(cnn.eval)[0]["image"][:5]
    (logits,) = sess.run(None, {"image": x})
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    if name.startswith("int8-qdq"):
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    elif name.startswith("int8-qop"):
        assert "QLinearConv" in ops
    elif name == "int8-dynamic":
        assert "ConvInteger" in ops
    elif name == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(out)).graph.initializer)


def test_arm_profile_quantizes_activations_as_int8(cnn, calib, tmp_path):  # noqa: F811
    out = get_recipe("int8-qdq-minmax").build(cnn.model, calib, load_profile("rpi5"), tmp_path / "arm.onnx")
    zero_points = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert zero_points["image_zero_point"] == onnx.TensorProto.INT8  # S8S8: int8 activations on ARM
    out = get_recipe("int8-qdq-minmax").build(cnn.model, calib, load_profile("x86-gateway"), tmp_path / "x86.onnx")
    zero_points = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert zero_points["image_zero_point"] == onnx.TensorProto.UINT8  # U8S8 on x86


def test_mixed_precision_keeps_named_nodes_in_fp32(cnn, calib, tmp_path):  # noqa: F811
    from edgewise.lab.optimize.sensitivity import quantizable_nodes

    nodes = [n for n, op, _ in quantizable_nodes(cnn.model, "QDQ") if op == "Conv"]
    base = get_recipe("int8-qdq-minmax")
    out = base.with_fp32_nodes(nodes[:1]).build(cnn.model, calib, load_profile("x86-gateway"), tmp_path / "m.onnx")
    g = onnx.load(str(out)).graph
    kept = next(n for n in g.node if n.name == nodes[0])
    weights = {t.name: t for t in g.initializer}
    assert weights[kept.input[1]].data_type == onnx.TensorProto.FLOAT  # its weight stayed FP32


def test_default_candidates_and_unknown_recipe():
    assert DEFAULT_RECIPES[0] == "fp32" and set(DEFAULT_RECIPES) <= set(RECIPES)
    from edgewise.lab.optimize import OptimizeError

    with pytest.raises(OptimizeError, match="unknown recipe 'int4'"):
        get_recipe("int4")


def test_per_channel_static_int8_quantizes_fused_gemm_layers(tmp_path):
    """Regression: ORT 1.32's int32-bias scale adjustment raised on per-channel Gemm (fused MatMul+Add)."""
    import onnxruntime as ort

    from test_lab_optimize_models import digits_mlp

    mlp = digits_mlp()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(mlp.model), so, providers=["CPUExecutionProvider"])
    assert "Gemm" in {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    calib = CalibrationSet({"x": load_npz(mlp.calib)[0]["x"]})
    out = get_recipe("int8-qdq-minmax-pc").build(tmp_path / "fused.onnx", calib, load_profile("x86-gateway"), tmp_path / "pc.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": load_npz(mlp.eval)[0]["x"][:3]})[1].shape == (3, 10)
