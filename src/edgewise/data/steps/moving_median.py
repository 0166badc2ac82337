"""``moving_median``: a sensor-noise filter that removes spikes from a time series."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import StepBase, Tally, require_float, require_ndim, reject_nonfinite


class MovingMedian(StepBase):
    """Median of the ``window`` samples centred on each step along ``time_axis`` (edges padded with the
    edge value), so the output has the input's shape. Rejects NaN/inf (impute first): a median of
    missing values is not a reading.

    >>> MovingMedian(window=3).apply(np.array([[1.0], [9.0], [1.0], [1.0]]), Tally()).ravel()
    array([1., 1., 1., 1.])
    """

    op: Literal["moving_median"] = "moving_median"
    window: int = Field(default=3, ge=1, le=1024)
    time_axis: int = -2

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        x = require_float("moving_median", x)
        require_ndim("moving_median", x, 2, "time steps and features")
        reject_nonfinite("moving_median", x, tally)
        k = self.window
        if k == 1:
            return x
        t = self.time_axis % x.ndim
        pad = [(0, 0)] * x.ndim
        pad[t] = (k // 2, k - 1 - k // 2)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, pad, mode="edge"), k, axis=t)
        return np.median(windows, axis=-1).astype(x.dtype, copy=False)
