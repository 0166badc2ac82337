"""Non-IID splits of a data set across simulated devices: what a real fleet's data looks like."""

from __future__ import annotations

import numpy as np


def dirichlet_split(y: np.ndarray, devices: int, alpha: float = 0.5, seed: int = 0, min_size: int = 5) -> list[np.ndarray]:
    """Indices per device with class proportions drawn from Dirichlet(alpha) per class (Hsu et al. 2019):
    small alpha = strong class skew (a device sees mostly a few classes). Every device gets at least
    ``min_size`` samples (redrawn until it does, as is usual)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    if devices < 1 or devices * min_size > len(y):
        raise ValueError(f"cannot give {devices} devices at least {min_size} samples each from {len(y)}")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            share = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise RuntimeError("could not draw a split with the minimum size; raise alpha or lower min_size")


def contiguous_split(n: int, devices: int) -> list[np.ndarray]:
    """Consecutive chunks (recordings in their order: one chunk per device is a subject-like partition)."""
    return [np.asarray(c, dtype=np.int64) for c in np.array_split(np.arange(n), devices)]
