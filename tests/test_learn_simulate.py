"""Federated learning on digits split non-IID across simulated devices, 30% of them offline in any round."""

from __future__ import annotations

import numpy as np
import pytest

from edgewise.learn import partition, simulate
from edgewise.learn.aggregate import ClientUpdate


@pytest.fixture(scope="module")
def digits():
    from edgewise.lab.demo_model import load_digits_split

    d = load_digits_split()
    return d.x_train / 16, d.y_train, d.x_test / 16, d.y_test


def test_a_dirichlet_split_is_class_skewed_and_covers_every_sample_once(digits):
    x, y, *_ = digits
    parts = partition.dirichlet_split(y, 40, alpha=0.3, seed=1)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) == len(set(allidx.tolist()))
    top_share = np.median([np.bincount(y[p]).max() / len(p) for p in parts])
    assert top_share > 0.3  # IID would be ~0.1


def test_fedavg_with_30_percent_offline_approaches_centralized_training(digits):
    x, y, xt, yt = digits
    parts = partition.dirichlet_split(y, 50, alpha=0.5)
    r = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(devices=50, rounds=25, cohort=15, offline_fraction=0.3))
    central = simulate.centralized(x, y, xt, yt, simulate.Recipe(batch_size=16, lr=0.2), epochs=20)
    assert central > 0.95 and r.final > 0.85 and r.final > central - 0.12
    assert min(r.participants) < max(r.participants)  # who replies changes from round to round


def test_dp_fedavg_spends_exactly_its_budget_over_the_rounds_including_rounds_with_missing_replies(digits):
    x, y, xt, yt = digits
    parts = partition.dirichlet_split(y, 40, alpha=0.5)
    r = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(devices=40, rounds=8, cohort=12, offline_fraction=0.3,
                                                            clip_norm=0.3, target_epsilon=8.0, server_lr=2.0))
    assert len(r.epsilon) == 8 and r.epsilon == sorted(r.epsilon) and r.epsilon[-1] == pytest.approx(8.0, rel=1e-3)


def test_median_aggregation_survives_devices_that_send_poisoned_updates(digits):
    x, y, xt, yt = digits
    parts = partition.dirichlet_split(y, 30, alpha=1.0)

    def poison(d: int, u: ClientUpdate) -> ClientUpdate:
        return ClientUpdate(u.device_id, {k: -50.0 * v for k, v in u.delta.items()}, u.num_samples) if d < 3 else u

    sim = dict(devices=30, rounds=20, cohort=15, offline_fraction=0.3, poison=poison)
    robust = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(aggregator="median", **sim))
    plain = simulate.run(x, y, parts, xt, yt, simulate.FleetSim(aggregator="fedavg", **sim))
    assert robust.final > 0.8 and robust.final > plain.final + 0.2
