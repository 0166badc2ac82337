"""The sliding window of bin indices that PSI and KS share: constant memory, one numpy pass per sample."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from ..reference import Histogram



def chi2_quantile(p: float, dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (no scipy on the device)."""
    z = NormalDist().inv_cdf(p)
    k = max(dof, 1)
    return k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3


class BinnedWindow:
    """The last ``window`` samples of ``F`` features, kept as bin indices plus per-feature bin counts.

    Memory is ``window x F`` small integers and ``F x bins`` counts, whatever the stream length.
    """

    def __init__(self, reference: Histogram | Sequence[Histogram], window: int, pseudo: float = 0.5) -> None:
        hists = [reference] if isinstance(reference, Histogram) else list(reference)
        if not hists:
            raise ValueError("a drift detector needs at least one reference histogram")
        if window < 10:
            raise ValueError(f"window must be at least 10 samples, got {window}")
        width = max(len(h.cuts) for h in hists)
        self.features = len(hists)
        self.window = int(window)
        self.cuts = np.full((self.features, max(width, 1)), np.inf)
        self.ref = np.ones((self.features, self.cuts.shape[1] + 1))  # 1 where a feature has no such bin: adds 0 to PSI
        self.valid = np.zeros_like(self.ref, dtype=bool)
        for i, h in enumerate(hists):
            self.cuts[i, : len(h.cuts)] = h.cuts
            self.ref[i, : len(h.counts)] = h.probabilities(pseudo)
            self.valid[i, : len(h.counts)] = True
        self.bins = self.valid.sum(axis=1)  # per feature
        self.reference_size = np.array([sum(h.counts) for h in hists], dtype=np.float64)
        self.pseudo = pseudo
        self.counts = np.zeros(self.ref.shape, dtype=np.int64)
        # The ring holds each sample's flat index into `counts` (bin + feature offset): leaving samples are
        # un-counted with one bincount, no per-call offset arithmetic.
        self._ring = np.zeros((self.window, self.features), dtype=np.int32)
        self._rows = np.arange(self.features)
        self.n = 0
        self._pos = 0
        self.last = np.zeros(self.features, dtype=np.int64)  # bin indices of the latest sample (for sketches)
        self.added = np.zeros(self.counts.size, dtype=np.int64)  # flat counts the latest push_many added (for sketches)
        self._base = (self._rows * self.counts.shape[1])[None, :]  # flat offset of each feature's row in `counts`
        self._maxbin = (self.bins - 1)[None, :].astype(np.uint8)
        # (cuts, 1, features): one broadcast comparison of a whole block against every cut, summed over the
        # cuts axis (contiguous adds) — 2-3x faster than a comparison per cut for the agent's blocks.
        self._cuts3 = np.ascontiguousarray(self.cuts.T)[:, None, :]
        if self.cuts.shape[1] > 254:
            raise ValueError(f"at most 255 bins per feature, got {self.cuts.shape[1] + 1}")

    def push(self, x: Any) -> None:
        """Add one sample (one value per feature)."""
        self.push_many(np.asarray(x, dtype=np.float64).reshape(1, -1))

    def bin_indices(self, xs: np.ndarray) -> np.ndarray:
        """``(k, features)`` bin indices (uint8) of ``(k, features)`` values on the reference cuts.

        Bin ``j`` of a feature holds ``cuts[j-1] <= x < cuts[j]`` (``np.searchsorted(cuts, x, side="right")``);
        a NaN falls in bin 0 and +inf in the last bin (comparisons with NaN are false)."""
        idx = (xs[None] >= self._cuts3).sum(axis=0, dtype=np.uint8)
        np.minimum(idx, self._maxbin, out=idx)  # +inf passes the +inf padding: keep it in the feature's last bin
        return idx

    def push_many(self, xs: np.ndarray) -> np.ndarray:
        """Add ``k`` samples at once (``(k, features)``, oldest first); returns their ``(k, features)`` bin indices.

        A NaN falls in bin 0 and +inf in the last bin (comparisons with NaN are false)."""
        xs = np.asarray(xs, dtype=np.float64)
        if xs.ndim != 2 or xs.shape[1] != self.features:
            raise ValueError(f"expected {self.features} feature values per sample, got shape {list(xs.shape)}")
        k = xs.shape[0]
        if k == 0:
            self.added[:] = 0
            return np.zeros((0, self.features), dtype=np.int64)
        if k > self.window:  # only the last `window` samples can stay
            xs = xs[-self.window :]
            k = self.window
        idx = self.bin_indices(xs)
        flat_idx = idx + self._base  # (k, features) int64 flat indices into `counts`
        flat = self.counts.reshape(-1)
        size = flat.shape[0]
        self.added = np.bincount(flat_idx.reshape(-1), minlength=size)
        flat += self.added
        # the positions written now are [pos, pos + k) modulo the window: at most two slices of the ring
        p, w = self._pos, self.window
        segments = ((p, min(p + k, w)), (0, p + k - w)) if p + k > w else ((p, p + k),)
        written = 0
        for a, b in segments:
            # positions [0, n) hold samples (the ring fills from 0 before it wraps): those leave the window now
            leave_end = b if self.n >= w else min(b, self.n)
            if leave_end > a:
                flat -= np.bincount(self._ring[a:leave_end].reshape(-1), minlength=size)
            self._ring[a:b] = flat_idx[written : written + (b - a)]
            written += b - a
        self.n = min(w, self.n + k)
        self._pos = int((p + k) % w)
        self.last = idx[-1].astype(np.int64)
        return idx

    @property
    def full(self) -> bool:
        return self.n >= self.window

    def window_probabilities(self) -> np.ndarray:
        """Bin probabilities of the window with the same pseudo-counts as the reference; 1 where a bin is not valid."""
        c = self.counts + self.pseudo
        p = c / (self.n + self.pseudo * self.bins)[:, None]
        return np.where(self.valid, p, 1.0)

    def reset(self) -> None:
        self.counts[:] = 0
        self.n = 0
        self._pos = 0


