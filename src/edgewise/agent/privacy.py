"""Privatized telemetry: class and confidence histograms get local differential privacy before they leave the device.

A Summary's ``classes`` and ``confidence_hist`` and a drift sketch's ``classes`` and ``confidence_hist`` say what a
device's user showed the model, interval by interval. When the control plane asks for it (``DesiredState.privacy``,
set per device, tag or group with ``PUT /api/v1/privacy``), the agent privatizes them in :meth:`TelemetryPrivatizer.privatize`
*before the record enters the outbox*, with ``edgewise.learn.dp``'s mechanisms (numpy only; the accountant's
``dp_accounting`` is imported lazily there and never here):

- ``laplace``: every bin of every histogram gets Laplace noise (``laplace_histogram``), rounded, clipped at 0;
- ``gaussian``: Gaussian noise, (ε, δ)-DP (``gaussian_histogram``);
- ``randomized_response``: each counted prediction's class (or confidence bin) is replaced by a random other one
  with the k-ary randomized-response probability (``randomized_response``); the server can unbias the counts with
  ``unbias_randomized_response`` (``ReportPrivacy.num_classes`` gives k).

One report spends ``epsilon_per_report``, split evenly over the histograms it carries (one prediction is counted in
each of them: basic composition). A device may spend ``budget_per_day`` per UTC day (``learn.dp.LocalBudget``); when a
report does not fit, its histograms are **left out** (sent empty, ``ReportPrivacy.left_out``), never raw. The setting
and the day's spending are kept in ``STATE/privacy.json``, so a restart (even offline) neither sends raw histograms nor
refills the budget; the file reserves ε for ``RESERVE_REPORTS`` reports ahead (one flash write per 16 reports), so a
crash can cost up to 15 reports' budget, never return any.

Not privatized: totals (``predictions``, ``inferences``, the sketch's ``n``), latencies, and the sketch's per-feature
bins (drift detection needs them; their sensitivity is the number of features): see docs/learn.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..fsutil import atomic_write
from ..learn.dp import BudgetExceeded, LocalBudget, gaussian_histogram, laplace_histogram, randomized_response
from ..protocol.messages import ReportPrivacy, Summary, Telemetry, TelemetryPrivacy

log = logging.getLogger(__name__)

STATE_FILE = "privacy.json"
RESERVE_REPORTS = 16  # the file records ε reserved for this many reports ahead: one flash write per 16 reports, not per report
R = TypeVar("R", Summary, Telemetry)


def utc_day(ts: float) -> str:
    """The budget period a wall-clock time falls in (UTC day)."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def privatize_counts(counts: np.ndarray, mechanism: str, epsilon: float, delta: float, rng: np.random.Generator) -> np.ndarray:
    """One histogram through one mechanism at (ε, δ): non-negative integers, same length."""
    c = np.asarray(counts, dtype=np.int64)
    if mechanism == "laplace":
        return laplace_histogram(c, epsilon, rng)
    if mechanism == "gaussian":
        return gaussian_histogram(c, epsilon, delta, rng)
    if mechanism == "randomized_response":
        k = len(c)
        if k < 2:  # one bin says only the total, which is sent anyway
            return c.copy()
        values = np.repeat(np.arange(k), c)
        return np.bincount(randomized_response(values, k, epsilon, rng), minlength=k).astype(np.int64)
    raise ValueError(f"unknown privacy mechanism {mechanism!r}; use laplace, gaussian or randomized_response")


def _class_vector(classes: dict[str, int], num_classes: int | None) -> np.ndarray:
    """A class map as a dense vector over the whole class domain: zero bins must get noise too (their absence is data)."""
    width = max([num_classes or 0] + [int(k) + 1 for k in classes])
    v = np.zeros(width, dtype=np.int64)
    for k, n in classes.items():
        v[int(k)] += n
    return v


def _class_map(v: np.ndarray) -> dict[str, int]:
    return {str(i): int(n) for i, n in enumerate(v.tolist()) if n > 0}


def _left_out(record: R, mechanism: str, histograms: int) -> R:
    """The record with its class and confidence histograms (and the sketch's) empty: what goes out instead of raw counts."""
    update: dict[str, Any] = {"privacy": ReportPrivacy(mechanism=mechanism, left_out=True, histograms=histograms)}
    if isinstance(record, Summary):
        update.update(classes={}, confidence_hist=[])
    if record.sketch is not None:
        update["sketch"] = record.sketch.model_copy(update={"classes": {}, "confidence_hist": []})
    return record.model_copy(update=update)


