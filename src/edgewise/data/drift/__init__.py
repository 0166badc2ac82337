"""Drift detectors: one per file, all with the same tiny surface (river-style).

``update(x)`` adds one sample, ``drift_detected`` says whether the last update signalled drift and
``score`` how close the detector is to signalling (> 1 means it does; 1 is the threshold). Swapping
detectors is a one-word change.

- :class:`PSI`, :class:`KS`: a sliding window of per-feature values against the reference histograms
  (thresholds corrected for the window size and the number of features);
- :class:`PageHinkley`, :class:`ADWIN`: sequential change detectors on one scalar per sample.

numpy and the standard library only: they run inside the agent.
"""

from typing import Any, Protocol

from .adwin import ADWIN
from .ks import KS
from .page_hinkley import PageHinkley
from .psi import PSI


class DriftDetector(Protocol):
    drift_detected: bool
    score: float

    def update(self, x: Any) -> None: ...


__all__ = ["ADWIN", "KS", "PSI", "DriftDetector", "PageHinkley"]
