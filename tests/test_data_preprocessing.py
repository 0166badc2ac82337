"""The preprocessing pipeline, step by step: every step repairs and counts, or rejects naming the feature.

Property tests (hypothesis) throw NaN, inf, empty, huge, wrong-dtype and wrong-shape arrays at each
step and the whole pipeline: the only exception ever raised is PreprocessingError, and what comes
out of a repairing step is finite.
"""

from __future__ import annotations

import doctest
import importlib
import json
import pkgutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import edgewise.data.steps as steps_pkg
from edgewise.data import (
    Cast,
    Check,
    Clip,
    ExpSmooth,
    Impute,
    MinMax,
    MovingMedian,
    PreprocessingError,
    PreprocessingSpec,
    Resample,
    Reshape,
    Resize,
    Scale,
    Standardize,
    Transpose,
    Window,
)
from edgewise.data.fit import fit_spec, load_training_array

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

nasty_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e308, -1e308, 3.4e38, 1e-320]),
)


def float_arrays(min_dims: int = 0, max_dims: int = 4) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
    )


odd_arrays = st.one_of(
    float_arrays(),
    hnp.arrays(dtype=st.sampled_from([np.int8, np.int64, np.uint8, np.bool_]), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    st.sampled_from([  # wrong dtypes: strings, complex, objects, bytes
        np.array([["a", "b", "c"]]), np.array([[1 + 2j, 0, 0]]), np.array([[1, None, 2]], dtype=object),
        np.array([[1.0, 2.0, 3.0]], dtype=object), np.array([[b"x", b"y", b"z"]]),
    ]),
    hnp.arrays(dtype=np.float64, shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=nasty_floats),
)

# Every step, configured the way a 3-feature / time-series / image bundle would carry it (statistics fitted).
ALL_STEPS = [
    Cast(dtype="float32"),
    Cast(dtype="int32"),
    Check(shape=[None, 3]),
    Check(nonfinite="allow", max_abs=1e6),
    Scale(offset=[0.0, 1.0, 2.0], factor=0.5),
    Standardize(mean=[0.0, 1.0, 2.0], std=[1.0, 2.0, 0.0]),
    MinMax(low=[0.0, 0.0, 0.0], high=[1.0, 2.0, 0.0]),
    Clip(low=[-1.0, -1.0, -1.0], high=[1.0, 1.0, 1.0]),
    Impute(strategy="median", fill=[0.5, 1.5, 2.5]),
    Impute(strategy="constant", value=-1.0),
    Impute(strategy="last", fill=[0.0, 0.0, 0.0]),
    MovingMedian(window=3),
    ExpSmooth(alpha=0.4),
    Resample(length=4),
    Window(size=3, pad="edge"),
    Window(size=3),
    Resize(height=3, width=2),
    Resize(height=2, width=5, method="nearest"),
    Reshape(shape=[-1, 3]),
    Transpose(axes=[1, 0]),
]
REPAIRING = [s for s in ALL_STEPS if isinstance(s, (Impute,))]


@pytest.mark.parametrize("step", ALL_STEPS, ids=lambda s: s.op)
@SETTINGS
@given(x=odd_arrays)
def test_every_step_either_returns_an_array_or_raises_preprocessing_error(step, x):
    spec = PreprocessingSpec(steps=[step], require_finite=False)
    try:
        out, repairs = spec.run(x)
    except PreprocessingError as exc:
        assert str(exc)  # a message, naming the step
        assert step.op in str(exc) or "input" in str(exc)
        return
    assert isinstance(out, np.ndarray)
    assert all(isinstance(k, str) and "/" in k and isinstance(v, int) and v > 0 for k, v in repairs.items())


@pytest.mark.parametrize("step", REPAIRING, ids=lambda s: f"{s.op}-{s.strategy}")
@SETTINGS
@given(x=hnp.arrays(dtype=np.float64, shape=st.tuples(st.integers(1, 6), st.just(3)), elements=nasty_floats))
def test_imputation_leaves_only_finite_values_and_counts_each_one_it_filled(step, x):
    out, repairs = PreprocessingSpec(steps=[step]).run(x)
    assert np.isfinite(out).all() and out.shape == x.shape
    assert sum(repairs.values()) == int((~np.isfinite(x)).sum())
    for j in range(3):
        assert repairs.get(f"impute/{j}", 0) == int((~np.isfinite(x[:, j])).sum())


@SETTINGS
@given(x=hnp.arrays(dtype=np.float64, shape=st.tuples(st.integers(1, 6), st.just(3)), elements=nasty_floats))
def test_the_robust_tabular_pipeline_never_lets_a_non_finite_value_through(x):
    spec = PreprocessingSpec(steps=[
        Check(shape=[None, 3], nonfinite="allow"), Impute(fill=[0.0, 1.0, 2.0]),
        Clip(low=-10.0, high=10.0), Standardize(mean=[0.0, 1.0, 2.0], std=[1.0, 2.0, 3.0]), Cast(),
    ])
    out, _ = spec.run(x)
    assert out.dtype == np.float32 and out.shape == x.shape and np.isfinite(out).all()
    assert np.abs(out).max() <= 12.0


@SETTINGS
@given(x=odd_arrays)
def test_the_full_pipeline_raises_only_preprocessing_error_on_any_input(x):
    spec = PreprocessingSpec(steps=[
        Check(nonfinite="allow"), Impute(strategy="last", value=0.0), Clip(low=-5.0, high=5.0),
        MovingMedian(window=3), ExpSmooth(alpha=0.5), Resample(length=8), Window(size=4, pad="edge"), Cast(),
    ])
    try:
        out = spec.apply(x)
    except PreprocessingError:
        return
    assert np.isfinite(out).all()


def test_check_rejects_wrong_shape_naming_expected_and_got():
    with pytest.raises(PreprocessingError, match=r"check: expected shape \[\?, 3\], got \[2, 4\]"):
        PreprocessingSpec(steps=[Check(shape=[None, 3])]).apply(np.zeros((2, 4)))


def test_check_rejects_strings_and_objects_naming_the_dtype():
    with pytest.raises(PreprocessingError, match="expected numbers, got dtype <U1"):
        PreprocessingSpec(steps=[Check()]).apply(np.array([["a"]]))


def test_check_rejects_an_empty_batch():
    with pytest.raises(PreprocessingError, match="empty input"):
        PreprocessingSpec(steps=[Check(shape=[None, 3])]).apply(np.zeros((0, 3)))


def test_check_names_the_feature_holding_nan_by_its_name():
    spec = PreprocessingSpec(steps=[Check()], features=["temp", "humidity", "pressure"])
    with pytest.raises(PreprocessingError, match=r"feature 'humidity' \(index 1\) is NaN or infinite"):
        spec.apply(np.array([[1.0, np.nan, 2.0]]))


def test_check_rejects_huge_values_as_a_broken_sensor():
    with pytest.raises(PreprocessingError, match=r"feature 2 has 1 value\(s\) beyond"):
        PreprocessingSpec(steps=[Check(max_abs=1e6)]).apply(np.array([[1.0, 2.0, 1e30]]))


def test_a_nan_left_after_the_last_step_is_rejected_naming_the_feature():
    spec = PreprocessingSpec(steps=[Cast(), Scale(factor=2.0)])
    with pytest.raises(PreprocessingError, match="feature 1 is NaN or infinite after preprocessing"):
        spec.apply(np.array([[1.0, np.inf]], dtype=np.float32))


def test_overflow_in_a_cast_is_rejected_naming_the_feature():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PreprocessingError, match="feature 0 is NaN or infinite after preprocessing"):
            PreprocessingSpec(steps=[Cast(dtype="float32")]).apply(np.array([[1e300]]))


