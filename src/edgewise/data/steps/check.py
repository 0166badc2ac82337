"""``check``: the type and shape of the raw input, before anything else touches it."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import PreprocessingError, StepBase, Tally, feature_counts, first_bad_feature


def _fmt(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Check(StepBase):
    """Reject raw input that is not numeric, has the wrong rank or size, is empty, or (as configured)
    holds NaN/inf or absurdly large values. Integers and booleans are converted to float32.

    ``shape`` lists every dimension, ``null`` for a free one (the batch); ``nonfinite="allow"`` lets
    NaN/inf through to a later ``impute``; ``max_abs`` rejects finite values larger in magnitude
    (a sensor reporting 1e38 is broken, not hot).

    >>> Check(shape=[None, 3]).apply(np.zeros((2, 4)), Tally())
    Traceback (most recent call last):
    ...
    edgewise.data.steps.base.PreprocessingError: check: expected shape [?, 3], got [2, 4]
    """

    op: Literal["check"] = "check"
    shape: list[int | None] | None = None
    min_samples: int = Field(default=1, ge=0)
    nonfinite: Literal["allow", "reject"] = "reject"
    max_abs: float | None = Field(default=None, gt=0)

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        kind = x.dtype.kind
        if kind not in "biuf":
            raise PreprocessingError(f"check: expected numbers, got dtype {x.dtype}; send a numeric array")
        shape = self.shape
        if shape is not None:
            if x.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, x.shape)):
                raise PreprocessingError(f"check: expected shape {_fmt(shape)}, got {list(x.shape)}")
        if x.size == 0 or (x.ndim and x.shape[0] < self.min_samples):
            raise PreprocessingError(f"check: empty input (shape {list(x.shape)}); send at least {max(self.min_samples, 1)} sample(s)")
        if kind != "f":
            return x.astype(np.float32)
        if self.nonfinite == "reject" or self.max_abs is not None:
            finite = np.isfinite(x)
            if self.nonfinite == "reject" and not finite.all():
                i = first_bad_feature(~finite, -1)
                raise PreprocessingError(f"check: {tally.feature(i)} is NaN or infinite; send finite values (or configure an impute step)")
            if self.max_abs is not None:
                huge = finite & (np.abs(x) > self.max_abs)
                if huge.any():
                    i = first_bad_feature(huge, -1)
                    n = int(feature_counts(huge, -1)[i])
                    raise PreprocessingError(f"check: {tally.feature(i)} has {n} value(s) beyond ±{self.max_abs:g}; the sensor looks broken")
        return x
