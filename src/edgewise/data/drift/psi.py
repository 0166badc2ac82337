"""Population Stability Index over a sliding window, one value per feature."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..reference import Histogram
from ._window import BinnedWindow, WindowDetector, chi2_quantile


class PSI(WindowDetector):
    """PSI between the last ``window`` samples and the reference histogram, per feature.

    ``PSI = sum_k (p_k - q_k) ln(p_k / q_k)`` (window ``p``, reference ``q``). On unchanged data,
    ``PSI`` is about ``chi2(bins - 1) x (1/window + 1/reference_size)``, so the usual fixed rule of
    thumb (0.1 / 0.25) fires on small windows by chance alone. The threshold here is that chi-square
    quantile at ``1 - alpha / features`` (Bonferroni over features) for each feature's own number of
    bins, i.e. it is corrected for the window size and the reference size. ``score`` is the largest
    ``PSI / threshold`` over features (> 1: drift); ``drifted`` lists the features above 1.

    Parameters:
        reference: one :class:`~edgewise.data.reference.Histogram` per feature (or one).
        window: samples in the sliding window (memory: ``window x features`` int16).
        alpha: false-alarm probability of one check over all features.
        check_every: compute the statistic every this many samples (the window is updated on each).

    Example:
        >>> import numpy as np
        >>> from edgewise.data.reference import Histogram
        >>> rng = np.random.default_rng(1)
        >>> det = PSI(Histogram.fit(rng.normal(size=2000)), window=200)
        >>> for v in rng.normal(size=1000):
        ...     det.update(v)
        ...     assert not det.drift_detected
        >>> for i, v in enumerate(rng.normal(loc=1.0, size=500)):
        ...     det.update(v)
        ...     if det.drift_detected:
        ...         break
        >>> det.drift_detected, i < 100
        (True, True)

    References: Yurdakul, B. (2018). Statistical properties of population stability index. PhD thesis,
    Western Michigan University.
    """

    def __init__(self, reference: Histogram | Sequence[Histogram], window: int = 200, alpha: float = 1e-3, check_every: int = 1) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self._w = BinnedWindow(reference, window)
        self.alpha = alpha
        self.check_every = max(1, int(check_every))
        factor = 1.0 / self._w.window + 1.0 / np.maximum(self._w.reference_size, 1.0)
        per = 1.0 - alpha / self._w.features
        self.threshold = np.array([chi2_quantile(per, int(b) - 1) for b in self._w.bins]) * factor
        self._log_ref = np.log(self._w.ref)
        self._start()

    def _statistic(self) -> np.ndarray:
        p = self._w.window_probabilities()
        return np.sum((p - self._w.ref) * (np.log(p) - self._log_ref), axis=1)
