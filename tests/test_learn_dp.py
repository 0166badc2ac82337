"""Differential privacy: ε pinned against dp-accounting's own figures, budgets refuse, local mechanisms."""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp

from edgewise.learn import dp


def _reference_epsilon(rounds: int, q: float, z: float, delta: float) -> float:
    acc = rdp.RdpAccountant(orders=list(dp.ORDERS))
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("rounds, q, z", [(10, 0.1, 1.0), (100, 0.05, 1.1), (30, 0.5, 2.0)])
def test_epsilon_equals_the_rdp_accountants_figure_for_fixed_parameters(rounds, q, z):
    assert dp.epsilon_after(rounds, q, z, 1e-5) == pytest.approx(_reference_epsilon(rounds, q, z, 1e-5), rel=1e-9)


def test_pinned_epsilon_for_100_rounds_at_q_0_05_and_z_1_1():
    # the RDP accountant's figure with our orders (dp-accounting 0.6.0): a change here changes every job's report
    assert dp.epsilon_after(100, 0.05, 1.1, 1e-5) == pytest.approx(3.360, abs=0.005)


def test_calibrated_noise_spends_the_target_epsilon_and_less_noise_would_spend_more():
    z = dp.calibrate_noise(4.0, 1e-5, 0.2, 20)
    assert dp.epsilon_after(20, 0.2, z, 1e-5) == pytest.approx(4.0, rel=1e-3)
    assert dp.epsilon_after(20, 0.2, z * 0.9, 1e-5) > 4.0


def test_a_budget_refuses_the_round_that_would_exceed_it_and_never_records_it():
    z = dp.calibrate_noise(2.0, 1e-5, 0.3, 5)
    budget = dp.PrivacyBudget(2.0, 1e-5)
    for _ in range(5):
        budget.charge_round(0.3, z)
    with pytest.raises(dp.BudgetExceeded, match="over the budget"):
        budget.charge_round(0.3, z)
    assert len(budget.rounds) == 5 and budget.spent() <= 2.0 + 1e-6


def test_laplace_histogram_is_non_negative_integers_near_the_truth():
    counts = np.array([1000, 500, 0, 20])
    noisy = np.stack([dp.laplace_histogram(counts, 1.0, np.random.default_rng(i)) for i in range(200)])
    assert noisy.dtype.kind == "i" and (noisy >= 0).all()
    assert np.abs(noisy.mean(axis=0)[:2] - counts[:2]).max() < 1.0


def test_randomized_response_counts_unbias_to_the_true_histogram():
    rng = np.random.default_rng(0)
    truth = rng.choice(4, size=100_000, p=[0.5, 0.3, 0.15, 0.05])
    reported = dp.randomized_response(truth, 4, 1.0, rng)
    assert (reported != truth).mean() > 0.3  # many values are not what the device saw
    est = dp.unbias_randomized_response(np.bincount(reported, minlength=4), 1.0)
    assert np.abs(est - np.bincount(truth, minlength=4)).max() < 2500  # ~4 standard deviations of the estimator


def test_a_device_budget_refuses_a_release_beyond_it():
    b = dp.LocalBudget(1.0)
    b.spend(0.6)
    with pytest.raises(dp.BudgetExceeded):
        b.spend(0.5)
