"""One preprocessing implementation for lab and device."""

import numpy as np
import pytest

from edgewise.data import Cast, Clip, PreprocessingError, PreprocessingSpec, Scale


def test_empty_spec_is_identity_and_falsy():
    x = np.arange(4, dtype=np.float32)
    spec = PreprocessingSpec()
    assert not spec and spec.apply(x) is x


def test_steps_run_in_order():
    spec = PreprocessingSpec(steps=[Cast(dtype="float32"), Scale(offset=1.0, factor=0.5), Clip(low=0.0, high=1.0)])
    out = spec.apply(np.array([[1, 3, 9]], dtype=np.int64))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 1.0, 1.0]])


def test_per_feature_scale_checks_feature_count():
    spec = PreprocessingSpec(steps=[Scale(offset=[0.0, 1.0], factor=[1.0, 2.0])])
    with pytest.raises(PreprocessingError, match="features"):
        spec.apply(np.zeros((1, 3), dtype=np.float32))


def test_spec_round_trips_through_json():
    spec = PreprocessingSpec(steps=[Cast(), Scale(factor=0.0625)])
    assert PreprocessingSpec.model_validate_json(spec.model_dump_json()) == spec
