"""One implementation in the lab and on the device: fitted specs in real bundles, served by the agent.

Real digits models, real signed bundles, the real agent and its local HTTP API: bad input gets a 4xx
naming the problem, repaired input is served and the repairs are counted in the monitor's telemetry
fields and Prometheus metrics, and the lab produces the very arrays the agent feeds ONNX Runtime.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgewise.agent.monitor import Monitor
from edgewise.agent.runtime import InputError, LoadedModel
from edgewise.bundle import BundleError, build_bundle, verify_bundle
from edgewise.data import PreprocessingSpec
from edgewise.data.fit import fit_spec
from edgewise.protocol.messages import Summary, Telemetry
from test_agent_support import make_agent

ROBUST = {
    "features": [f"px{i}" for i in range(64)],
    "steps": [
        {"op": "check", "shape": [None, 64], "nonfinite": "allow", "max_abs": 1e6},
        {"op": "impute", "strategy": "median"},
        {"op": "clip", "quantiles": [0.0, 1.0]},
        {"op": "scale", "factor": 0.0625},
        {"op": "cast", "dtype": "float32"},
    ],
}


def call(port: int, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def robust_bundle(tmp_path_factory, digits_models, digits_data, signer):
    path = tmp_path_factory.mktemp("robust") / "digits-robust-2.0.0.ewb"
    manifest = build_bundle(
        digits_models["logreg"], name="digits-robust", version="2.0.0", signer=signer, out=path,
        preprocessing=ROBUST, fit_on=digits_data.x_train, golden=({"x": digits_data.x_test[:8]},),
    )
    return path, manifest


@pytest.fixture(scope="module")
def robust_model(robust_bundle, trusted):
    return LoadedModel.from_bundle(verify_bundle(robust_bundle[0], trusted), threads=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, keys_dir, robust_bundle):
    agent = make_agent(tmp_path_factory.mktemp("prep") / "dev", keys_dir, device_id="prep-robust-1")
    assert agent.install(robust_bundle[0]).result == "ok"
    agent.start()
    yield agent
    agent.stop()


def test_bundle_build_freezes_the_statistics_fitted_on_training_data(robust_bundle, digits_data):
    _, manifest = robust_bundle
    spec = manifest.preprocessing
    assert spec.fitted and spec.steps[1].fill is not None and len(spec.steps[1].fill) == 64
    assert spec.steps[1].fill[10] == pytest.approx(float(np.median(digits_data.x_train[:, 10])))
    assert spec.steps[2].high[10] == pytest.approx(float(digits_data.x_train[:, 10].max()))


def test_bundle_build_refuses_a_spec_whose_statistics_are_not_fitted(tmp_path, digits_models, signer):
    with pytest.raises(BundleError, match=r"steps \['1:impute', '2:clip'\] need statistics.*--fit-on"):
        build_bundle(digits_models["logreg"], name="d", version="1.0.0", signer=signer, out=tmp_path / "d.ewb", preprocessing=ROBUST)


def test_lab_and_agent_feed_the_model_identical_arrays_for_the_same_raw_input(robust_model, robust_bundle, digits_data):
    from edgewise.lab.datasets import DataSplit

    raw = digits_data.x_test[:20].copy()
    raw[0, 5] = np.nan
    raw[1, 9] = np.inf
    raw[2, 30] = 1e5  # an outlier: clipped to the training maximum
    spec = robust_bundle[1].preprocessing
    split = DataSplit(digits_data.x_train[:20], digits_data.y_train[:20], raw, digits_data.y_test[:20]).preprocessed(spec)
    for i in range(len(raw)):
        _, feed = robust_model.run(raw[i : i + 1])
        np.testing.assert_array_equal(feed["x"], split.x_test[i : i + 1])
    _, feed = robust_model.run(raw)
    assert feed["x"].dtype == np.float32
    np.testing.assert_array_equal(feed["x"], split.x_test)


def test_optimizer_preprocesses_calibration_and_eval_data_with_the_same_implementation(robust_model, digits_data):
    from edgewise.lab.optimize.data import ModelIO
    from edgewise.lab.optimize.optimizer import _preprocessed

    io = ModelIO.from_session(robust_model._session)
    raw = digits_data.x_test[:10].copy()
    raw[3, 3] = np.nan
    got = _preprocessed({"x": raw, "y": np.zeros(10)}, io, robust_model.manifest.preprocessing, "eval")
    np.testing.assert_array_equal(got["x"], robust_model.run(raw)[1]["x"])


def test_repairs_are_counted_per_step_and_feature_into_telemetry_and_prometheus(robust_model, digits_data):
    monitor = Monitor()
    robust_model.repair_sink = monitor.count_repairs
    try:
        x = digits_data.x_test[:2].copy()
        x[0, 5] = np.nan
        x[1, 5] = np.nan
        x[1, 40] = 1e5
        robust_model.predict(x)
        robust_model.predict(digits_data.x_test[:1])  # clean input: nothing counted
    finally:
        robust_model.repair_sink = None
    t = Telemetry(device_id="prep-tel-1", seq=0, ts=0.0, **monitor.sample())
    assert t.repairs == {"impute/px5": 2, "clip/px40": 1}
    assert Telemetry.model_validate_json(t.model_dump_json()).repairs == t.repairs
    s = Summary(device_id="prep-tel-1", seq=0, ts=0.0, **monitor.summary_sample())
    assert s.repairs == {"impute/px5": 2, "clip/px40": 1}
    assert Summary(device_id="prep-tel-1", seq=1, ts=0.0, **monitor.summary_sample()).repairs == {}  # per interval
    body, _ = monitor.exposition()
    assert b'edgewise_agent_input_repairs_total{field="px5",step="impute"} 2.0' in body


def test_telemetry_from_an_older_agent_without_repairs_still_parses():
    assert Telemetry.model_validate({"type": "telemetry", "device_id": "old", "seq": 1, "ts": 0.0}).repairs == {}


def test_http_predict_serves_repaired_input(served, digits_data):
    x = digits_data.x_test[:1].tolist()
    x[0][5] = float("nan")
    status, body = call(served.api_port, json.dumps({"inputs": {"x": x}}).encode())  # Python's json writes NaN
    assert status == 200, body
    fixed = digits_data.x_test[:1].copy()
    fixed[0, 5] = served.current_model.manifest.preprocessing.steps[1].fill[5]  # the training median of px5
    np.testing.assert_allclose(body["outputs"]["probabilities"], served.predict(fixed)["probabilities"], rtol=1e-6)


@pytest.mark.parametrize(
    "inputs, needle",
    [
        ([[0.0] * 63], "input 'x': check: expected shape [?, 64], got [1, 63]"),
        ([], "input 'x': check: expected shape [?, 64], got [0]"),
        (np.zeros((0, 64)).tolist(), "input 'x': check: expected shape [?, 64], got [0]"),
        ([[1e30] * 64], "feature 'px0' (index 0) has 1 value(s) beyond ±1e+06; the sensor looks broken"),
        ([["a"] * 64], "expected numbers"),
        ([[[0.0] * 64]], "expected shape [?, 64], got [1, 1, 64]"),
    ],
)
def test_http_predict_answers_bad_input_with_400_naming_the_problem(served, inputs, needle):
    status, body = call(served.api_port, {"inputs": {"x": inputs}})
    assert status == 400 and needle in body["error"], body
    status, health = 0, None
    with urllib.request.urlopen(f"http://127.0.0.1:{served.api_port}/v1/health", timeout=5) as resp:
        status, health = resp.status, json.loads(resp.read())
    assert status == 200 and health["status"] != "crashed"


def test_python_api_accepts_raw_float64_and_integer_input_when_the_spec_checks_it(robust_model, digits_data):
    a = robust_model.predict(digits_data.x_test[:3].astype(np.float64))["label"]
    b = robust_model.predict(digits_data.x_test[:3].astype(np.int64))["label"]
    c = robust_model.predict(digits_data.x_test[:3])["label"]
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    with pytest.raises(InputError, match="check: expected numbers, got dtype <U1"):
        robust_model.predict(np.array([["a"] * 64]))


def _mean_over_time_model(window: int, channels: int) -> bytes:
    """A tiny real ONNX model: (N, window, channels) float32 -> its mean over time (N, channels)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0, axes=[1])
    graph = helper.make_graph(
        [node], "mean_over_time",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, window, channels])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_windowed_sensor_stream_pipeline_serves_raw_streams_of_any_length(tmp_path, signer, trusted):
    spec = {
        "features": ["ax", "ay", "az"],
        "steps": [
            {"op": "check", "nonfinite": "allow"},
            {"op": "impute", "strategy": "last"},
            {"op": "clip", "quantiles": [0.001, 0.999]},
            {"op": "moving_median", "window": 3},
            {"op": "resample", "length": 40},
            {"op": "window", "size": 20},
            {"op": "standardize"},
            {"op": "cast"},
        ],
    }
    rng = np.random.default_rng(0)
    train = rng.normal(size=(64, 100, 3))
    path = tmp_path / "motion.ewb"
    build_bundle(_mean_over_time_model(20, 3), name="motion", version="1.0.0", signer=signer, out=path, preprocessing=spec, fit_on=train)
    model = LoadedModel.from_bundle(verify_bundle(path, trusted), threads=1)
    model.smoke_test()
    fitted = model.manifest.preprocessing
    stream = rng.normal(size=(1, 250, 3))
    stream[0, 7, 1] = np.nan
    out, feed = model.run(stream)
    assert feed["x"].shape == (1, 20, 3)
    np.testing.assert_array_equal(feed["x"], fitted.apply(stream))  # the lab's arrays, bit for bit
    np.testing.assert_allclose(out["y"], feed["x"].mean(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="input 'x': impute|moving_median|resample: the stream has no time steps|check: empty"):
        model.predict(np.zeros((1, 0, 3)))


def test_cli_bundle_create_fits_the_spec_on_a_training_npz(tmp_path, digits_models, digits_data, keys_dir):
    from edgewise.cli.main import app

    (tmp_path / "m.onnx").write_bytes(digits_models["logreg"])
    (tmp_path / "spec.json").write_text(json.dumps(ROBUST))
    np.savez(tmp_path / "train.npz", x_train=digits_data.x_train)
    args = ["bundle", "create", str(tmp_path / "m.onnx"), "--name", "digits", "--version", "3.0.0", "--key", str(keys_dir / "signing.key"),
            "--preprocessing", str(tmp_path / "spec.json"), "--out", str(tmp_path / "d.ewb")]
    runner = CliRunner()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--fit-on" in refused.output
    ok = runner.invoke(app, [*args, "--fit-on", str(tmp_path / "train.npz"), "--json"])
    assert ok.exit_code == 0, ok.output
    spec = PreprocessingSpec.model_validate(json.loads(ok.output)["manifest"]["preprocessing"])
    assert spec.fitted and spec == fit_spec(ROBUST, digits_data.x_train)


def test_an_agent_reports_the_repairs_its_model_made_in_its_next_telemetry(tmp_path, keys_dir, robust_bundle, digits_data):
    from test_agent_support import make_agent

    agent = make_agent(tmp_path / "rep", keys_dir, device_id="prep-wired-1")
    try:
        assert agent.install(robust_bundle[0]).result == "ok"
        x = digits_data.x_test[:1].copy()
        x[0, 7] = np.nan
        agent.predict(x)
        assert agent.monitor.sample()["repairs"] == {"impute/px7": 1}
    finally:
        agent.stop()
