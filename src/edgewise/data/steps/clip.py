"""``clip``: bound each feature to its training range (a faulty sensor's outliers)."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from .base import PreprocessingError, StepBase, Tally, feature_counts, require_float
from .scale import Values, _finite_stat


class Clip(StepBase):
    """Clip to ``[low, high]`` (scalars or one per feature along ``axis``); every clipped value is counted
    as a repair. With ``quantiles=[0.001, 0.999]`` and no bounds, ``--fit-on`` sets the bounds to those
    training quantiles. NaN passes through unchanged (put an ``impute`` step first); ±inf is clipped.

    >>> t = Tally(); Clip(low=0.0, high=1.0).apply(np.array([[-3.0, 0.5, 9.0]]), t), t.counts
    (array([[0. , 0.5, 1. ]]), {'clip/0': 1, 'clip/2': 1})
    """

    op: Literal["clip"] = "clip"
    low: Values | None = None
    high: Values | None = None
    quantiles: tuple[float, float] | None = None
    axis: int = -1

    @model_validator(mode="after")
    def _check_quantiles(self) -> "Clip":
        q = self.quantiles
        if q is not None and not (0.0 <= q[0] < q[1] <= 1.0):
            raise ValueError(f"clip: quantiles must satisfy 0 <= low < high <= 1, got {list(q)}")
        return self

    @property
    def fitted(self) -> bool:
        return self.quantiles is None or (self.low is not None and self.high is not None)

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None) -> "Clip":
        if self.quantiles is None:
            return self
        lo_q, hi_q = self.quantiles
        lo = _finite_stat(lambda r, axis: np.nanquantile(r, lo_q, axis=axis), x, self.axis)
        hi = _finite_stat(lambda r, axis: np.nanquantile(r, hi_q, axis=axis), x, self.axis)
        return self.model_copy(update={"low": [0.0 if np.isnan(v) else v for v in lo], "high": [0.0 if np.isnan(v) else v for v in hi]})

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if not self.fitted:
            raise PreprocessingError("clip: bounds are not fitted from the quantiles; build the bundle with --fit-on TRAIN.npz")
        if self.low is None and self.high is None:
            return x
        x = require_float("clip", x)
        mask = None
        if self.low is not None:
            lo = self.param("low", self.low, x, self.axis)
            mask = x < lo
        else:
            lo = None
        if self.high is not None:
            hi = self.param("high", self.high, x, self.axis)
            above = x > hi
            mask = above if mask is None else (mask | above)
        else:
            hi = None
        if mask is not None and mask.any():
            tally.add("clip", feature_counts(mask, self.axis))
            return np.clip(x, lo, hi)
        return x
