"""``resample``: bring a sensor stream to a fixed number of time steps (linear interpolation)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import PreprocessingError, StepBase, Tally, require_float, require_ndim, reject_nonfinite


class Resample(StepBase):
    """Linearly interpolate ``length`` evenly spaced points over the whole stream along ``time_axis``
    (a stream recorded at another rate, or a window of another duration). Rejects empty streams and NaN/inf.

    >>> Resample(length=3).apply(np.array([[0.0], [4.0]]), Tally()).ravel()
    array([0., 2., 4.])
    """

    op: Literal["resample"] = "resample"
    length: int = Field(ge=1, le=1_000_000)
    time_axis: int = -2

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        x = require_float("resample", x)
        require_ndim("resample", x, 2, "time steps and features")
        t = self.time_axis % x.ndim
        n = x.shape[t]
        if n == 0:
            raise PreprocessingError("resample: the stream has no time steps; send at least one")
        reject_nonfinite("resample", x, tally)
        if n == self.length:
            return x
        pos = np.linspace(0.0, n - 1, self.length)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1] * x.ndim
        shape[t] = self.length
        w = (pos - i0).astype(x.dtype).reshape(shape)
        return x.take(i0, axis=t) * (1 - w) + x.take(i1, axis=t) * w
