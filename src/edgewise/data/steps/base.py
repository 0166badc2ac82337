"""The one tiny protocol every preprocessing step follows, and the helpers they share.

A step is a frozen pydantic model with an ``op`` tag (its name in the bundle's JSON) and
``apply(x, tally) -> x``: it returns the repaired/transformed array, counts every repair it
made in ``tally`` (per step and feature), or raises :class:`PreprocessingError` naming the
feature and the problem. Steps whose parameters are statistics of the training data also
implement ``fit(x) -> step`` (a copy with the statistics frozen in) and ``fitted``.
Steps are plain numpy, vectorized: they run on the device's hot path.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict


class PreprocessingError(ValueError):
    """Input that a pipeline step cannot repair (or a spec that cannot run); the message names the step,
    the feature and the problem."""


class Tally:
    """Repairs made during one pipeline run, keyed ``"<op>/<feature>"``; also knows the feature names."""

    __slots__ = ("counts", "names")

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.names = names

    def name(self, i: int) -> str:
        names = self.names
        return names[i] if names is not None and 0 <= i < len(names) else str(i)

    def add(self, op: str, per_feature: np.ndarray) -> None:
        """Add a vector of repair counts, one per feature (only the non-zero ones are stored)."""
        counts = self.counts
        for i in np.flatnonzero(per_feature).tolist():
            key = f"{op}/{self.name(i)}"
            counts[key] = counts.get(key, 0) + int(per_feature[i])

    def add_one(self, op: str, field: str, n: int = 1) -> None:
        key = f"{op}/{field}"
        self.counts[key] = self.counts.get(key, 0) + n

    def feature(self, i: int) -> str:
        """How an error names feature ``i``: ``'temp' (index 3)`` or ``3``."""
        names = self.names
        if names is not None and 0 <= i < len(names):
            return f"feature {names[i]!r} (index {i})"
        return f"feature {i}"


class StepBase(BaseModel):
    """Common base of the step models: frozen, strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @cached_property
    def _params(self) -> dict[tuple[str, np.dtype, int], np.ndarray]:
        return {}

    def param(self, name: str, values: Any, x: np.ndarray, axis: int, dtype: np.dtype | None = None) -> np.ndarray:
        """:func:`per_feature` for ``values``, built once per (dtype, rank) and reused: the hot path then only
        checks the feature count."""
        dt = x.dtype if dtype is None else dtype
        key = (name, dt, x.ndim)
        cache = self._params
        p = cache.get(key)
        if p is None:
            p = cache[key] = per_feature(getattr(self, "op", "step"), values, x, axis, dt)
        elif p.ndim and x.shape[axis] != p.shape[0]:
            per_feature(getattr(self, "op", "step"), values, x, axis, dt)  # raises, naming both counts
        return p

    @property
    def fitted(self) -> bool:
        """True when every statistic this step needs is set (steps without statistics always are)."""
        return True

    def fit(self, x: np.ndarray, names: Sequence[str] | None = None) -> "StepBase":
        """A copy with statistics fitted on training data ``x`` (as it arrives at this step)."""
        return self


class Step(Protocol):
    op: str

    def apply(self, x: np.ndarray, tally: Tally) -> np.ndarray: ...


def require_float(op: str, x: np.ndarray) -> np.ndarray:
    """``x`` as floating point (ints and bools converted to float32); other kinds are rejected by name."""
    kind = x.dtype.kind
    if kind == "f":
        return x
    if kind in "iub":
        return x.astype(np.float32)
    raise PreprocessingError(f"{op}: expected numbers, got dtype {x.dtype}; send numeric arrays")


def require_ndim(op: str, x: np.ndarray, at_least: int, what: str) -> None:
    if x.ndim < at_least:
        raise PreprocessingError(f"{op}: expected at least {at_least} dimensions ({what}), got shape {list(x.shape)}")


def per_feature(op: str, values: Any, x: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """A scalar or per-feature parameter shaped to broadcast against ``x`` along ``axis``."""
    p = np.asarray(values, dtype=dtype)
    if p.ndim == 0:
        return p
    ax = axis % x.ndim if x.ndim else 0
    if x.ndim == 0 or x.shape[ax] != p.shape[0]:
        got = x.shape[ax] if x.ndim else 0
        raise PreprocessingError(f"{op}: input has {got} features along axis {axis} (shape {list(x.shape)}), the spec has {p.shape[0]}")
    return p.reshape((-1,) + (1,) * (x.ndim - 1 - ax))


def feature_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """How many True values per feature (along ``axis``) in a boolean mask."""
    if mask.ndim == 0:
        return np.asarray([int(mask)])
    m = np.moveaxis(mask, axis, -1) if axis not in (-1, mask.ndim - 1) else mask
    return m.reshape(-1, m.shape[-1]).sum(axis=0)


def first_bad_feature(mask: np.ndarray, axis: int) -> int:
    """Index (along ``axis``) of the first feature with a True value in ``mask``."""
    return int(np.flatnonzero(feature_counts(mask, axis))[0])


def reject_nonfinite(op: str, x: np.ndarray, tally: Tally) -> None:
    """Raise naming the first feature (last axis) holding NaN/inf; filters cannot compute with them."""
    finite = np.isfinite(x)
    if not finite.all():
        raise PreprocessingError(f"{op}: {tally.feature(first_bad_feature(~finite, -1))} is NaN or infinite; add an impute step before {op}")



def all_finite(x: np.ndarray) -> bool:
    """True when no element of float array ``x`` is NaN or ±inf (no warnings, whatever the values)."""
    return bool(np.isfinite(x).all())
