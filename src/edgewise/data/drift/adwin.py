"""ADWIN: an adaptive window that drops its older part when the two parts' means differ."""

from __future__ import annotations

import math


class ADWIN:
    """ADaptive WINdowing on one scalar per sample.

    The window is kept as an exponential histogram (at most ``max_buckets`` buckets per size 1, 2, 4, ...,
    at most ``max_levels`` sizes, so memory is constant: ``max_buckets x max_levels`` buckets, and the
    window is at most ``max_buckets x 2^max_levels`` samples). Every ``clock`` samples, each split of the
    window into an older and a newer part is tested; when their means differ by more than the
    Bernstein-style bound ``sqrt(2 m v ln(2 ln(n)/delta)) + 2/3 m ln(2 ln(n)/delta)`` (``v`` the window's
    variance, ``m = 1/n0 + 1/n1``), the oldest bucket is dropped and ``drift_detected`` is set.
    ``score`` is the largest ``|mean difference| / bound`` found at the last check.

    Parameters:
        delta: confidence; smaller means fewer false alarms and later detection.
        clock: test every this many samples.
        max_buckets: buckets per size (the resolution of the cut points).
        max_levels: bucket sizes kept (bounds memory and the window length).
        min_window: samples each side of a cut must have.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(4)
        >>> det = ADWIN(delta=0.002)
        >>> hits = 0
        >>> for v in rng.normal(size=2000):
        ...     det.update(v)
        ...     hits += det.drift_detected
        >>> hits
        0
        >>> for i, v in enumerate(rng.normal(loc=1.0, size=500)):
        ...     det.update(v)
        ...     if det.drift_detected:
        ...         break
        >>> det.drift_detected, i < 100
        (True, True)

    References: Bifet, A. and Gavaldà, R. (2007). Learning from time-changing data with adaptive
    windowing. SIAM International Conference on Data Mining, 443-448.
    """

    def __init__(self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5, max_levels: int = 12, min_window: int = 16) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = float(delta)
        self.clock = max(1, int(clock))
        self.max_buckets = max(2, int(max_buckets))
        self.max_levels = max(1, int(max_levels))
        self.min_window = max(1, int(min_window))
        self.reset()

    def reset(self) -> None:
        # _levels[i]: buckets of 2**i samples, oldest first; a bucket is [sum, m2] (m2: sum of squared deviations)
        self._levels: list[list[list[float]]] = [[] for _ in range(self.max_levels)]
        self.width = 0
        self.total = 0.0
        self.m2 = 0.0
        self._tick = 0
        self.score = 0.0
        self.drift_detected = False

    @property
    def mean(self) -> float:
        return self.total / self.width if self.width else 0.0

    @property
    def variance(self) -> float:
        return self.m2 / self.width if self.width else 0.0

    def update(self, x: float) -> None:
        """Add one value; a NaN or inf is ignored."""
        x = float(x)
        if not math.isfinite(x):
            return
        self.drift_detected = False
        if self.width:
            d = x - self.mean
            self.m2 += d * d * self.width / (self.width + 1)
        self.width += 1
        self.total += x
        self._levels[0].append([x, 0.0])
        self._compress()
        self._tick += 1
        if self._tick >= self.clock:
            self._tick = 0
            self.drift_detected = self._detect()

    def _compress(self) -> None:
        for i, level in enumerate(self._levels):
            if len(level) <= self.max_buckets:
                return
            (s1, v1), (s2, v2) = level.pop(0), level.pop(0)
            n = 2.0**i
            merged = [s1 + s2, v1 + v2 + n / 2 * (s1 / n - s2 / n) ** 2]
            if i + 1 < self.max_levels:
                self._levels[i + 1].append(merged)
            else:  # the window is at its longest: forget the oldest samples
                self._remove(merged, 2 * n)

    def _remove(self, bucket: list[float], n: float) -> None:
        s, v = bucket
        rest = self.width - n
        if rest <= 0:
            self.width, self.total, self.m2 = 0, 0.0, 0.0
            return
        mu_b, mu_rest = s / n, (self.total - s) / rest
        self.m2 = max(0.0, self.m2 - v - n * rest / self.width * (mu_b - mu_rest) ** 2)
        self.total -= s
        self.width = int(rest)

    def _buckets_oldest_first(self) -> list[tuple[float, float]]:
        out = []
        for i in range(self.max_levels - 1, -1, -1):
            n = 2.0**i
            out.extend((n, b[0]) for b in self._levels[i])
        return out

    def _detect(self) -> bool:
        found = False
        while self.width > 2 * self.min_window:
            n = self.width
            var = self.variance
            dd = math.log(2 * math.log(n) / self.delta)
            n0 = 0.0
            s0 = 0.0
            cut = False
            best = 0.0
            for nb, sb in self._buckets_oldest_first()[:-1]:
                n0 += nb
                s0 += sb
                n1 = n - n0
                if n0 < self.min_window or n1 < self.min_window:
                    continue
                m = 1.0 / n0 + 1.0 / n1
                eps = math.sqrt(2 * m * var * dd) + 2.0 / 3.0 * dd * m
                diff = abs(s0 / n0 - (self.total - s0) / n1)
                best = max(best, diff / eps if eps > 0 else 0.0)
                if diff > eps:
                    cut = True
                    break
            self.score = best
            if not cut:
                break
            found = True
            self._drop_oldest()
        return found

    def _drop_oldest(self) -> None:
        for i in range(self.max_levels - 1, -1, -1):
            if self._levels[i]:
                self._remove(self._levels[i].pop(0), 2.0**i)
                return
