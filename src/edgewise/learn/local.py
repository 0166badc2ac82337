"""What a device runs in a federated round when it has no torch: a softmax head trained in numpy.

The head is the model's last linear layer (``W`` of shape ``(features, classes)``, ``b`` of ``(classes,)``),
trained on the features that reach it (for a linear model, the preprocessed inputs themselves). FedProx
(Li et al. 2020) adds ``mu/2 * ||w - w_base||^2`` to the loss so devices with very different data do not
drift far from the global model between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aggregate import Weights


@dataclass(frozen=True)
class Recipe:
    """Local training: ``epochs`` over the device's data in mini-batches of ``batch_size`` at learning rate ``lr``;
    ``mu`` > 0 is FedProx; ``layers`` is "head" (the last linear layer) or "all" (torch devices only)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    mu: float = 0.0
    layers: str = "head"


def init_head(features: int, classes: int, seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {"W": (rng.normal(0, 0.01, size=(features, classes))).astype(np.float32), "b": np.zeros(classes, dtype=np.float32)}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(w: Weights, x: np.ndarray) -> np.ndarray:
    return _softmax(x @ w["W"] + w["b"])


def accuracy(w: Weights, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(w, x).argmax(axis=1) == y).mean()) if len(y) else 0.0


def train_head(base: Weights, x: np.ndarray, y: np.ndarray, recipe: Recipe, rng: np.random.Generator | None = None) -> tuple[Weights, float]:
    """Mini-batch SGD on cross-entropy (+ FedProx); returns (new weights, mean training loss of the last epoch)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as samples and at least one sample, got {len(x)} samples and {len(y)} labels")
    rng = rng or np.random.default_rng()
    W = base["W"].astype(np.float64).copy()
    b = base["b"].astype(np.float64).copy()
    W0, b0 = W.copy(), b.copy()
    classes = W.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must be in [0, {classes}), got {int(y.min())}..{int(y.max())}")
    xf = x.astype(np.float64)
    loss = 0.0
    for _ in range(recipe.epochs):
        order = rng.permutation(len(x))
        losses = []
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb, yb = xf[idx], y[idx]
            p = _softmax(xb @ W + b)
            losses.append(-np.log(np.maximum(p[np.arange(len(yb)), yb], 1e-12)).mean())
            p[np.arange(len(yb)), yb] -= 1.0
            gW = xb.T @ p / len(yb)
            gb = p.mean(axis=0)
            if recipe.mu > 0:
                gW += recipe.mu * (W - W0)
                gb += recipe.mu * (b - b0)
            W -= recipe.lr * gW
            b -= recipe.lr * gb
        loss = float(np.mean(losses))
    return {"W": W.astype(base["W"].dtype), "b": b.astype(base["b"].dtype)}, loss


def delta_of(new: Weights, base: Weights) -> Weights:
    return {k: (new[k].astype(np.float64) - base[k].astype(np.float64)).astype(np.float32) for k in base}
