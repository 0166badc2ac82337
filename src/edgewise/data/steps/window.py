"""``window``: the last ``size`` time steps of a sensor stream."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import PreprocessingError, StepBase, Tally, require_ndim


class Window(StepBase):
    """Keep the most recent ``size`` steps along ``time_axis``. A shorter stream is rejected
    (``pad="reject"``) or padded at the start with its first step (``pad="edge"``, counted as the
    repair ``window/short``).

    >>> Window(size=2).apply(np.array([[1.0], [2.0], [3.0]]), Tally()).ravel()
    array([2., 3.])
    """

    op: Literal["window"] = "window"
    size: int = Field(ge=1, le=1_000_000)
    time_axis: int = -2
    pad: Literal["reject", "edge"] = "reject"

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        require_ndim("window", x, 2, "time steps and features")
        t = self.time_axis % x.ndim
        n = x.shape[t]
        if n >= self.size:
            index = [slice(None)] * x.ndim
            index[t] = slice(n - self.size, n)
            return x[tuple(index)]
        if self.pad == "reject" or n == 0:
            raise PreprocessingError(f"window: the stream has {n} time steps, the model needs {self.size}; send a longer stream")
        tally.add_one("window", "short")
        pad = [(0, 0)] * x.ndim
        pad[t] = (self.size - n, 0)
        return np.pad(x, pad, mode="edge")
