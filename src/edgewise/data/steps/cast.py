"""``cast``: convert to the model's input dtype."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np

from .base import PreprocessingError, StepBase, Tally, first_bad_feature


class Cast(StepBase):
    """Cast to ``dtype`` (the model's input dtype). Strings, objects and complex numbers are rejected;
    NaN/inf are rejected when casting to an integer dtype (they have no integer value).

    >>> Cast(dtype="float32").apply(np.array([[1, 2]]), Tally()).dtype
    dtype('float32')
    """

    op: Literal["cast"] = "cast"
    dtype: str = "float32"

    @cached_property
    def _target(self) -> np.dtype:
        try:
            return np.dtype(self.dtype)
        except TypeError:
            raise PreprocessingError(f"cast: numpy does not know dtype {self.dtype!r}; fix the bundle's spec") from None

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        kind = x.dtype.kind
        if kind not in "biuf":
            raise PreprocessingError(f"cast: expected numbers, got dtype {x.dtype}; send a numeric array")
        target = self._target
        if target.kind in "iu" and kind == "f":
            bad = ~np.isfinite(x)
            if bad.any():
                raise PreprocessingError(
                    f"cast: {tally.feature(first_bad_feature(bad, -1))} is NaN or infinite and cannot become {self.dtype}; "
                    "add an impute step before the cast"
                )
            info = np.iinfo(target)
            out = (x < info.min) | (x > info.max)
            if out.any():
                raise PreprocessingError(
                    f"cast: {tally.feature(first_bad_feature(out, -1))} is outside the range of {self.dtype}; add a clip step before the cast"
                )
        if kind == "f" and target.kind == "f" and target.itemsize < x.dtype.itemsize:
            with np.errstate(over="ignore"):  # too large for the target: inf, which the pipeline's finite check names
                return x.astype(target, copy=False)
        return x.astype(target, copy=False)