class WindowDetector:
    """What PSI and KS share: a :class:`BinnedWindow`, a statistic per feature checked every ``check_every``
    samples once the window is full, and the river-style surface (``update``, ``drift_detected``, ``score``).
    A subclass sets ``_w``, ``threshold`` and ``check_every`` and computes its statistic in ``_statistic``."""

    _w: BinnedWindow
    threshold: np.ndarray
    check_every: int

    def _start(self) -> None:
        self.values = np.zeros(self._w.features)
        self.score = 0.0
        self.drift_detected = False
        self._since = 0

    def _statistic(self) -> np.ndarray:
        raise NotImplementedError

    def update(self, x: Any) -> None:
        """Add one sample (a scalar, or one value per feature)."""
        self.update_many(np.asarray(x, dtype=np.float64).reshape(1, -1))

    def update_many(self, xs: np.ndarray) -> np.ndarray:
        """Add ``(k, features)`` samples at once (one statistic per call at most: the agent's block path);
        returns their bin indices."""
        w = self._w
        idx = w.push_many(xs)
        self._since += len(idx)
        if self._since < self.check_every or not w.full:
            self.drift_detected = False if not w.full else self.drift_detected
            return idx
        self._since = 0
        self.values = self._statistic()
        self.score = float((self.values / self.threshold).max())
        self.drift_detected = self.score > 1.0
        return idx

    @property
    def drifted(self) -> list[int]:
        """Indices of the features over their threshold at the last check."""
        return np.flatnonzero(self.values > self.threshold).tolist()

    @property
    def counts(self) -> np.ndarray:
        """Window counts per feature and bin (read-only view)."""
        return self._w.counts

    def reset(self) -> None:
        self._w.reset()
        self.values[:] = 0
        self.score, self.drift_detected, self._since = 0.0, False, 0