class TelemetryPrivatizer:
    """The device's telemetry privacy: the setting from the desired state, the day's budget, and the privatization."""

    def __init__(self, state_dir: Path | str | None, *, rng: np.random.Generator | None = None) -> None:
        self._path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._rng = rng or np.random.default_rng()
        self.setting: TelemetryPrivacy | None = None
        self._day = ""
        self._spent = 0.0
        self._reserved = 0.0  # what the state file says was spent today (>= _spent: a crash loses budget, never refills it)
        self.reports = 0  # records privatized since start
        self.left_out = 0  # records whose histograms were left out (budget spent)
        self._closed = False  # the state file was unreadable: leave histograms out until the control plane speaks
        self._load()

    # -- setting and budget (persisted) ---------------------------------------------------------

    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text())
            self.setting = TelemetryPrivacy.model_validate(data["setting"]) if data.get("setting") else None
            self._day, self._spent = str(data.get("day", "")), float(data.get("spent", 0.0))
            self._reserved = self._spent
        except Exception as exc:  # unreadable: fail closed — histograms are left out until the control plane says again
            log.error("cannot read %s (%s); telemetry histograms are left out until the privacy setting arrives again", self._path, exc)
            self._closed = True

    def _save(self) -> None:
        if self._path is None:
            return
        data = {"setting": self.setting.model_dump() if self.setting else None, "day": self._day, "spent": self._reserved}
        try:
            atomic_write(self._path, json.dumps(data).encode())
        except OSError as exc:
            log.warning("cannot store the telemetry privacy state in %s: %s", self._path, exc)

    def set(self, setting: TelemetryPrivacy | None) -> None:
        """Apply the desired state's setting (None: histograms go out as counted). The day's spending is kept."""
        with self._lock:
            if setting == self.setting and not self._closed:
                return
            self._closed = False
            self.setting = setting
            self._save()
        log.info("telemetry privacy %s", f"{setting.mechanism}, ε={setting.epsilon_per_report}/report, "
                 f"{setting.budget_per_day}/day" if setting else "off")

    def _budget(self, now: float) -> LocalBudget:
        assert self.setting is not None
        day = utc_day(now)
        if day != self._day:
            self._day, self._spent, self._reserved = day, 0.0, 0.0
        return LocalBudget(self.setting.budget_per_day, spent=self._spent)

    def status(self, now: float | None = None) -> dict[str, Any]:
        """For ``GET /v1/health``: the setting, ε spent today and what is left."""
        with self._lock:
            s = self.setting
            if s is None:
                return {"enabled": False, "reports": self.reports, "left_out": self.left_out}
            budget = self._budget(time.time() if now is None else now)
            return {"enabled": True, "mechanism": s.mechanism, "epsilon_per_report": s.epsilon_per_report,
                    "budget_per_day": s.budget_per_day, "day": self._day, "spent": round(budget.spent, 9),
                    "left": round(max(0.0, budget.epsilon - budget.spent), 9), "reports": self.reports, "left_out": self.left_out}

    # -- privatization ----------------------------------------------------------------------------

    def privatize(self, record: R, *, num_classes: int | None = None, now: float | None = None) -> R:
        """The record as it may leave the device: histograms privatized (spending ε of today's budget), or left out
        when the budget is spent; unchanged when privacy is off or there is nothing counted in it."""
        with self._lock:
            if self._closed:
                return _left_out(record, "unknown", 0)
            s = self.setting
            if s is None:
                return record
            sketch = record.sketch
            summary = isinstance(record, Summary)
            present = {  # a histogram with at least one count; an empty one says nothing beyond the (public) total
                "classes": summary and sum(record.classes.values()) > 0,  # type: ignore[union-attr]
                "confidence_hist": summary and sum(record.confidence_hist) > 0,  # type: ignore[union-attr]
                "sketch.classes": sketch is not None and sum(sketch.classes.values()) > 0,
                "sketch.confidence_hist": sketch is not None and sum(sketch.confidence_hist) > 0,
            }
            names = [n for n, p in present.items() if p]
            if not names:
                return record
            budget = self._budget(time.time() if now is None else now)
            try:
                budget.spend(s.epsilon_per_report)
            except BudgetExceeded:
                self.left_out += 1
                log.debug("telemetry privacy budget spent for %s (ε=%s); histograms left out", self._day, s.budget_per_day)
                return _left_out(record, s.mechanism, len(names))
            self._spent = budget.spent
            self.reports += 1
            if self._spent > self._reserved + 1e-12:  # reserve the next reports' ε on disk before this one goes out
                self._reserved = min(s.budget_per_day, self._spent + (RESERVE_REPORTS - 1) * s.epsilon_per_report)
                self._save()
            eps, delta = s.epsilon_per_report / len(names), s.delta / len(names)
            rng = self._rng

            def noisy_classes(classes: dict[str, int]) -> dict[str, int]:
                return _class_map(privatize_counts(_class_vector(classes, num_classes), s.mechanism, eps, delta, rng))

            def noisy_list(hist: list[int]) -> list[int]:
                return privatize_counts(np.asarray(hist), s.mechanism, eps, delta, rng).tolist()

            update: dict[str, Any] = {}
            if present["classes"]:
                update["classes"] = noisy_classes(record.classes)  # type: ignore[union-attr]
            if present["confidence_hist"]:
                update["confidence_hist"] = noisy_list(record.confidence_hist)  # type: ignore[union-attr]
            if sketch is not None and (present["sketch.classes"] or present["sketch.confidence_hist"]):
                sk: dict[str, Any] = {}
                if present["sketch.classes"]:
                    sk["classes"] = noisy_classes(sketch.classes)
                if present["sketch.confidence_hist"]:
                    sk["confidence_hist"] = noisy_list(sketch.confidence_hist)
                update["sketch"] = sketch.model_copy(update=sk)
            k = max([num_classes or 0] + [int(c) + 1 for c in (record.classes if summary else {})]  # type: ignore[union-attr]
                    + [int(c) + 1 for c in (sketch.classes if sketch is not None else {})])
            update["privacy"] = ReportPrivacy(mechanism=s.mechanism, epsilon=s.epsilon_per_report,
                                              delta=s.delta if s.mechanism == "gaussian" else 0.0,
                                              histograms=len(names), num_classes=k or None)
            return record.model_copy(update=update)
