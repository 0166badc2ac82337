"""``reshape`` and ``transpose``: lay the input out the way the model takes it."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .base import PreprocessingError, StepBase, Tally


class Reshape(StepBase):
    """Reshape to ``shape`` (one ``-1`` allowed, e.g. ``[-1, 1, 8, 8]`` for 64 pixels to a 1-channel image).

    >>> Reshape(shape=[-1, 2, 2]).apply(np.zeros((3, 4)), Tally()).shape
    (3, 2, 2)
    """

    op: Literal["reshape"] = "reshape"
    shape: list[int]

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise PreprocessingError(f"reshape: cannot reshape input of shape {list(x.shape)} to {self.shape}") from None


class Transpose(StepBase):
    """Permute the axes, e.g. ``[0, 2, 1]`` for (batch, channels, time) to (batch, time, channels).

    >>> Transpose(axes=[0, 2, 1]).apply(np.zeros((1, 3, 5)), Tally()).shape
    (1, 5, 3)
    """

    op: Literal["transpose"] = "transpose"
    axes: list[int]

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if x.ndim != len(self.axes):
            raise PreprocessingError(f"transpose: input has {x.ndim} dimensions (shape {list(x.shape)}), the spec permutes {len(self.axes)}")
        return x.transpose(self.axes)
