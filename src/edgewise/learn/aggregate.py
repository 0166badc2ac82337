"""Model updates and how the server combines them.

An update is a *delta* (device weights after local training minus the base weights it started from), so
aggregating is averaging deltas and the server's model moves by the result. Every update is checked before it
counts (known device, same tensors and shapes as the base, all finite) and clipped to an L2 norm bound, so one
broken or hostile device moves the model by at most ``clip_norm / cohort``; the robust aggregators bound it
further without trusting any single device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

Weights = dict[str, np.ndarray]
Aggregator = Literal["fedavg", "median", "trimmed_mean"]


class UpdateRejected(ValueError):
    """An update that must not count; ``reason`` is a stable code (wrong_shape, not_finite, unknown_tensor, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ClientUpdate:
    """One device's contribution to a round: its delta, how many samples it trained on, which model version it
    started from (``base_version``: the server's version counter, for staleness), and its training loss."""

    device_id: str
    delta: Weights
    num_samples: int
    base_version: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def check_update(update: ClientUpdate, base: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` has exactly the base's tensors, shapes, and only finite values."""
    missing = sorted(set(base) - set(update.delta))
    extra = sorted(set(update.delta) - set(base))
    if extra:
        raise UpdateRejected(f"update from {update.device_id} has tensors the model does not: {extra[:5]}", "unknown_tensor")
    if missing:
        raise UpdateRejected(f"update from {update.device_id} lacks tensors {missing[:5]}", "wrong_shape")
    for name, ref in base.items():
        d = np.asarray(update.delta[name])
        if d.shape != ref.shape:
            raise UpdateRejected(f"update from {update.device_id}: {name} has shape {list(d.shape)}, the model {list(ref.shape)}", "wrong_shape")
        if not np.isfinite(d).all():
            raise UpdateRejected(f"update from {update.device_id}: {name} holds NaN or inf", "not_finite")
    if update.num_samples < 1:
        raise UpdateRejected(f"update from {update.device_id} trained on {update.num_samples} samples", "no_samples")


def flatten(w: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(w[n], dtype=np.float64).ravel() for n in names]) if names else np.zeros(0)


def unflatten(v: np.ndarray, like: Mapping[str, np.ndarray], names: Sequence[str]) -> Weights:
    out: Weights = {}
    i = 0
    for n in names:
        ref = like[n]
        out[n] = v[i : i + ref.size].reshape(ref.shape).astype(ref.dtype, copy=False)
        i += ref.size
    return out


def clip_vector(v: np.ndarray, max_norm: float | None) -> tuple[np.ndarray, float]:
    """``v`` scaled down to L2 norm ``max_norm`` if it is longer; returns (clipped, original norm)."""
    norm = float(np.linalg.norm(v))
    if max_norm is None or norm <= max_norm or norm == 0.0:
        return v, norm
    return v * (max_norm / norm), norm


def combine(vectors: np.ndarray, weights: np.ndarray, method: Aggregator = "fedavg", trim_fraction: float = 0.1) -> np.ndarray:
    """Combine ``(n, d)`` update vectors into one ``d`` vector.

    fedavg: mean weighted by ``weights`` (sample counts); median: coordinate-wise median (unweighted: a device
    must not buy influence by claiming many samples); trimmed_mean: per coordinate, drop the ``trim_fraction``
    largest and smallest values, average the rest."""
    n = len(vectors)
    if n == 0:
        raise ValueError("no updates to combine")
    if method == "fedavg":
        w = np.asarray(weights, dtype=np.float64)
        return (vectors * (w / w.sum())[:, None]).sum(axis=0)
    if method == "median":
        return np.median(vectors, axis=0)
    if method == "trimmed_mean":
        k = int(math.floor(trim_fraction * n))
        if n - 2 * k < 1:
            k = (n - 1) // 2
        s = np.sort(vectors, axis=0)
        return s[k : n - k].mean(axis=0)
    raise ValueError(f"unknown aggregator {method!r}: use fedavg, median or trimmed_mean")


@dataclass
class RoundResult:
    """What the server did with one set of updates."""

    delta: Weights
    used: int
    rejected: dict[str, str]  # device -> reason
    clipped: int
    norms: list[float]
    noise_std: float = 0.0


def aggregate(
    base: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    method: Aggregator = "fedavg",
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
    noise_multiplier: float = 0.0,
    expected_count: int | None = None,
    rng: np.random.Generator | None = None,
    staleness_weights: Sequence[float] | None = None,
) -> RoundResult:
    """Check, clip and combine ``updates`` into one delta for ``base``.

    With ``noise_multiplier > 0`` this is DP-FedAvg (McMahan et al. 2018): every update is clipped to
    ``clip_norm``, the clipped updates are summed with equal weight, Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` is added to the sum, and the sum is divided by the *expected* cohort size
    ``expected_count`` (not the number that replied), so a round with missing replies has the same sensitivity
    and is released as accounted.
    """
    names = sorted(base)
    rejected: dict[str, str] = {}
    vecs, weights, norms = [], [], []
    clipped = 0
    for i, u in enumerate(updates):
        try:
            check_update(u, base)
        except UpdateRejected as exc:
            rejected[u.device_id] = exc.reason
            continue
        v, norm = clip_vector(flatten(u.delta, names), clip_norm)
        clipped += clip_norm is not None and norm > clip_norm
        norms.append(norm)
        vecs.append(v)
        sw = staleness_weights[i] if staleness_weights is not None else 1.0
        weights.append((1.0 if noise_multiplier > 0 else u.num_samples) * sw)
    zero = {n: np.zeros_like(base[n]) for n in names}
    if not vecs:
        return RoundResult(zero, 0, rejected, clipped, norms)
    mat = np.stack(vecs)
    noise_std = 0.0
    if noise_multiplier > 0:
        if clip_norm is None or method != "fedavg":
            raise ValueError("DP-FedAvg needs clip_norm and the fedavg aggregator")
        rng = rng or np.random.default_rng()
        denom = float(expected_count or len(vecs))
        total = (mat * np.asarray(weights)[:, None]).sum(axis=0)
        noise_std = noise_multiplier * clip_norm
        combined = (total + rng.normal(0.0, noise_std, size=total.shape)) / denom
    else:
        combined = combine(mat, np.asarray(weights), method, trim_fraction)
    return RoundResult(unflatten(combined, base, names), len(vecs), rejected, clipped, norms, noise_std / float(expected_count or len(vecs)) if noise_std else 0.0)


def apply(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], server_lr: float = 1.0) -> Weights:
    return {n: (base[n] + server_lr * delta[n]).astype(base[n].dtype) for n in base}


class FedBuff:
    """Buffered asynchronous aggregation (Nguyen et al. 2022): updates are accepted whenever they arrive; every
    ``buffer_size`` of them the server aggregates and its version advances. An update computed from a version
    more than ``max_staleness`` behind is dropped; fresher ones are weighted by ``1 / sqrt(1 + staleness)``. No
    round ever waits for a device that left."""

    def __init__(self, base: Weights, *, buffer_size: int = 10, max_staleness: int = 5, method: Aggregator = "fedavg",
                 clip_norm: float | None = None, server_lr: float = 1.0) -> None:
        if buffer_size < 1 or max_staleness < 0:
            raise ValueError("buffer_size must be >= 1 and max_staleness >= 0")
        self.weights = {k: np.array(v) for k, v in base.items()}
        self.version = 0
        self.buffer_size, self.max_staleness = buffer_size, max_staleness
        self.method, self.clip_norm, self.server_lr = method, clip_norm, server_lr
        self._buffer: list[ClientUpdate] = []
        self.dropped_stale = 0
        self.rejected: dict[str, str] = {}

    def submit(self, update: ClientUpdate) -> RoundResult | None:
        """Accept one update; returns the aggregation result when this update filled the buffer."""
        staleness = self.version - update.base_version
        if staleness > self.max_staleness or staleness < 0:
            self.dropped_stale += 1
            return None
        try:
            check_update(update, self.weights)
        except UpdateRejected as exc:
            self.rejected[update.device_id] = exc.reason
            return None
        self._buffer.append(update)
        if len(self._buffer) < self.buffer_size:
            return None
        buf, self._buffer = self._buffer, []
        sw = [1.0 / math.sqrt(1.0 + (self.version - u.base_version)) for u in buf]
        result = aggregate(self.weights, buf, method=self.method, clip_norm=self.clip_norm, staleness_weights=sw)
        self.weights = apply(self.weights, result.delta, self.server_lr)
        self.version += 1
        return result
