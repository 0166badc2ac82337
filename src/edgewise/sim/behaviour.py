"""What a simulated device reports: its profile (how the device is) × the running version's behaviour (how the model is).

Two small, pure pieces the virtual fleet (``sim.virtual``) combines every telemetry interval:

- :class:`VersionBehaviour`: how one model version behaves on the fleet (latency per hardware class,
  error rate, whether it crashes in its trial, agreement with the committed model in shadow mode,
  shift of the prediction confidence).
- :class:`Profile`: how one device behaves whatever the model: ``healthy``, ``slow`` (latency ×
  ``factor``), ``crashing`` (every new version it installs crashes during the trial and is rolled
  back), ``drifted`` (its inputs drift: ``drift_score``), ``offline(from, for)`` (the link is down
  from ``from`` seconds after start for ``for`` seconds; the device keeps running and queues its
  telemetry, as the real agent's outbox does).

:func:`window` turns (profile, behaviour, hardware class, window length) into the figures of one
telemetry window, deterministically from a seeded ``random.Random`` so a run can be replayed.

>>> b = VersionBehaviour(latency_ms={"*": 10.0, "rpi4": 30.0}, error_rate=0.01)
>>> b.latency_for("rpi4"), b.latency_for("jetson")
(30.0, 10.0)
>>> parse_profile("offline(30, 20)")
Profile(kind='offline', factor=3.0, drift_score=2.0, offline_from_s=30.0, offline_for_s=20.0)
>>> [p.kind for p, _ in parse_mix("healthy:8,slow:1,drifted(3):1")]
['healthy', 'slow', 'drifted']
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..protocol.messages import CONFIDENCE_BINS

ProfileKind = Literal["healthy", "slow", "crashing", "drifted", "offline"]
PROFILE_KINDS: tuple[str, ...] = ("healthy", "slow", "crashing", "drifted", "offline")


class VersionBehaviour(BaseModel):
    """How one model version behaves on the simulated fleet.

    ``latency_ms`` maps a hardware class (or ``"*"`` for any other) to the p95 latency in ms;
    ``error_rate`` is the fraction of inferences that raise; ``crash`` makes the trial after an
    install crash (the device rolls back and reports ``rolled_back`` and a ``model.crash`` event);
    ``shadow_agreement`` is the top-1 agreement with the committed model when this version runs in
    shadow mode; ``confidence_shift`` moves the top-1 confidence histogram (negative: less sure).
    """

    model_config = ConfigDict(extra="forbid")

    latency_ms: dict[str, float] = Field(default_factory=lambda: {"*": 10.0})
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    crash: bool = False
    shadow_agreement: float = Field(default=1.0, ge=0.0, le=1.0)
    confidence_shift: float = Field(default=0.0, ge=-1.0, le=1.0)

    @field_validator("latency_ms")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not (x > 0 and math.isfinite(x))}
        if bad:
            raise ValueError(f"latency_ms must be positive and finite; got {bad}")
        return v

    def latency_for(self, hardware_class: str | None) -> float:
        """p95 latency on ``hardware_class`` (its own entry, else ``"*"``, else 10 ms)."""
        if hardware_class is not None and hardware_class in self.latency_ms:
            return self.latency_ms[hardware_class]
        return self.latency_ms.get("*", 10.0)


DEFAULT_BEHAVIOUR = VersionBehaviour()
"""What a version nobody described does: healthy, 10 ms, no errors, full agreement."""


@dataclass(frozen=True)
class Profile:
    """How one simulated device behaves, whatever model it runs (see the module docstring)."""

    kind: ProfileKind = "healthy"
    factor: float = 3.0  # slow: latency multiplier
    drift_score: float = 2.0  # drifted: the score the device reports (1 = a detector's threshold)
    offline_from_s: float = 0.0  # offline: link goes down this long after the device starts ...
    offline_for_s: float = 0.0  # ... and stays down this long

    def offline_at(self, elapsed_s: float) -> bool:
        """Is the link down ``elapsed_s`` (simulated) seconds after the device started?"""
        return self.kind == "offline" and self.offline_from_s <= elapsed_s < self.offline_from_s + self.offline_for_s

    def describe(self) -> str:
        if self.kind == "slow":
            return f"slow({self.factor:g})"
        if self.kind == "drifted":
            return f"drifted({self.drift_score:g})"
        if self.kind == "offline":
            return f"offline({self.offline_from_s:g},{self.offline_for_s:g})"
        return self.kind


_PROFILE_RE = re.compile(r"^\s*([a-z]+)\s*(?:\(\s*([^)]*)\))?\s*$")


def parse_profile(text: str) -> Profile:
    """``healthy`` | ``slow[(factor)]`` | ``crashing`` | ``drifted[(score)]`` | ``offline(from_s, for_s)``."""
    m = _PROFILE_RE.match(text or "")
    if m is None or m.group(1) not in PROFILE_KINDS:
        raise ValueError(f"unknown profile {text!r}: use one of healthy, slow(3), crashing, drifted(2), offline(FROM_S,FOR_S)")
    kind, raw = m.group(1), m.group(2)
    try:
        args = [float(a) for a in raw.split(",")] if raw and raw.strip() else []
    except ValueError:
        raise ValueError(f"profile {text!r}: arguments must be numbers") from None
    if kind == "slow":
        if len(args) > 1 or (args and args[0] <= 0):
            raise ValueError(f"profile {text!r}: slow takes one positive latency factor, e.g. slow(3)")
        return Profile("slow", factor=args[0] if args else 3.0)
    if kind == "drifted":
        if len(args) > 1 or (args and args[0] < 0):
            raise ValueError(f"profile {text!r}: drifted takes one drift score >= 0, e.g. drifted(2.5)")
        return Profile("drifted", drift_score=args[0] if args else 2.0)
    if kind == "offline":
        if len(args) != 2 or args[0] < 0 or args[1] <= 0:
            raise ValueError(f"profile {text!r}: offline takes (from_s, for_s), e.g. offline(30,20)")
        return Profile("offline", offline_from_s=args[0], offline_for_s=args[1])
    if args:
        raise ValueError(f"profile {text!r}: {kind} takes no arguments")
    return Profile(kind)  # type: ignore[arg-type]


def parse_mix(text: str) -> list[tuple[Profile, float]]:
    """``"healthy:90,slow:5,offline(10,5):5"`` → [(profile, weight), ...]; a bare name weighs 1."""
    out: list[tuple[Profile, float]] = []
    depth, part, parts = 0, "", []
    for ch in text:  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    parts.append(part)
    for item in (p.strip() for p in parts):
        if not item:
            continue
        name, _, weight = item.rpartition(":") if re.search(r":\s*[0-9.]+\s*$", item) else (item, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"profile mix {text!r}: weight {weight!r} is not a number") from None
        if w < 0:
            raise ValueError(f"profile mix {text!r}: weight of {name!r} is negative")
        out.append((parse_profile(name), w))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError(f"profile mix {text!r} names no profile with a positive weight (e.g. healthy:95,slow:5)")
    return out


def assign(mix: list[tuple[Profile, float]], n: int) -> list[Profile]:
    """``n`` profiles in the mix's proportions (largest remainders), deterministic and interleaved."""
    total = sum(w for _, w in mix)
    exact = [n * w / total for _, w in mix]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(mix)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    # Spread each profile over the fleet (device k gets the profile whose quota is furthest behind),
    # so the first devices (canaries) are not all of one kind.
    out: list[Profile] = []
    given = [0] * len(mix)
    for k in range(n):
        i = max(range(len(mix)), key=lambda i: (counts[i] * (k + 1) / n - given[i], -i) if given[i] < counts[i] else (-1e9, 0))
        given[i] += 1
        out.append(mix[i][0])
    return out