def test_overflow_where_warnings_are_errors_is_still_a_preprocessing_error():
    with _no_warnings():
        with pytest.raises(PreprocessingError, match="feature 0 is NaN or infinite after preprocessing"):
            PreprocessingSpec(steps=[Cast(dtype="float32")]).apply(np.array([[1e300]]))
        with pytest.raises(PreprocessingError, match="standardize: .*overflow|feature 0 is NaN or infinite"):
            PreprocessingSpec(steps=[Standardize(mean=0.0, std=1e-300)]).apply(np.array([[1e300]]))


class _no_warnings:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def test_clip_counts_each_clipped_value_per_feature():
    out, repairs = PreprocessingSpec(steps=[Clip(low=[0.0, 0.0], high=[1.0, 1.0])]).run(np.array([[5.0, 0.5], [-np.inf, 2.0]]))
    np.testing.assert_array_equal(out, [[1.0, 0.5], [0.0, 1.0]])
    assert repairs == {"clip/0": 2, "clip/1": 1}


def test_impute_last_fills_from_the_previous_time_step_of_each_channel():
    x = np.array([[[1.0, np.nan], [np.nan, 5.0], [np.nan, np.nan]]])  # (batch, time, channels)
    out, repairs = PreprocessingSpec(steps=[Impute(strategy="last", fill=[9.0, 7.0])]).run(x)
    np.testing.assert_array_equal(out, [[[1.0, 7.0], [1.0, 5.0], [1.0, 5.0]]])
    assert repairs == {"impute/0": 2, "impute/1": 2}


