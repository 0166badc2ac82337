"""``exp_smooth``: exponential smoothing of a time series (a sensor-noise filter)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field

from .base import StepBase, Tally, require_float, require_ndim, reject_nonfinite


@lru_cache(maxsize=32)
def _weights(alpha: float, n: int) -> np.ndarray:
    """Lower-triangular (n, n) matrix W with y = W @ x for y_0 = x_0, y_t = a x_t + (1 - a) y_{t-1}."""
    t = np.arange(n)
    lag = t[:, None] - t[None, :]
    w = np.where(lag >= 0, alpha * (1.0 - alpha) ** np.maximum(lag, 0), 0.0)
    w[:, 0] = (1.0 - alpha) ** t
    return w


class ExpSmooth(StepBase):
    """``y_0 = x_0``, ``y_t = alpha * x_t + (1 - alpha) * y_{t-1}`` along ``time_axis``; same shape out.
    Vectorized as one matrix product per request (time series up to a few thousand steps).
    Rejects NaN/inf (impute first).

    >>> ExpSmooth(alpha=0.5).apply(np.array([[0.0], [2.0], [2.0]]), Tally()).ravel()
    array([0. , 1. , 1.5])
    """

    op: Literal["exp_smooth"] = "exp_smooth"
    alpha: float = Field(default=0.3, gt=0.0, le=1.0)
    time_axis: int = -2

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        x = require_float("exp_smooth", x)
        require_ndim("exp_smooth", x, 2, "time steps and features")
        reject_nonfinite("exp_smooth", x, tally)
        t = self.time_axis % x.ndim
        w = _weights(self.alpha, x.shape[t]).astype(x.dtype, copy=False)
        y = np.tensordot(w, x, axes=([1], [t]))  # the time axis comes first
        return np.moveaxis(y, 0, t)
