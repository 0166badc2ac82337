"""Profiles and version behaviours of simulated devices (sim.behaviour): pure functions, no broker."""

from __future__ import annotations

import doctest
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from edgewise.sim import behaviour
from edgewise.sim.behaviour import Profile, VersionBehaviour, assign, parse_mix, parse_profile, shadow_window, window
from edgewise.sim.virtual import VirtualDeviceSpec, VirtualFleet, VirtualFleetError


def test_module_examples_run():
    assert doctest.testmod(behaviour).failed == 0


@pytest.mark.parametrize("text, expected", [
    ("healthy", Profile("healthy")),
    ("slow", Profile("slow", factor=3.0)),
    ("slow(1.5)", Profile("slow", factor=1.5)),
    ("crashing", Profile("crashing")),
    ("drifted(4)", Profile("drifted", drift_score=4.0)),
    (" offline( 10 , 5 ) ", Profile("offline", offline_from_s=10.0, offline_for_s=5.0)),
])
def test_profiles_parse(text, expected):
    assert parse_profile(text) == expected
    assert parse_profile(expected.describe()) == expected


@pytest.mark.parametrize("text, words", [
    ("flaky", "unknown profile"), ("offline", "offline takes (from_s, for_s)"), ("slow(0)", "positive latency factor"),
    ("healthy(2)", "takes no arguments"), ("drifted(x)", "must be numbers"),
])
def test_a_bad_profile_is_named_with_what_to_write(text, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_profile(text)


def test_a_mix_assigns_profiles_in_proportion_and_spread_over_the_fleet():
    mix = parse_mix("healthy:90,slow(2):5,offline(1,2):5")
    profiles = assign(mix, 100)
    counts = Counter(p.kind for p in profiles)
    assert counts == {"healthy": 90, "slow": 5, "offline": 5}
    assert {p.kind for p in profiles[:25]} >= {"healthy", "slow"}  # the first devices are not all of one kind
    assert [p.kind for p in assign(parse_mix("crashing"), 3)] == ["crashing"] * 3
    with pytest.raises(ValueError, match="positive weight"):
        parse_mix("healthy:0")


def test_latency_follows_hardware_class_and_the_slow_profile():
    b = VersionBehaviour(latency_ms={"*": 10.0, "rpi4": 40.0})
    rng = random.Random(1)
    fast = window(Profile(), b, "x86-small", 1.0, rate_per_s=100, rng=rng)
    rpi = window(Profile(), b, "rpi4", 1.0, rate_per_s=100, rng=rng)
    slow = window(Profile("slow", factor=3), b, "x86-small", 1.0, rate_per_s=100, rng=rng)
    assert fast.latency_p95_ms == pytest.approx(10, rel=0.06)
    assert rpi.latency_p95_ms == pytest.approx(40, rel=0.06)
    assert slow.latency_p95_ms == pytest.approx(30, rel=0.06)


def test_error_rate_confidence_and_drift_come_out_of_a_window():
    rng = random.Random(2)
    w = window(Profile("drifted", drift_score=3.0), VersionBehaviour(error_rate=0.1, confidence_shift=-0.4), None, 10.0,
               rate_per_s=100, rng=rng)
    assert w.drift_score == 3.0
    assert 0.05 < w.errors / w.inferences < 0.15
    assert sum(w.confidence_hist) == w.inferences - w.errors == sum(w.classes.values())
    assert max(range(10), key=lambda i: w.confidence_hist[i]) in (3, 4, 5)  # centred on 0.45
    assert window(Profile(), VersionBehaviour(), None, 0.0, rate_per_s=100, rng=rng).latency_p95_ms is None


def test_shadow_counts_follow_the_candidates_agreement():
    s = shadow_window(1000, VersionBehaviour(shadow_agreement=0.7, latency_ms={"*": 20}), VersionBehaviour(), None,
                      Profile(), random.Random(3))
    assert s["compared"] == 1000 and s["agreed"] == 700
    assert s["latency_p95_ms"] == 20 and s["committed_latency_p95_ms"] == 10


def test_bad_specs_and_behaviours_are_refused_with_the_reason():
    with pytest.raises(ValidationError, match="invalid device id"):
        VirtualDeviceSpec(device_id="a/b")
    with pytest.raises(ValidationError, match="unknown profile"):
        VirtualDeviceSpec(device_id="ok", profile="sometimes")
    with pytest.raises(ValidationError, match="positive and finite"):
        VersionBehaviour(latency_ms={"*": 0})
    with pytest.raises(VirtualFleetError, match="mqtt://HOST:PORT"):
        VirtualFleet("http://x", None, None, [], {})
    with pytest.raises(VirtualFleetError, match="unique"):
        VirtualFleet("mqtt://127.0.0.1:1", None, None, [VirtualDeviceSpec(device_id="d")] * 2, {})


def test_a_slice_of_a_fleet_has_the_whole_fleets_ids_classes_and_profiles():
    from edgewise.sim.virtual import specs_for

    profiles = assign(parse_mix("healthy:1,slow:1"), 10)
    whole = specs_for(10, prefix="w", profiles=profiles, hardware_classes=["a", "b", "c"])
    parts = specs_for(4, prefix="w", profiles=profiles, hardware_classes=["a", "b", "c"], start=0, total=10) + \
        specs_for(6, prefix="w", profiles=profiles, hardware_classes=["a", "b", "c"], start=4, total=10)
    assert parts == whole
