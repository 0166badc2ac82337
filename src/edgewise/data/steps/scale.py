"""``scale``, ``standardize``, ``minmax``: affine scaling per feature, with statistics fitted in the lab."""

from __future__ import annotations

from functools import cached_property
from typing import Literal, Sequence

import numpy as np

from .base import PreprocessingError, StepBase, Tally, require_float

Values = float | list[float]


def _moved(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with ``axis`` last, flattened to (rows, features), float64: what statistics are computed on."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return x.reshape(1, 1)
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _finite_stat(fn, x: np.ndarray, axis: int) -> list[float]:  # type: ignore[no-untyped-def]
    rows = _moved(x, axis)
    rows = np.where(np.isfinite(rows), rows, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = fn(rows, axis=0)
    return [float(v) for v in values]


class Scale(StepBase):
    """``(x - offset) * factor``; scalars or one value per feature along ``axis`` (default: the last).

    >>> Scale(factor=0.5).apply(np.array([2.0]), Tally())
    array([1.])
    """

    op: Literal["scale"] = "scale"
    offset: Values = 0.0
    factor: Values = 1.0
    axis: int = -1

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if x.dtype.kind not in "biuf":
            raise PreprocessingError(f"scale: expected numbers, got dtype {x.dtype}; send a numeric array")
        dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
        no_offset, no_factor = self._identity
        if not no_offset:
            x = x - self.param("offset", self.offset, x, self.axis, dt)
        if not no_factor or x.dtype != dt:
            x = x * self.param("factor", self.factor, x, self.axis, dt)
        return x

    @cached_property
    def _identity(self) -> tuple[bool, bool]:
        """(offset is 0, factor is 1): the hot path skips a no-op array operation."""
        return (np.ndim(self.offset) == 0 and self.offset == 0.0, np.ndim(self.factor) == 0 and self.factor == 1.0)


class Standardize(StepBase):
    """``(x - mean) / std`` per feature with the training mean and std (fitted: leave them out of the
    spec and build with ``--fit-on``). A feature with std 0 in training is only centred.

    >>> Standardize(mean=[1.0], std=[2.0]).apply(np.array([[5.0]]), Tally())
    array([[2.]])
    """

    op: Literal["standardize"] = "standardize"
    mean: Values | None = None
    std: Values | None = None
    axis: int = -1

    @property
    def fitted(self) -> bool:
        return self.mean is not None and self.std is not None

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None) -> "Standardize":
        mean = _finite_stat(np.nanmean, x, self.axis)
        std = _finite_stat(np.nanstd, x, self.axis)
        return self.model_copy(update={"mean": [0.0 if np.isnan(m) else m for m in mean], "std": [1.0 if not s > 0 else s for s in std]})

    @cached_property
    def _inv(self) -> np.ndarray:
        s = np.asarray(self.std, dtype=np.float64)
        return np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 1.0)

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if not self.fitted:
            raise PreprocessingError("standardize: mean/std are not fitted; build the bundle with --fit-on TRAIN.npz")
        x = require_float("standardize", x)
        return (x - self.param("mean", self.mean, x, self.axis)) * self.param("inv", self._inv, x, self.axis)


class MinMax(StepBase):
    """Map the training range ``[low, high]`` of each feature to ``[0, 1]`` (values outside stay outside:
    put a ``clip`` before it to bound them). A constant feature maps to 0.

    >>> MinMax(low=[0.0], high=[4.0]).apply(np.array([[1.0]]), Tally())
    array([[0.25]])
    """

    op: Literal["minmax"] = "minmax"
    low: Values | None = None
    high: Values | None = None
    axis: int = -1

    @property
    def fitted(self) -> bool:
        return self.low is not None and self.high is not None

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None) -> "MinMax":
        lo = _finite_stat(np.nanmin, x, self.axis)
        hi = _finite_stat(np.nanmax, x, self.axis)
        lo = [0.0 if np.isnan(v) else v for v in lo]
        hi = [l if np.isnan(v) else v for v, l in zip(hi, lo)]
        return self.model_copy(update={"low": lo, "high": hi})

    @cached_property
    def _inv(self) -> np.ndarray:
        r = np.asarray(self.high, dtype=np.float64) - np.asarray(self.low, dtype=np.float64)
        return np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), 1.0)

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray:
        if not self.fitted:
            raise PreprocessingError("minmax: low/high are not fitted; build the bundle with --fit-on TRAIN.npz")
        x = require_float("minmax", x)
        return (x - self.param("low", self.low, x, self.axis)) * self.param("inv", self._inv, x, self.axis)
