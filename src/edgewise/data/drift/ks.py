"""Two-sample Kolmogorov-Smirnov over a sliding window, on the reference's fixed bins, per feature."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..reference import Histogram
from ._window import BinnedWindow, WindowDetector


class KS(WindowDetector):
    """KS distance between the window and the reference, on the reference's bins, per feature.

    ``D = max_k |F_window(k) - F_reference(k)|`` over the cumulative bin counts (the binned statistic
    is never larger than the exact one, so the test stays conservative). The critical value is the
    asymptotic two-sample one for the actual sizes, ``c(a) sqrt(1/window + 1/reference_size)`` with
    ``c(a) = sqrt(-ln(a/2)/2)`` and ``a = alpha / features`` (Bonferroni): corrected for the window size.
    ``score`` is the largest ``D / critical`` (> 1: drift).

    Parameters:
        reference: one :class:`~edgewise.data.reference.Histogram` per feature (or one).
        window: samples in the sliding window.
        alpha: false-alarm probability of one check over all features.
        check_every: compute the statistic every this many samples.

    Example:
        >>> import numpy as np
        >>> from edgewise.data.reference import Histogram
        >>> rng = np.random.default_rng(2)
        >>> det = KS(Histogram.fit(rng.normal(size=2000), bins=20), window=200)
        >>> for v in rng.normal(size=1000):
        ...     det.update(v)
        ...     assert not det.drift_detected
        >>> for i, v in enumerate(rng.normal(scale=2.0, size=500)):
        ...     det.update(v)
        ...     if det.drift_detected:
        ...         break
        >>> det.drift_detected, i < 200
        (True, True)

    References: Smirnov, N. (1948). Table for estimating the goodness of fit of empirical distributions.
    Annals of Mathematical Statistics 19(2), 279-281.
    """

    def __init__(self, reference: Histogram | Sequence[Histogram], window: int = 200, alpha: float = 1e-3, check_every: int = 1) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self._w = BinnedWindow(reference, window, pseudo=0.0)
        self.alpha = alpha
        self.check_every = max(1, int(check_every))
        a = alpha / self._w.features
        c = math.sqrt(-0.5 * math.log(a / 2))
        self.threshold = c * np.sqrt(1.0 / self._w.window + 1.0 / np.maximum(self._w.reference_size, 1.0))
        self._ref_cdf = np.cumsum(np.where(self._w.valid, self._w.ref, 0.0), axis=1)
        self._start()

    def _statistic(self) -> np.ndarray:
        w = self._w
        cdf = np.cumsum(w.counts, axis=1) / w.n
        return np.abs(cdf - self._ref_cdf).max(axis=1)
