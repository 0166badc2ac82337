"""LoadedModel: the hot path checks input against the manifest before ONNX Runtime sees it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.agent import InputError, LoadedModel
from edgewise.bundle import verify_bundle
from test_agent_support import make_agent


@pytest.fixture(scope="module")
def loaded(bundles, trusted) -> LoadedModel:
    return LoadedModel.from_bundle(verify_bundle(bundles["1.0.0"], trusted))


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_predict_matches_onnxruntime_on_the_preprocessed_input(version, bundles, trusted, digits_data):
    vb = verify_bundle(bundles[version], trusted)
    model = LoadedModel.from_bundle(vb)
    x = digits_data.x_test[:32]
    reference = ort.InferenceSession(vb.read_model(), providers=["CPUExecutionProvider"])
    want = reference.run(None, {"x": vb.manifest.preprocessing.apply(x)})
    got = model.predict(x)
    assert list(got) == ["label", "probabilities"]
    np.testing.assert_array_equal(got["label"], want[0])
    np.testing.assert_allclose(got["probabilities"], want[1], rtol=1e-6)
    assert (got["label"] == digits_data.y_test[:32]).mean() > 0.8  # it is the real classifier


def test_wrong_shape_raises_input_error_naming_input_expected_and_got(loaded):
    with pytest.raises(InputError) as err:
        loaded.predict(np.zeros((1, 63), np.float32))
    msg = str(err.value)
    assert "'x'" in msg and "[?, 64]" in msg and "[1, 63]" in msg


def test_wrong_rank_raises_input_error(loaded):
    with pytest.raises(InputError, match=r"'x'.*\[\?, 64\].*\[64\]"):
        loaded.predict(np.zeros(64, np.float32))


def test_wrong_dtype_raises_input_error_naming_dtypes_and_the_fix(loaded):
    with pytest.raises(InputError) as err:
        loaded.predict(np.zeros((2, 64), np.float64))
    msg = str(err.value)
    assert "'x'" in msg and "float32" in msg and "float64" in msg and "astype" in msg


def test_input_error_is_a_value_error(loaded):
    with pytest.raises(ValueError):
        loaded.predict(np.zeros((1, 2), np.int64))


def test_dict_input_is_accepted_and_names_are_checked(loaded):
    x = np.zeros((1, 64), np.float32)
    assert loaded.predict({"x": x})["label"].shape == (1,)
    with pytest.raises(InputError, match=r"missing input\(s\) \['x'\]"):
        loaded.predict({"y": x})
    with pytest.raises(InputError, match=r"unknown input\(s\) \['extra'\]"):
        loaded.predict({"x": x, "extra": x})


def test_a_list_instead_of_an_array_is_refused_with_the_fix(loaded):
    with pytest.raises(InputError, match="numpy.asarray"):
        loaded.predict([[0.0] * 64])  # type: ignore[arg-type]


def test_an_ndarray_subclass_such_as_a_memmap_is_accepted(loaded, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(2, 64))
    assert loaded.predict(mm)["label"].shape == (2,)


def test_free_batch_dimension_takes_any_size(loaded):
    for n in (1, 7, 100):
        assert loaded.predict(np.ones((n, 64), np.float32))["probabilities"].shape == (n, 10)


def test_smoke_test_passes_on_the_demo_model(loaded):
    loaded.smoke_test()


def test_agent_counts_bad_input_and_keeps_serving(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="rt-1")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        with pytest.raises(InputError):
            agent.predict(np.zeros((1, 3), np.float32))
        with pytest.raises(InputError):
            agent.predict(np.zeros((1, 64), np.int32))
        out = agent.predict(digits_data.x_test[:4])
        assert out["label"].shape == (4,)
        assert agent.monitor.errors == 2
        assert agent.monitor.inferences == 1
    finally:
        agent.stop()


def _tuned_bundle(tmp_path, digits_models, signer, trusted, runtime):
    from edgewise.bundle import build_bundle

    path = tmp_path / "tuned.ewb"
    build_bundle(digits_models["logreg"], name="digits", version="1.0.0", signer=signer, out=path,
                 runtime=runtime, variant={"name": "fp32-tuned", "recipe": "fp32", "profile": "x86-gateway"})
    return verify_bundle(path, trusted)


def test_runtime_settings_tuned_for_the_profile_are_applied(tmp_path, digits_models, signer, trusted):
    vb = _tuned_bundle(tmp_path, digits_models, signer, trusted,
                       {"intra_op_threads": 2, "inter_op_threads": 1, "graph_optimization_level": "ORT_ENABLE_BASIC"})
    assert vb.manifest.variant.name == "fp32-tuned"
    opts = LoadedModel.from_bundle(vb)._session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_the_devices_own_thread_setting_wins_over_the_bundles(tmp_path, digits_models, signer, trusted):
    vb = _tuned_bundle(tmp_path, digits_models, signer, trusted, {"intra_op_threads": 2})
    opts = LoadedModel.from_bundle(vb, threads=1)._session.get_session_options()
    assert opts.intra_op_num_threads == 1
