"""Page-Hinkley: a sequential test for a change in the mean of a scalar stream."""

from __future__ import annotations

import math


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
