"""Page-Hinkley: a sequential test for a change in the mean of a scalar stream."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np


class PageHinkley:
    """Two-sided Page-Hinkley test on one scalar per sample (e.g. a standardised summary of the input).

    Keeps the cumulative deviations ``m_t = sum (x_i - mean - delta)`` (up) and
    ``sum (x_i - mean + delta)`` (down) and signals when either moves more than ``threshold`` away from its
    extreme. ``mean`` is the reference mean when it is known (the bundle's reference statistics: then this
    is a CUSUM against the lab's data), else the running mean of the stream since the last reset. After a
    detection the test restarts, so ``drift_detected`` is true for exactly one sample per change.
    ``score`` is the larger statistic divided by ``threshold``.

    Parameters:
        delta: the change (in the units of ``x``) that is tolerated: half the smallest shift worth detecting.
        threshold: the detection threshold ``lambda``; larger means fewer false alarms and later detection.
        mean: reference mean, or None for the running mean.
        min_instances: samples before a detection is allowed.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(3)
        >>> det = PageHinkley(delta=0.5, threshold=25.0, mean=0.0)
        >>> hits = 0
        >>> for v in rng.normal(size=2000):
        ...     det.update(v)
        ...     hits += det.drift_detected
        >>> hits
        0
        >>> for i, v in enumerate(rng.normal(loc=2.0, size=200)):
        ...     det.update(v)
        ...     if det.drift_detected:
        ...         break
        >>> det.drift_detected, i < 30
        (True, True)

    References: Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2), 100-115.
    """

    def __init__(self, delta: float = 0.5, threshold: float = 25.0, mean: float | None = None, min_instances: int = 30) -> None:
        if delta < 0 or threshold <= 0:
            raise ValueError(f"delta must be >= 0 and threshold > 0, got delta={delta}, threshold={threshold}")
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.reference_mean = mean
        self.min_instances = int(min_instances)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self._mean = 0.0
        self._up = self._up_min = 0.0
        self._down = self._down_max = 0.0
        self.score = 0.0
        self.drift_detected = False

    def update(self, x: float) -> None:
        """Add one value; a NaN or inf is ignored (it says nothing about the mean)."""
        x = float(x)
        if not math.isfinite(x):
            return
        if self.drift_detected:
            self.reset()
        self.n += 1
        if self.reference_mean is None:
            self._mean += (x - self._mean) / self.n
            mean = self._mean
        else:
            mean = self.reference_mean
        self._up += x - mean - self.delta
        self._up_min = min(self._up_min, self._up)
        self._down += x - mean + self.delta
        self._down_max = max(self._down_max, self._down)
        stat = max(self._up - self._up_min, self._down_max - self._down)
        self.score = stat / self.threshold
        self.drift_detected = self.n >= self.min_instances and stat > self.threshold

    def update_many(self, xs: "np.ndarray | list[float]") -> int:
        """Add several values (oldest first), vectorised when the reference mean is known; returns how many
        changes were detected among them (the test restarts after each, as with :meth:`update`)."""
        import numpy as np

        v = np.asarray(xs, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        hits = 0
        if self.reference_mean is None:
            for x in v:
                self.update(x)
                hits += self.drift_detected
            return hits
        i = 0
        while i < len(v):
            if self.drift_detected:
                self.reset()
            d = v[i:] - self.reference_mean
            up = self._up + np.cumsum(d - self.delta)
            up_min = np.minimum(np.minimum.accumulate(up), self._up_min)
            down = self._down + np.cumsum(d + self.delta)
            down_max = np.maximum(np.maximum.accumulate(down), self._down_max)
            stat = np.maximum(up - up_min, down_max - down)
            n = self.n + np.arange(1, len(d) + 1)
            over = np.flatnonzero((stat > self.threshold) & (n >= self.min_instances))
            j = int(over[0]) if len(over) else len(d) - 1
            self._up, self._up_min, self._down, self._down_max = float(up[j]), float(up_min[j]), float(down[j]), float(down_max[j])
            self.n = int(n[j])
            self.score = float(stat[j]) / self.threshold
            self.drift_detected = bool(len(over))
            hits += self.drift_detected
            i += j + 1
        return hits



class PageHinkleyBank:
    """``columns`` two-sided Page-Hinkley tests against known reference means, updated together.

    Exactly what ``columns`` :class:`PageHinkley` objects with ``mean=`` would compute (restart after each
    detection included), with the state kept in arrays so that a block of ``(k, columns)`` values costs one
    set of numpy calls for all columns; a column in which a test fires is replayed alone, exactly. NaN/inf
    values are skipped per column, as :meth:`PageHinkley.update` does. ``score`` and ``drift_detected`` are
    per-column arrays; ``detector(j)`` gives column ``j`` as a :class:`PageHinkley` snapshot.
    """

    def __init__(self, columns: int, delta: float = 0.5, threshold: float = 25.0, mean: "float | Sequence[float]" = 0.0,
                 min_instances: int = 30) -> None:
        import numpy as np

        if delta < 0 or threshold <= 0:
            raise ValueError(f"delta must be >= 0 and threshold > 0, got delta={delta}, threshold={threshold}")
        self.columns = int(columns)
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (self.columns,)).copy()
        self.min_instances = int(min_instances)
        z = lambda: np.zeros(self.columns)  # noqa: E731
        self.n = np.zeros(self.columns, dtype=np.int64)
        self._up, self._up_min, self._down, self._down_max = z(), z(), z(), z()
        self.score = z()
        self.drift_detected = np.zeros(self.columns, dtype=bool)

    def detector(self, j: int) -> PageHinkley:
        d = PageHinkley(self.delta, self.threshold, mean=float(self.mean[j]), min_instances=self.min_instances)
        d.n = int(self.n[j])
        d._up, d._up_min, d._down, d._down_max = (float(a[j]) for a in (self._up, self._up_min, self._down, self._down_max))
        d.score, d.drift_detected = float(self.score[j]), bool(self.drift_detected[j])
        return d

    def _store(self, j: int, d: PageHinkley) -> None:
        self.n[j] = d.n
        self._up[j], self._up_min[j], self._down[j], self._down_max[j] = d._up, d._up_min, d._down, d._down_max
        self.score[j], self.drift_detected[j] = d.score, d.drift_detected

    def update_many(self, values: "np.ndarray") -> "np.ndarray":
        """Add ``(k, columns)`` values (oldest first); returns the number of detections per column."""
        import numpy as np

        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.columns:
            raise ValueError(f"expected (k, {self.columns}) values, got shape {list(v.shape)}")
        hits = np.zeros(self.columns, dtype=np.int64)
        if not len(v):
            return hits
        was = self.drift_detected
        if was.any():  # a test that fired restarts with its next value
            for a in (self._up, self._up_min, self._down, self._down_max, self.score):
                a[was] = 0.0
            self.n[was] = 0
            self.drift_detected = np.zeros(self.columns, dtype=bool)
        finite = np.isfinite(v).all(axis=0)
        dev = v - self.mean
        up = self._up + np.add.accumulate(dev - self.delta, axis=0)
        up_min = np.minimum(np.minimum.accumulate(up, axis=0), self._up_min)
        down = self._down + np.add.accumulate(dev + self.delta, axis=0)
        down_max = np.maximum(np.maximum.accumulate(down, axis=0), self._down_max)
        stat = np.maximum(up - up_min, down_max - down)
        n = self.n + np.arange(1, len(v) + 1)[:, None]
        over = ((stat > self.threshold) & (n >= self.min_instances)).any(axis=0)
        replay = over | ~finite
        if not replay.any():  # the common case: no test fired, every value finite — whole arrays, no masks
            self._up, self._up_min, self._down, self._down_max = up[-1], up_min[-1], down[-1], down_max[-1]
            self.n = n[-1]
            self.score = stat[-1] / self.threshold
            return hits
        keep = ~replay
        self._up[keep], self._up_min[keep] = up[-1, keep], up_min[-1, keep]
        self._down[keep], self._down_max[keep] = down[-1, keep], down_max[-1, keep]
        self.n[keep] = n[-1, keep]
        self.score[keep] = stat[-1, keep] / self.threshold
        for j in np.flatnonzero(replay):  # rare: a detection (restart inside the block) or a NaN to skip
            d = self.detector(j)
            hits[j] = d.update_many(v[:, j])
            self._store(j, d)
        return hits