@dataclass(frozen=True)
class WindowFigures:
    """One telemetry window of a simulated device."""

    inferences: int
    errors: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    drift_score: float | None
    confidence_hist: list[int]
    classes: dict[str, int]


def window(
    profile: Profile, behaviour: VersionBehaviour, hardware_class: str | None, window_s: float, *,
    rate_per_s: float, rng: random.Random,
) -> WindowFigures:
    """The figures of one window: Poisson-ish inference count, binomial errors, latency from the
    behaviour × profile with a little jitter, and a confidence histogram centred on 0.85 + shift."""
    mean = max(0.0, rate_per_s * window_s)
    n = max(0, int(round(rng.gauss(mean, math.sqrt(mean)))) if mean > 0 else 0)
    p = behaviour.error_rate
    errors = sum(1 for _ in range(n) if rng.random() < p) if n < 200 else max(0, min(n, int(round(rng.gauss(n * p, math.sqrt(n * p * (1 - p) or 1e-9))))))
    p95 = behaviour.latency_for(hardware_class) * (profile.factor if profile.kind == "slow" else 1.0)
    p95 *= 1.0 + rng.uniform(-0.05, 0.05)
    served = n - errors
    hist = [0] * (len(CONFIDENCE_BINS) - 1)
    classes: dict[str, int] = {}
    centre = min(0.99, max(0.01, 0.85 + behaviour.confidence_shift))
    for _ in range(min(served, 200)):  # shape from up to 200 draws, scaled to the window's count
        c = min(0.999, max(0.0, rng.gauss(centre, 0.08)))
        hist[min(int(c * 10), 9)] += 1
        k = str(rng.randrange(10))
        classes[k] = classes.get(k, 0) + 1
    if served > 200:
        scale = served / 200
        hist = _scaled(hist, served, scale)
        classes = dict(zip(classes, _scaled(list(classes.values()), served, scale)))
    return WindowFigures(
        inferences=n, errors=errors,
        latency_p50_ms=round(p95 * 0.6, 3) if served else None,
        latency_p95_ms=round(p95, 3) if served else None,
        latency_p99_ms=round(p95 * 1.3, 3) if served else None,
        drift_score=profile.drift_score if profile.kind == "drifted" else (round(rng.uniform(0.0, 0.3), 3)),
        confidence_hist=hist, classes=classes,
    )


def _scaled(counts: list[int], total: int, scale: float) -> list[int]:
    """Scale counts by ``scale`` so they still add up to ``total`` exactly."""
    out = [int(c * scale) for c in counts]
    if out:
        out[max(range(len(out)), key=lambda i: counts[i])] += total - sum(out)
    return out


def shadow_window(compared: int, candidate: VersionBehaviour, committed: VersionBehaviour, hardware_class: str | None,
                  profile: Profile, rng: random.Random) -> dict[str, float | int | None]:
    """ShadowStats counts for one window: ``compared`` inputs, agreement and errors as the candidate's behaviour says."""
    errors = sum(1 for _ in range(compared) if rng.random() < candidate.error_rate) if compared < 500 else int(compared * candidate.error_rate)
    answered = compared - errors
    agreed = sum(1 for _ in range(answered) if rng.random() < candidate.shadow_agreement) if answered < 500 else int(round(answered * candidate.shadow_agreement))
    slow = profile.factor if profile.kind == "slow" else 1.0
    return {
        "compared": answered, "agreed": agreed, "errors": errors,
        "latency_p95_ms": round(candidate.latency_for(hardware_class) * slow, 3) if answered else None,
        "committed_latency_p95_ms": round(committed.latency_for(hardware_class) * slow, 3) if answered else None,
    }
