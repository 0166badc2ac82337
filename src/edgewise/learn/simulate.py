"""Federated rounds over a simulated fleet whose devices come and go: the evidence for docs/learn.md.

Each round the server samples every device with probability ``q = cohort / devices`` (Poisson sampling, what
the DP accounting assumes), a random ``offline_fraction`` of the fleet is unreachable that round (their replies
are simply missing), the devices that were sampled *and* online train locally (:mod:`.local`) and send deltas,
and the server aggregates what arrived (:mod:`.aggregate`; with DP, noise and the denominator do not depend on
who replied). Accuracy is measured on the server's held-out evaluation set after every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .aggregate import Aggregator, ClientUpdate, aggregate, apply
from .dp import PrivacyBudget, calibrate_noise
from .local import Recipe, accuracy, delta_of, init_head, train_head


@dataclass
class FleetSim:
    devices: int = 50
    rounds: int = 30
    cohort: int = 10
    offline_fraction: float = 0.3
    recipe: Recipe = field(default_factory=lambda: Recipe(epochs=2, batch_size=16, lr=0.2))
    aggregator: Aggregator = "fedavg"
    clip_norm: float | None = None
    target_epsilon: float | None = None  # DP-FedAvg when set
    delta: float = 1e-5
    server_lr: float = 1.0
    seed: int = 0
    poison: Callable[[int, ClientUpdate], ClientUpdate] | None = None  # (device index, update) -> update: a hostile device


@dataclass
class SimResult:
    accuracy: list[float]
    participants: list[int]
    epsilon: list[float]
    noise_multiplier: float = 0.0
    rejected: int = 0

    @property
    def final(self) -> float:
        return self.accuracy[-1] if self.accuracy else 0.0


def run(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], x_eval: np.ndarray, y_eval: np.ndarray, sim: FleetSim) -> SimResult:
    rng = np.random.default_rng(sim.seed)
    classes = int(max(y.max(), y_eval.max())) + 1
    w = init_head(x.shape[1], classes, seed=sim.seed)
    q = min(1.0, sim.cohort / len(parts))
    z, budget = 0.0, None
    if sim.target_epsilon is not None:
        if sim.clip_norm is None:
            raise ValueError("DP-FedAvg needs clip_norm")
        z = calibrate_noise(sim.target_epsilon, sim.delta, q, sim.rounds)
        budget = PrivacyBudget(sim.target_epsilon, sim.delta)
    accs, counts, eps = [], [], []
    rejected = 0
    for r in range(sim.rounds):
        sampled = np.flatnonzero(rng.random(len(parts)) < q)
        online = rng.random(len(parts)) >= sim.offline_fraction
        updates = []
        for d in sampled:
            if not online[d]:
                continue  # sampled but offline: its reply never comes
            idx = parts[d]
            new, loss = train_head(w, x[idx], y[idx], sim.recipe, rng)
            u = ClientUpdate(f"dev-{d}", delta_of(new, w), len(idx), base_version=r, loss=loss)
            if sim.poison is not None:
                u = sim.poison(int(d), u)
            updates.append(u)
        if budget is not None:
            eps.append(budget.charge_round(q, z))
        if updates or z > 0:
            res = aggregate(w, updates, method=sim.aggregator, clip_norm=sim.clip_norm, noise_multiplier=z,
                            expected_count=max(1, round(q * len(parts))) if z > 0 else None, rng=rng)
            rejected += len(res.rejected)
            w = apply(w, res.delta, sim.server_lr)
        accs.append(accuracy(w, x_eval, y_eval))
        counts.append(len(updates))
    return SimResult(accs, counts, eps, z, rejected)


def centralized(x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, recipe: Recipe, epochs: int, seed: int = 0) -> float:
    """The same model trained on the union of all devices' data in one place: the ceiling FL is compared with."""
    rng = np.random.default_rng(seed)
    w = init_head(x.shape[1], int(max(y.max(), y_eval.max())) + 1, seed=seed)
    w, _ = train_head(w, x, y, Recipe(epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr), rng)
    return accuracy(w, x_eval, y_eval)
