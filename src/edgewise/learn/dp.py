"""Differential privacy for federated rounds and for telemetry, accounted with Google's ``dp-accounting``.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", 2018): each round draws
every device of the population independently with probability ``q = cohort / population`` (Poisson sampling),
clips every update to L2 norm ``clip_norm``, adds Gaussian noise ``N(0, (z * clip_norm)^2)`` to the sum and
divides by the expected cohort size. One round is the DP event ``PoissonSampled(q, Gaussian(z))`` at the level
of a device (user-level DP: everything one device contributes in a round is one clipped update). Rounds
compose; the :class:`PrivacyBudget` asks the RDP accountant for (ε, δ) after each round and refuses a round
that would spend more than the budget. A round with missing replies is still the same event (the noise and the
denominator do not depend on who replied), so it is counted and released like any other.

Local privacy for telemetry aggregates (class histograms, captured-sample statistics) is separate: a device
privatizes them before they leave it (:func:`laplace_histogram`, :func:`randomized_response`), with its own
per-device budget (``LocalBudget``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

# RDP orders: integers only (dp-accounting's fractional orders print convergence warnings), dense where the
# optimum lies for the ε range people use (1-10), sparse above: each order costs O(order) to evaluate.
ORDERS = tuple(range(2, 33)) + (36, 40, 48, 56, 64, 80, 96, 128, 192, 256)

logging.getLogger("absl").setLevel(logging.ERROR)


class BudgetExceeded(RuntimeError):
    """The round would spend more privacy than the job's budget allows; the job stops here."""


def _round_event(sampling_rate: float, noise_multiplier: float):  # type: ignore[no-untyped-def]
    import dp_accounting as dpa

    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    gauss = dpa.GaussianDpEvent(noise_multiplier)
    return gauss if sampling_rate >= 1 else dpa.PoissonSampledDpEvent(sampling_rate, gauss)


def epsilon_after(rounds: int, sampling_rate: float, noise_multiplier: float, delta: float) -> float:
    """ε after ``rounds`` DP-FedAvg rounds at (q, z), from the RDP accountant."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    if rounds <= 0:
        return 0.0
    acc = rdp.RdpAccountant(orders=list(ORDERS))
    acc.compose(dpa.SelfComposedDpEvent(_round_event(sampling_rate, noise_multiplier), rounds))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int) -> float:
    """The smallest noise multiplier z with which ``rounds`` rounds at sampling rate q spend at most ``target_epsilon``
    (dp-accounting's own calibration: Brent's method over fresh RDP accountants)."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={target_epsilon}, delta={delta}")
    z = dpa.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(orders=list(ORDERS)),
        lambda z: dpa.SelfComposedDpEvent(_round_event(sampling_rate, z), rounds),
        target_epsilon, delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0.05, 1.0),
    )
    return float(z)


@dataclass
class PrivacyBudget:
    """The (ε, δ) a federated job may spend, and what it has spent so far.

    ``charge_round()`` is called once per released round (with the round's actual q and z); it raises
    :class:`BudgetExceeded` *before* the round runs if the round would take ε past the budget, so a job never
    releases a model beyond its budget."""

    epsilon: float
    delta: float = 1e-5
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (q, z) of every released round

    def spent(self) -> float:
        return self._epsilon(self.rounds)

    def _epsilon(self, rounds: list[tuple[float, float]]) -> float:
        import dp_accounting as dpa
        from dp_accounting import rdp

        if not rounds:
            return 0.0
        groups: dict[tuple[float, float], int] = {}
        for qz in rounds:  # identical rounds compose as one self-composed event: one RDP evaluation per distinct (q, z)
            groups[qz] = groups.get(qz, 0) + 1
        acc = rdp.RdpAccountant(orders=list(ORDERS))
        for (q, z), n in groups.items():
            acc.compose(dpa.SelfComposedDpEvent(_round_event(q, z), n))
        return float(acc.get_epsilon(self.delta))

    def would_spend(self, sampling_rate: float, noise_multiplier: float) -> float:
        return self._epsilon(self.rounds + [(sampling_rate, noise_multiplier)])

    def check_round(self, sampling_rate: float, noise_multiplier: float) -> float:
        """ε after one more round; raises BudgetExceeded if that is over the budget."""
        eps = self.would_spend(sampling_rate, noise_multiplier)
        if eps > self.epsilon + 1e-9:
            raise BudgetExceeded(
                f"one more round (q={sampling_rate:.4g}, z={noise_multiplier:.4g}) would spend ε={eps:.3f}, over the budget "
                f"ε={self.epsilon} at δ={self.delta} (spent so far ε={self.spent():.3f} in {len(self.rounds)} rounds); "
                "the job stops here — start a new job with a new budget only if your privacy policy allows it"
            )
        return eps

    def charge_round(self, sampling_rate: float, noise_multiplier: float) -> float:
        eps = self.check_round(sampling_rate, noise_multiplier)
        self.rounds.append((sampling_rate, noise_multiplier))
        return eps


# -- local DP for telemetry aggregates ---------------------------------------------------------------


def laplace_histogram(counts: np.ndarray | list[int], epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """A histogram with Laplace noise of scale ``1/epsilon`` per bin (one sample changes one count by 1: L1
    sensitivity 1 under add/remove), rounded and clipped at 0. ε-DP for the samples it counts."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    rng = rng or np.random.default_rng()
    c = np.asarray(counts, dtype=np.float64)
    return np.maximum(np.rint(c + rng.laplace(0.0, 1.0 / epsilon, size=c.shape)), 0).astype(np.int64)


def gaussian_histogram(counts: np.ndarray | list[int], epsilon: float, delta: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """A histogram with Gaussian noise for (ε, δ)-DP (L2 sensitivity 1; classic calibration, needs ε < 1)."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError("the classic Gaussian mechanism needs 0 < epsilon < 1 and 0 < delta < 1")
    rng = rng or np.random.default_rng()
    sigma = math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    c = np.asarray(counts, dtype=np.float64)
    return np.maximum(np.rint(c + rng.normal(0.0, sigma, size=c.shape)), 0).astype(np.int64)


def randomized_response(values: np.ndarray, k: int, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """k-ary randomized response: keep each value with probability ``e^ε / (e^ε + k - 1)``, else report one of the
    other k-1 values uniformly. ε-local-DP per value."""
    rng = rng or np.random.default_rng()
    v = np.asarray(values, dtype=np.int64)
    p_keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    keep = rng.random(v.shape) < p_keep
    other = (v + rng.integers(1, k, size=v.shape)) % k
    return np.where(keep, v, other)


def unbias_randomized_response(counts: np.ndarray, epsilon: float) -> np.ndarray:
    """Unbiased estimate of the true class counts from the counts of randomized responses."""
    c = np.asarray(counts, dtype=np.float64)
    k, n = len(c), c.sum()
    p = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    q = (1 - p) / (k - 1)
    return (c - n * q) / (p - q)


@dataclass
class LocalBudget:
    """A device's budget for privatized telemetry: every release spends its ε; none beyond ``epsilon``
    (basic composition, which is what a device can check alone)."""

    epsilon: float
    spent: float = 0.0

    def spend(self, epsilon: float) -> None:
        if self.spent + epsilon > self.epsilon + 1e-12:
            raise BudgetExceeded(f"releasing with ε={epsilon} would spend {self.spent + epsilon:.3f} of this device's budget ε={self.epsilon}")
        self.spent += epsilon
