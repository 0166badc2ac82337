"""``resize``: resize images with numpy only (no PIL or OpenCV on the device)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import PreprocessingError, StepBase, Tally, require_float, require_ndim, reject_nonfinite


def _coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (left, right) and right weights of each output pixel (half-pixel centres, as OpenCV)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


class Resize(StepBase):
    """Resize the two image axes ``axes`` (default the last two: (N, H, W) or (N, C, H, W)) to
    ``height`` x ``width``, bilinear or nearest. Rejects empty images and NaN/inf.

    >>> Resize(height=2, width=2, method="nearest").apply(np.arange(16.0).reshape(1, 4, 4), Tally())
    array([[[ 0.,  2.],
            [ 8., 10.]]])
    """

    op: Literal["resize"] = "resize"
    height: int = Field(ge=1, le=16384)
    width: int = Field(ge=1, le=16384)
    method: Literal["bilinear", "nearest"] = "bilinear"
    axes: tuple[int, int] = (-2, -1)

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        x = require_float("resize", x)
        require_ndim("resize", x, 2, "image height and width")
        ha, wa = (a % x.ndim for a in self.axes)
        h, w = x.shape[ha], x.shape[wa]
        if h == 0 or w == 0:
            raise PreprocessingError(f"resize: empty image (shape {list(x.shape)}); send at least one pixel")
        reject_nonfinite("resize", x, tally)
        if (h, w) == (self.height, self.width):
            return x
        for axis, n_in, n_out in ((ha, h, self.height), (wa, w, self.width)):
            if self.method == "nearest":
                idx = np.minimum((np.arange(n_out) * (n_in / n_out)).astype(np.intp), n_in - 1)
                x = x.take(idx, axis=axis)
            else:
                i0, i1, frac = _coords(n_in, n_out)
                shape = [1] * x.ndim
                shape[axis] = n_out
                f = frac.astype(x.dtype).reshape(shape)
                x = x.take(i0, axis=axis) * (1 - f) + x.take(i1, axis=axis) * f
        return x