def test_impute_does_not_modify_the_callers_array():
    x = np.array([[np.nan, 1.0]])
    PreprocessingSpec(steps=[Impute(strategy="constant")]).apply(x)
    assert np.isnan(x[0, 0])


def test_moving_median_removes_a_single_spike_and_keeps_the_shape():
    x = np.zeros((1, 9, 2))
    x[0, 4, 1] = 100.0
    out = PreprocessingSpec(steps=[MovingMedian(window=3)]).apply(x)
    assert out.shape == x.shape and np.abs(out).max() == 0.0


def test_moving_median_rejects_nan_and_says_to_impute_first():
    with pytest.raises(PreprocessingError, match="feature 1 is NaN or infinite; add an impute step before moving_median"):
        PreprocessingSpec(steps=[MovingMedian()]).apply(np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_exp_smooth_matches_the_recursive_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 50, 3))
    out = PreprocessingSpec(steps=[ExpSmooth(alpha=0.2)]).apply(x)
    want = np.empty_like(x)
    want[:, 0] = x[:, 0]
    for t in range(1, 50):
        want[:, t] = 0.2 * x[:, t] + 0.8 * want[:, t - 1]
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


def test_resample_interpolates_to_the_requested_length_per_channel():
    x = np.stack([np.linspace(0, 10, 11), np.linspace(0, -10, 11)], axis=-1)[None]  # (1, 11, 2)
    out = PreprocessingSpec(steps=[Resample(length=21)]).apply(x)
    assert out.shape == (1, 21, 2)
    np.testing.assert_allclose(out[0, :, 0], np.linspace(0, 10, 21))


def test_window_keeps_the_most_recent_steps_and_rejects_a_short_stream():
    x = np.arange(10.0).reshape(1, 10, 1)
    np.testing.assert_array_equal(PreprocessingSpec(steps=[Window(size=3)]).apply(x).ravel(), [7.0, 8.0, 9.0])
    with pytest.raises(PreprocessingError, match="the stream has 2 time steps, the model needs 3"):
        PreprocessingSpec(steps=[Window(size=3)]).apply(x[:, :2])


def test_window_pads_a_short_stream_when_configured_and_counts_it():
    out, repairs = PreprocessingSpec(steps=[Window(size=4, pad="edge")]).run(np.array([[[1.0], [2.0]]]))
    np.testing.assert_array_equal(out.ravel(), [1.0, 1.0, 1.0, 2.0])
    assert repairs == {"window/short": 1}


