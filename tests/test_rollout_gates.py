"""The gate condition language: what it accepts, what it refuses (naming why), and how it treats missing figures."""

from __future__ import annotations

import pytest

from edgewise.control.gates import FIGURES, Condition, ConditionError, confidence_moments
from edgewise.control.rollouts import RolloutSpec, WaveSpec, assign_waves, check_conditions


def test_a_condition_combines_comparisons_with_and_or_not():
    c = Condition.parse("failed_fraction > 0.2 or (error_rate > 0.05 and not reporting < 3)")
    assert c.names == {"failed_fraction", "error_rate", "reporting"}
    assert c.evaluate({"failed_fraction": 0.3})
    assert c.evaluate({"failed_fraction": 0.0, "error_rate": 0.1, "reporting": 3})
    assert not c.evaluate({"failed_fraction": 0.0, "error_rate": 0.1, "reporting": 2})


def test_chained_comparisons_and_negative_numbers_work():
    assert Condition.parse("0.9 <= shadow_agreement < 1").evaluate({"shadow_agreement": 0.95})
    assert not Condition.parse("0.9 <= shadow_agreement < 1").evaluate({"shadow_agreement": 1.0})
    assert Condition.parse("confidence_shift > -1").evaluate({"confidence_shift": 0.0})


def test_a_missing_figure_makes_its_comparisons_false_in_either_direction():
    assert not Condition.parse("error_rate > 0.05").evaluate({"error_rate": None})
    assert not Condition.parse("error_rate <= 0.05").evaluate({})
    assert Condition.parse("true").evaluate({}) and not Condition.parse("false").evaluate({})


@pytest.mark.parametrize("text, named", [
    ("latency > 3", "unknown figure 'latency'"),
    ("__import__('os').system('x')", "Call is not allowed"),
    ("error_rate.real > 0", "Attribute is not allowed"),
    ("error_rate > 'a'", "only numbers"),
    ("error_rate >", "does not parse"),
    ("error_rate + 1 > 2", "BinOp is not allowed"),
    ("", "empty condition"),
])
def test_anything_else_is_refused_with_a_message_naming_it(text, named):
    with pytest.raises(ConditionError) as err:
        Condition.parse(text)
    assert named in str(err.value)


def test_every_wave_condition_of_a_spec_is_checked_and_the_wave_is_named():
    spec = RolloutSpec(model="m", version="2", tag="t", waves=[WaveSpec(percent=5, success="reporting >= 1"),
                                                              WaveSpec(name="rest", percent=100, error="p99_ms > 3")])
    with pytest.raises(ConditionError) as err:
        check_conditions(spec)
    assert "'p99_ms'" in str(err.value) and "waves[1].error (rest)" in str(err.value)


def test_the_documented_figures_are_the_ones_the_language_knows():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fleet-rollouts.md").read_text()
    for name in FIGURES:
        assert f"`{name}`" in doc, name


def test_confidence_moments_use_bin_midpoints():
    total, n = confidence_moments([([0.0, 0.5, 1.0], [1, 3])])
    assert n == 4 and total == pytest.approx(0.25 + 3 * 0.75)


class _Dev:
    def __init__(self, i: int, hw: str) -> None:
        self.id, self.hardware = f"d{i:03d}", {"hardware_class": hw}


def test_percent_waves_are_cumulative_per_hardware_class_so_every_class_has_a_canary():
    devices = [_Dev(i, "big" if i < 90 else "small") for i in range(100)]
    spec = RolloutSpec(model="m", version="2", tag="t", waves=[WaveSpec(percent=1), WaveSpec(percent=50), WaveSpec(percent=100)])
    out = assign_waves(spec, devices, seed="x")  # type: ignore[arg-type]
    per = {(w, c): sum(1 for _, w2, c2 in out if (w2, c2) == (w, c)) for w in range(3) for c in ("big", "small")}
    assert per == {(0, "big"): 1, (0, "small"): 1, (1, "big"): 44, (1, "small"): 4, (2, "big"): 45, (2, "small"): 5}
    assert len({d.id for d, _, _ in out}) == 100
    assert out == assign_waves(spec, devices, seed="x")  # type: ignore[arg-type]  # stable
