"""``impute``: fill missing values (NaN, and by default ±inf) with a constant, the last value or the training median."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import model_validator

from .base import PreprocessingError, StepBase, Tally, feature_counts, require_float
from .scale import _finite_stat


class Impute(StepBase):
    """Replace missing values per feature (along ``axis``); each one filled is counted as a repair.

    - ``constant``: ``value``.
    - ``median``: the training median of the feature (``fill``, fitted by ``--fit-on``).
    - ``last``: the previous valid value along ``time_axis`` (a time series' previous step; for a
      (batch, features) array, the previous row of the same request); where there is none, ``fill``
      if fitted, else ``value``. There is no memory across requests: the lab and the device compute
      the same thing from the same array.

    >>> t = Tally(); Impute(strategy="last").apply(np.array([[1.0], [np.nan], [3.0]]), t), t.counts
    (array([[1.],
           [1.],
           [3.]]), {'impute/0': 1})
    """

    op: Literal["impute"] = "impute"
    strategy: Literal["constant", "median", "last"] = "median"
    value: float = 0.0
    fill: list[float] | None = None
    infinite: bool = True
    axis: int = -1
    time_axis: int = -2

    @model_validator(mode="after")
    def _finite_fill(self) -> "Impute":
        if not np.isfinite(self.value) or (self.fill is not None and not np.isfinite(self.fill).all()):
            raise ValueError("impute: value and fill must be finite numbers")
        return self

    @property
    def fitted(self) -> bool:
        return self.strategy != "median" or self.fill is not None

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None) -> "Impute":
        if self.strategy == "constant":
            return self
        med = _finite_stat(np.nanmedian, x, self.axis)
        return self.model_copy(update={"fill": [self.value if np.isnan(m) else m for m in med]})

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if not self.fitted:
            raise PreprocessingError("impute: the training medians are not fitted; build the bundle with --fit-on TRAIN.npz")
        x = require_float("impute", x)
        bad = ~np.isfinite(x) if self.infinite else np.isnan(x)
        if not bad.any():
            return x
        tally.add("impute", feature_counts(bad, self.axis))
        if self.strategy == "last" and x.ndim >= 2:
            t = self.time_axis % x.ndim
            n = x.shape[t]
            shape = [1] * x.ndim
            shape[t] = n
            idx = np.where(bad, 0, np.arange(n).reshape(shape))
            np.maximum.accumulate(idx, axis=t, out=idx)
            x = np.take_along_axis(x, idx, axis=t)
            bad = np.take_along_axis(bad, idx, axis=t)  # still missing: no valid value before it
            if not bad.any():
                return x
        fill = self.fill if self.fill is not None and self.strategy != "constant" else self.value
        return np.where(bad, self.param("fill", fill, x, self.axis), x)