def test_bilinear_resize_of_a_constant_image_is_constant_and_of_a_ramp_is_a_ramp():
    img = np.full((2, 1, 8, 8), 3.0)
    assert np.allclose(PreprocessingSpec(steps=[Resize(height=5, width=11)]).apply(img), 3.0)
    ramp = np.tile(np.arange(8.0), (8, 1))[None]
    out = PreprocessingSpec(steps=[Resize(height=8, width=16)]).apply(ramp)
    assert out.shape == (1, 8, 16) and np.all(np.diff(out[0, 0]) >= 0)


def test_reshape_names_the_shapes_it_cannot_join():
    with pytest.raises(PreprocessingError, match=r"cannot reshape input of shape \[1, 63\] to \[-1, 1, 8, 8\]"):
        PreprocessingSpec(steps=[Reshape(shape=[-1, 1, 8, 8])]).apply(np.zeros((1, 63)))


def test_standardize_and_minmax_say_they_need_fitting():
    for step in (Standardize(), MinMax(), Impute(strategy="median"), Clip(quantiles=(0.01, 0.99))):
        spec = PreprocessingSpec(steps=[step])
        assert not spec.fitted
        with pytest.raises(PreprocessingError, match="--fit-on"):
            spec.apply(np.zeros((1, 2)))


def test_fit_freezes_statistics_on_data_as_each_step_sees_it():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=[10.0, -3.0], scale=[2.0, 0.5], size=(2000, 2))
    x[::10, 0] = np.nan
    x[5, 1] = 1e9  # an outlier the quantile clip removes before standardizing
    spec = fit_spec({"steps": [
        {"op": "check", "nonfinite": "allow"}, {"op": "impute"}, {"op": "clip", "quantiles": [0.001, 0.999]}, {"op": "standardize"},
    ]}, x)
    assert spec.fitted
    imp, clip, std = spec.steps[1], spec.steps[2], spec.steps[3]
    assert imp.fill[0] == pytest.approx(np.nanmedian(x[:, 0]))
    assert clip.high[1] < 1e3
    out = spec.apply(x)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=0.05)


def test_fit_keeps_statistics_already_in_the_spec():
    spec = fit_spec(PreprocessingSpec(steps=[Standardize(mean=1.0, std=2.0), MinMax()]), np.arange(10.0).reshape(5, 2))
    assert spec.steps[0].mean == 1.0 and spec.steps[1].fitted


def test_fitted_spec_round_trips_through_json_exactly():
    spec = fit_spec({"steps": [{"op": "impute"}, {"op": "standardize"}]}, np.random.default_rng(2).normal(size=(50, 4)))
    again = PreprocessingSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    x = np.random.default_rng(3).normal(size=(3, 4))
    np.testing.assert_array_equal(again.apply(x), spec.apply(x))


def test_a_bundle_spec_of_the_first_pipeline_still_reads_and_runs_the_same():
    legacy = json.loads('{"steps": [{"op": "cast", "dtype": "float32"}, {"op": "scale", "offset": 0.0, "factor": 0.0625}, '
                        '{"op": "clip", "low": 0.0, "high": 1.0}]}')
    spec = PreprocessingSpec.model_validate(legacy)
    x = np.array([[0.0, 8.0, 32.0]], dtype=np.float32)
    np.testing.assert_array_equal(spec.apply(x), np.clip(x.astype(np.float32) * np.float32(0.0625), 0, 1))
    assert not spec.checks_raw_input


def test_load_training_array_names_what_the_npz_holds_when_the_key_is_missing(tmp_path):
    np.savez(tmp_path / "t.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(PreprocessingError, match=r"holds \['a', 'b'\]; it needs an array named 'x_train' or 'x'"):
        load_training_array(tmp_path / "t.npz")
    assert load_training_array(tmp_path / "t.npz", "b").shape == (2,)


def test_every_step_docstring_example_runs():
    failures = 0
    for mod in pkgutil.iter_modules(steps_pkg.__path__):
        result = doctest.testmod(importlib.import_module(f"edgewise.data.steps.{mod.name}"), optionflags=doctest.ELLIPSIS)
        failures += result.failed
    assert failures == 0
