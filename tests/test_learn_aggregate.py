"""Aggregation of federated updates: checks, clipping, FedAvg, robust aggregators, FedBuff."""

from __future__ import annotations

import numpy as np
import pytest

from edgewise.learn.aggregate import ClientUpdate, FedBuff, UpdateRejected, aggregate, check_update, flatten

BASE = {"W": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _update(dev: str, value: float, n: int = 10, version: int = 0) -> ClientUpdate:
    return ClientUpdate(dev, {"W": np.full((4, 3), value, np.float32), "b": np.full(3, value, np.float32)}, n, base_version=version)


def test_fedavg_is_the_mean_of_deltas_weighted_by_sample_count():
    res = aggregate(BASE, [_update("a", 1.0, n=30), _update("b", 3.0, n=10)])
    assert res.used == 2 and np.allclose(res.delta["W"], 1.5) and np.allclose(res.delta["b"], 1.5)


@pytest.mark.parametrize("bad, reason", [
    ({"W": np.zeros((4, 2), np.float32), "b": np.zeros(3, np.float32)}, "wrong_shape"),
    ({"W": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "not_finite"),
    ({"W": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32), "extra": np.zeros(1)}, "unknown_tensor"),
    ({"W": np.zeros((4, 3), np.float32)}, "wrong_shape"),
])
def test_a_malformed_update_is_rejected_with_its_reason_and_does_not_count(bad, reason):
    res = aggregate(BASE, [_update("good", 1.0), ClientUpdate("bad", bad, 10)])
    assert res.rejected == {"bad": reason} and res.used == 1 and np.allclose(res.delta["W"], 1.0)
    with pytest.raises(UpdateRejected, match="bad"):
        check_update(ClientUpdate("bad", bad, 10), BASE)


def test_every_update_is_clipped_to_the_norm_bound_so_the_aggregate_is_bounded_too():
    ups = [_update(f"d{i}", v) for i, v in enumerate([0.01, 5.0, 100.0])]
    res = aggregate(BASE, ups, clip_norm=1.0)
    assert res.clipped == 2 and max(res.norms) > 1.0
    assert np.linalg.norm(flatten(res.delta, ["W", "b"])) <= 1.0 + 1e-6


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_a_few_poisoned_updates(method):
    ups = [_update(f"h{i}", 1.0 + 0.01 * i) for i in range(17)] + [_update(f"p{i}", 1e6) for i in range(3)]
    res = aggregate(BASE, ups, method=method, trim_fraction=0.2)
    assert np.allclose(res.delta["W"], 1.08, atol=0.1)
    assert np.abs(aggregate(BASE, ups, method="fedavg").delta["W"]).max() > 1e4  # plain FedAvg is moved by them


def test_dp_fedavg_divides_by_the_expected_cohort_whoever_replied():
    rng = np.random.default_rng(0)
    res = aggregate(BASE, [_update("a", 0.1)], clip_norm=10.0, noise_multiplier=1e-9, expected_count=10, rng=rng)
    assert np.allclose(res.delta["W"], 0.01, atol=1e-6)  # one reply of an expected ten: 1/10 of its update


def test_fedbuff_aggregates_every_buffer_and_drops_updates_too_stale():
    fb = FedBuff(BASE, buffer_size=2, max_staleness=1)
    assert fb.submit(_update("a", 1.0)) is None
    assert fb.submit(_update("b", 1.0)) is not None and fb.version == 1
    fb.submit(_update("c", 1.0, version=1))
    fb.submit(_update("d", 1.0, version=1))
    assert fb.version == 2
    assert fb.submit(_update("late", 1.0, version=0)) is None and fb.dropped_stale == 1  # two versions behind
    assert np.allclose(fb.weights["W"], 2.0)


def test_fedbuff_weights_a_staler_update_less():
    fb = FedBuff(BASE, buffer_size=2, max_staleness=3)
    fb.version = 3
    fb.submit(_update("fresh", 1.0, version=3))
    fb.submit(_update("stale", -1.0, version=0))  # staleness 3: weight 1/2 against the fresh one's 1
    assert np.allclose(fb.weights["W"], (1.0 - 0.5) / 1.5)
