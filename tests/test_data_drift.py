"""Drift detectors and reference statistics on real data (scikit-learn digits, BasicMotions shapes), no agent."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import edgewise.data.drift.adwin
import edgewise.data.drift.ks
import edgewise.data.drift.page_hinkley
import edgewise.data.drift.psi
import edgewise.data.reference
from edgewise.data.drift import ADWIN, KS, PSI, PageHinkley
from edgewise.data.drift._window import BinnedWindow
from edgewise.data.reference import FeatureMap, Histogram, ReferenceStats, ReferenceStatsError, compute_reference


@pytest.fixture(scope="module")
def digits_scaled(digits_data):
    return digits_data.x_train / 16.0, digits_data.x_test / 16.0


@pytest.mark.parametrize("module", [edgewise.data.drift.psi, edgewise.data.drift.ks, edgewise.data.drift.page_hinkley,
                                    edgewise.data.drift.adwin, edgewise.data.reference])
def test_every_detector_docstring_example_runs(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_reference_keeps_one_histogram_per_feature_on_fixed_cuts_that_add_up_to_the_samples(digits_scaled):
    train, _ = digits_scaled
    ref = compute_reference(train[:500], {"probabilities": np.full((500, 10), 0.1)})
    assert ref.num_features == 64 and ref.feature_map.kind == "flat" and ref.samples == 500
    assert all(sum(h.counts) == 500 and len(h.counts) == len(h.cuts) + 1 for h in ref.features)
    assert sum(ref.classes) == 500 and sum(ref.confidence.counts) == 500
    assert ref.fingerprint == ref.bins_fingerprint() and len(ref.fingerprint) == 16
    again = ReferenceStats.model_validate_json(ref.model_dump_json())
    assert again == ref  # survives the manifest's JSON round trip


def test_time_series_are_summarised_per_channel_as_level_spread_and_high_frequency_energy():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(60, 6, 100))  # BasicMotions' shape: 6 channels x 100 steps
    ref = compute_reference(series)
    assert ref.feature_map == FeatureMap(kind="channels")
    assert ref.feature_names[:2] == ["mean[0]", "mean[1]"] and ref.feature_names[-1] == "diff_rms[5]" and ref.num_features == 18
    assert ref.output is None and ref.classes is None  # no class output: input drift only


def test_reference_refuses_bad_held_out_data_naming_the_problem():
    with pytest.raises(ReferenceStatsError, match="at least 20"):
        compute_reference(np.zeros((5, 4)))
    bad = np.ones((50, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ReferenceStatsError, match="NaN or inf"):
        compute_reference(bad)
    with pytest.raises(ValueError, match="cut points"):
        Histogram(cuts=[1.0, 2.0], counts=[1, 2])


def test_psi_threshold_is_corrected_for_the_window_size():
    hist = Histogram.fit(np.random.default_rng(0).normal(size=5000))
    small, large = PSI(hist, window=50), PSI(hist, window=1000)
    assert small.threshold[0] > 3 * large.threshold[0]


@pytest.mark.parametrize("detector", [PSI, KS])
def test_window_detectors_stay_quiet_on_unshifted_digits_and_fire_on_a_shift(detector, digits_scaled):
    train, test = digits_scaled
    ref = compute_reference(train)
    det = detector(ref.features, window=200)
    rng = np.random.default_rng(1)
    for i in rng.permutation(len(test)).tolist() * 3:
        det.update(test[i])
        assert not det.drift_detected
    shifted = np.clip(test * 0.5, 0, 1)  # sensor gain halved
    for n, i in enumerate(rng.permutation(len(test)), 1):
        det.update(shifted[i])
        if det.drift_detected:
            break
    assert det.drift_detected and n < 200 and det.drifted


def test_sliding_window_counts_always_equal_a_recount_of_the_last_window():
    rng = np.random.default_rng(0)
    window = BinnedWindow([Histogram.fit(rng.normal(size=500)) for _ in range(3)], 50)
    seen: list[list[int]] = []
    for _ in range(100):
        seen.extend(window.push_many(rng.normal(size=(int(rng.integers(1, 40)), 3))).tolist())
        last = np.array(seen[-50:])
        expected = np.stack([np.bincount(last[:, f], minlength=window.counts.shape[1]) for f in range(3)])
        assert (window.counts == expected).all()


def test_nan_and_inf_are_binned_or_ignored_without_failing():
    hist = Histogram.fit(np.random.default_rng(0).normal(size=1000))
    psi = PSI(hist, window=20)
    for v in [np.nan, np.inf, -np.inf] * 10:
        psi.update(v)
    assert np.isfinite(psi.score)
    for det in (PageHinkley(), ADWIN()):
        for v in [np.nan, np.inf, 1.0]:
            det.update(v)
        assert not det.drift_detected


def test_page_hinkley_on_a_block_detects_exactly_what_it_detects_sample_by_sample():
    rng = np.random.default_rng(0)
    stream = np.concatenate([rng.normal(size=3000), rng.normal(1.5, size=500)])
    one, block = PageHinkley(mean=0.0), PageHinkley(mean=0.0)
    hits_one = 0
    for v in stream:
        one.update(v)
        hits_one += one.drift_detected
    hits_block = sum(block.update_many(stream[k : k + 32]) for k in range(0, len(stream), 32))
    assert hits_one == hits_block > 0 and one.score == pytest.approx(block.score)


def test_adwin_memory_stays_bounded_on_a_long_stream():
    det = ADWIN(max_buckets=5, max_levels=8)
    for v in np.random.default_rng(0).random(20000):
        det.update(v)
    assert sum(len(level) for level in det._levels) <= 5 * 8 + 8
    assert det.width <= 5 * 2**8 + 2**8


def test_window_bins_equal_searchsorted_on_the_reference_cuts_with_nan_and_inf_in_the_edge_bins():
    rng = np.random.default_rng(5)
    hists = [Histogram.fit(rng.normal(size=400), bins=b) for b in (2, 5, 10)]
    window = BinnedWindow(hists, 30)
    xs = rng.normal(size=(200, 3)) * 2
    xs[::17, 0], xs[::13, 1], xs[::11, 2] = np.nan, np.inf, -np.inf
    got = window.bin_indices(xs)
    for f, h in enumerate(hists):
        col = xs[:, f]
        expected = np.searchsorted(np.asarray(h.cuts), col, side="right")
        expected[np.isnan(col)] = 0
        assert (got[:, f] == expected).all()


def test_page_hinkley_bank_matches_one_detector_per_column_through_detections_restarts_and_nan():
    from edgewise.data.drift.page_hinkley import PageHinkleyBank

    rng = np.random.default_rng(2)
    stream = np.concatenate([rng.normal(size=(2000, 3)), rng.normal(2.0, size=(600, 3))])
    stream[:, 2] *= 0.2  # the third column never drifts far enough
    stream[500:520, 1] = np.nan
    bank = PageHinkleyBank(3, delta=0.5, threshold=25.0, mean=0.0)
    singles = [PageHinkley(delta=0.5, threshold=25.0, mean=0.0) for _ in range(3)]
    bank_hits = np.zeros(3, dtype=int)
    single_hits = np.zeros(3, dtype=int)
    for k in range(0, len(stream), 64):
        block = stream[k : k + 64]
        bank_hits += bank.update_many(block)
        single_hits += [d.update_many(block[:, j]) for j, d in enumerate(singles)]
        assert bank.score == pytest.approx([d.score for d in singles])
    assert (bank_hits == single_hits).all() and bank_hits[0] > 0 and bank_hits[1] > 0
