"""Rollout gates: the health figures of a wave's cohort, and the small condition language over them.

A gate condition is a Python-like expression over figure names, numbers, comparisons and
``and``/``or``/``not``, parsed with :mod:`ast` and evaluated by walking the tree (never ``eval``)::

    >>> c = Condition.parse("failed_fraction > 0.2 or p95_ratio > 1.5")
    >>> c.evaluate({"failed_fraction": 0.0, "p95_ratio": 1.8})
    True
    >>> c.evaluate({"failed_fraction": 0.0, "p95_ratio": None})   # unknown yet: no evidence, not true
    False
    >>> Condition.parse("latency > 3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    edgewise.control.gates.ConditionError: unknown figure 'latency' in 'latency > 3'; known figures: ...

A figure nobody reported yet is ``None``; any comparison with ``None`` is false, so neither a
success nor an error condition can hold on missing evidence (``not (x > 1)`` is then true: say
what you mean with ``reporting >= 1 and ...``).

Figures are measured per wave and hardware class ("cohort") on the devices of that wave, from
each device's data *since it started the candidate* (telemetry, summary and event rows with ids
above the watermarks recorded at its start, see ``RolloutDeviceRow``), against the same device's
previous version where a ratio is asked for.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import InvalidRequestError
from .models import Device, EventRow, RolloutDeviceRow, SummaryRow, TelemetryRow

Figure = float | int | None

#: Every figure a condition may use, and what it means (docs/fleet-rollouts.md lists the same).
FIGURES: dict[str, str] = {
    "devices": "devices of this wave in this cohort",
    "started": "of those, devices told to install the candidate (or to shadow it)",
    "reporting": "devices that sent health data (telemetry or summaries) from the candidate since they started it",
    "updated": "devices that report running the candidate",
    "failed": "devices whose install of the candidate failed",
    "rolled_back": "devices that rolled the candidate back (trial failed: golden inputs, latency, crash)",
    "failed_fraction": "(failed + rolled_back) / started",
    "inferences": "predictions served by the candidate since the start",
    "error_rate": "failed predictions / predictions, candidate only",
    "p95_ms": "mean over reporting devices of their p95 latency on the candidate, ms",
    "p95_ratio": "mean over devices of candidate p95 / the same device's p95 on its previous version",
    "crashes": "model.crash events plus rollbacks whose reason is a crash, since the start",
    "confidence_shift": "|mean top-1 confidence on the candidate - on the previous version| (summary histograms)",
    "drift_score": "mean input drift score the devices reported while running the candidate",
    "shadow_reporting": "devices that sent shadow-mode comparisons of the candidate",
    "shadow_compared": "inputs both models answered in shadow mode",
    "shadow_agreement": "agreed / compared in shadow mode (top-1 or outputs within tolerance)",
}

_CMP = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
        ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}
_CONSTANTS = {"true": True, "false": False, "True": True, "False": False}
MAX_CONDITION_LEN = 1000


class ConditionError(InvalidRequestError):
    """A gate condition that does not parse or names an unknown figure (HTTP 422)."""


@dataclass(frozen=True)
class Condition:
    """A parsed gate condition; ``names`` are the figures it reads."""

    text: str
    tree: ast.Expression
    names: frozenset[str]

    @classmethod
    def parse(cls, text: str, *, where: str = "") -> "Condition":
        """Parse and check ``text``: only figure names, numbers, comparisons, and/or/not, parentheses."""
        at = f" in {where}" if where else ""
        if not isinstance(text, str) or not text.strip():
            raise ConditionError(f"empty condition{at}: write e.g. \"error_rate > 0.05\" or \"true\"")
        if len(text) > MAX_CONDITION_LEN:
            raise ConditionError(f"condition{at} is longer than {MAX_CONDITION_LEN} characters")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ConditionError(f"condition {text!r}{at} does not parse ({exc.msg}); use figures, numbers, "
                                 "< <= > >= == !=, and, or, not, parentheses") from None
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                if node.id not in FIGURES and node.id not in _CONSTANTS:
                    raise ConditionError(f"unknown figure {node.id!r} in {text!r}{at}; known figures: {', '.join(FIGURES)}")
                if node.id in FIGURES:
                    names.add(node.id)
            elif isinstance(node, ast.Constant):
                if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                    raise ConditionError(f"condition {text!r}{at}: only numbers are allowed as constants, not {node.value!r}")
            elif isinstance(node, ast.UnaryOp):
                if not isinstance(node.op, (ast.Not, ast.USub)):
                    raise ConditionError(f"condition {text!r}{at}: operator {type(node.op).__name__} is not allowed")
            elif not isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.Compare, ast.Load, ast.Not,
                                       ast.USub, *_CMP)):
                raise ConditionError(f"condition {text!r}{at}: {type(node).__name__} is not allowed; use figures, "
                                     "numbers, comparisons, and, or, not")
        return cls(text, tree, frozenset(names))

    def evaluate(self, figures: Mapping[str, Figure]) -> bool:
        """True when the condition holds on ``figures`` (a missing or None figure makes its comparisons false)."""
        return bool(_eval(self.tree.body, figures))


def _eval(node: ast.AST, figures: Mapping[str, Figure]) -> Any:
    if isinstance(node, ast.BoolOp):
        values = (_truth(_eval(v, figures)) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, figures)
        if isinstance(node.op, ast.Not):
            return not _truth(value)
        return None if value is None else -value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, figures)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, figures)
            if left is None or right is None or not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id] if node.id in _CONSTANTS else figures.get(node.id)
    if isinstance(node, ast.Constant):
        return node.value
    raise ConditionError(f"cannot evaluate {type(node).__name__}")  # parse() let nothing else through


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


# -- figures ---------------------------------------------------------------------------------------


def _midpoints(edges: Sequence[float], n: int) -> list[float]:
    if len(edges) == n + 1:
        return [(edges[i] + edges[i + 1]) / 2 for i in range(n)]
    return [(i + 0.5) / n for i in range(n)]


def confidence_moments(rows: Sequence[tuple[Sequence[float] | None, Sequence[int] | None]]) -> tuple[float, int]:
    """(sum of confidence, count) from summary histograms (bin midpoints), for means that can be added."""
    total, count = 0.0, 0
    for edges, hist in rows:
        if not hist:
            continue
        mids = _midpoints(list(edges or []), len(hist))
        total += sum(m * c for m, c in zip(mids, hist))
        count += int(sum(hist))
    return total, count


BASELINE_ROWS = 30  # the previous version's last this-many telemetry/summary rows per device


def watermarks(session: Session) -> tuple[int, int, int]:
    """The highest telemetry, summary and event row ids now: a device's data "since it started" is above them."""
    return (
        int(session.scalar(select(func.max(TelemetryRow.id))) or 0),
        int(session.scalar(select(func.max(SummaryRow.id))) or 0),
        int(session.scalar(select(func.max(EventRow.id))) or 0),
    )


def baselines(session: Session, devices: Sequence[tuple[str, str | None, str | None]],
              marks: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    """Each device's previous-version figures up to ``marks``: p95 (ms), confidence (sum, n), error counters.

    ``devices`` are (device id, previous model, previous version). Measured once when the devices start
    the candidate and stored with them, so the comparison does not need the old rows later (retention
    may have removed them). Two queries for the whole batch (the last ``BASELINE_ROWS`` rows per device,
    by a window function), not two per device."""
    out: dict[str, dict[str, Any]] = {d: {} for d, _, _ in devices}
    prev = {d: (m, v) for d, m, v in devices}
    for chunk_start in range(0, len(devices), 500):
        ids = [d for d, _, _ in devices[chunk_start:chunk_start + 500]]
        for table, mark in ((TelemetryRow, marks[0]), (SummaryRow, marks[1])):
            rn = func.row_number().over(partition_by=table.device_id, order_by=table.id.desc()).label("rn")
            cols = [table.device_id, table.model, table.version, table.latency_p95_ms, rn]
            if table is TelemetryRow:
                cols += [TelemetryRow.errors, TelemetryRow.inferences]
            else:
                cols += [SummaryRow.confidence_bins, SummaryRow.confidence_hist]
            sub = select(*cols).where(table.device_id.in_(ids), table.id <= mark).subquery()
            rows = session.execute(select(sub).where(sub.c.rn <= BASELINE_ROWS).order_by(sub.c.device_id, sub.c.rn)).all()
            p95s: dict[str, list[float]] = defaultdict(list)
            hists: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
            for row in rows:
                dev_id, model, version, p95, rank = row[0], row[1], row[2], row[3], row[4]
                base = out[dev_id]
                if table is TelemetryRow and rank == 1:  # cumulative counters of the agent process, whatever model
                    base["tel_errors"], base["tel_inferences"] = int(row[5] or 0), int(row[6] or 0)
                if (model, version) != prev[dev_id] or version is None:
                    continue
                if p95 is not None:
                    p95s[dev_id].append(float(p95))
                if table is SummaryRow:
                    hists[dev_id].append((row[5], row[6]))
            for dev_id, values in p95s.items():
                base = out[dev_id]
                n0 = int(base.get("_p95_n", 0))
                total = float(base.get("p95_ms", 0.0)) * n0 + sum(values)
                base["_p95_n"] = n0 + len(values)
                base["p95_ms"] = total / base["_p95_n"]
            for dev_id, hs in hists.items():
                conf_sum, conf_n = confidence_moments(hs)
                if conf_n:
                    out[dev_id]["conf_sum"], out[dev_id]["conf_n"] = conf_sum, conf_n
    for base in out.values():
        base.pop("_p95_n", None)
    return out


def _crash_reason(reason: Any) -> bool:
    return isinstance(reason, str) and "crash" in reason.lower()


def compute_figures(session: Session, rollout_id: int, model: str, version: str,
                    devices: Sequence[RolloutDeviceRow]) -> dict[str, Figure]:
    """The figures of one wave's cohort (``devices``: its rollout rows) for the gate conditions."""
    started = [d for d in devices if d.status in ("shadow", "started")]
    installed = [d for d in devices if d.status == "started"]
    refused = {d.device_id for d in devices if d.status == "refused"}  # the control plane could not install there
    figures: dict[str, Figure] = {name: None for name in FIGURES}
    figures.update(devices=len(devices), started=len(started), reporting=0, updated=0, failed=0, rolled_back=0,
                   crashes=0, inferences=0, shadow_reporting=0, shadow_compared=0)
    if refused:
        figures["failed"] = len(refused)
        figures["failed_fraction"] = len(refused) / (len(refused) + len(installed))
    if not started:
        return figures
    ids = [d.id for d in started]
    by_device = {d.device_id: d for d in started}
    inst_ids = {d.device_id for d in installed}

    # install results: the device's reported state, and update events since it started
    failed: set[str] = set()
    rolled: set[str] = set()
    crashes = 0
    for dev_id, dev_model, dev_version, last in session.execute(
        select(Device.id, Device.model, Device.version, Device.last_update).where(Device.id.in_(list(inst_ids)))
    ).all():
        if dev_model == model and dev_version == version:
            figures["updated"] = int(figures["updated"] or 0) + 1
        if isinstance(last, dict) and last.get("version") == version and last.get("model") in (None, model):
            if last.get("result") == "failed":
                failed.add(dev_id)
            elif last.get("result") == "rolled_back":
                rolled.add(dev_id)
    crashed_rollbacks: set[str] = set()
    ev = session.execute(
        select(EventRow.device_id, EventRow.kind, EventRow.detail)
        .join(RolloutDeviceRow, (RolloutDeviceRow.device_id == EventRow.device_id) & (RolloutDeviceRow.rollout_id == rollout_id))
        .where(RolloutDeviceRow.id.in_(ids), EventRow.id > RolloutDeviceRow.since_event_id,
               EventRow.kind.in_(("update", "model.crash")))
    ).all()
    for dev_id, kind, detail in ev:
        detail = detail if isinstance(detail, dict) else {}
        if kind == "model.crash":
            if detail.get("version") in (None, version):
                crashes += 1
            continue
        if detail.get("version") != version or dev_id not in inst_ids:
            continue
        if detail.get("result") == "failed":
            failed.add(dev_id)
        elif detail.get("result") == "rolled_back":
            rolled.add(dev_id)
            if _crash_reason(detail.get("reason")):
                crashed_rollbacks.add(dev_id)
    for dev_id in rolled - crashed_rollbacks:  # a rollback seen only in the state (its event not arrived yet)
        row = session.get(Device, dev_id)
        if row is not None and isinstance(row.last_update, dict) and row.last_update.get("version") == version \
                and _crash_reason(row.last_update.get("reason")):
            crashed_rollbacks.add(dev_id)
    figures.update(failed=len((failed | refused) - rolled), rolled_back=len(rolled), crashes=crashes + len(crashed_rollbacks))
    tried = len(installed) + len(refused)
    figures["failed_fraction"] = len(failed | rolled | refused) / tried if tried else 0.0

    # serving health on the candidate
    tel = session.execute(
        select(TelemetryRow.device_id, func.count(), func.max(TelemetryRow.errors), func.max(TelemetryRow.inferences),
               func.avg(TelemetryRow.latency_p95_ms), func.count(TelemetryRow.latency_p95_ms),
               func.avg(TelemetryRow.drift_score), func.count(TelemetryRow.drift_score))
        .join(RolloutDeviceRow, (RolloutDeviceRow.device_id == TelemetryRow.device_id) & (RolloutDeviceRow.rollout_id == rollout_id))
        .where(RolloutDeviceRow.id.in_(ids), TelemetryRow.id > RolloutDeviceRow.since_telemetry_id,
               TelemetryRow.model == model, TelemetryRow.version == version)
        .group_by(TelemetryRow.device_id)
    ).all()
    summ = session.execute(
        select(SummaryRow.device_id, func.count(), func.sum(SummaryRow.errors), func.sum(SummaryRow.inferences),
               func.avg(SummaryRow.latency_p95_ms), func.count(SummaryRow.latency_p95_ms),
               func.avg(SummaryRow.drift_score), func.count(SummaryRow.drift_score))
        .join(RolloutDeviceRow, (RolloutDeviceRow.device_id == SummaryRow.device_id) & (RolloutDeviceRow.rollout_id == rollout_id))
        .where(RolloutDeviceRow.id.in_(ids), SummaryRow.id > RolloutDeviceRow.since_summary_id,
               SummaryRow.model == model, SummaryRow.version == version)
        .group_by(SummaryRow.device_id)
    ).all()
    errors = inferences = 0
    p95: dict[str, list[tuple[float, int]]] = defaultdict(list)
    drift: list[tuple[float, int]] = []
    reporting: set[str] = set()
    for dev_id, n, max_err, max_inf, avg_p95, n_p95, avg_drift, n_drift in tel:
        reporting.add(dev_id)
        base = by_device[dev_id].baseline or {}
        e0, i0 = int(base.get("tel_errors", 0)), int(base.get("tel_inferences", 0))
        max_err, max_inf = int(max_err or 0), int(max_inf or 0)
        errors += max_err - e0 if max_err >= e0 else max_err  # below the baseline: the agent restarted (counters reset)
        inferences += max_inf - i0 if max_inf >= i0 else max_inf
        if avg_p95 is not None:
            p95[dev_id].append((float(avg_p95), int(n_p95)))
        if avg_drift is not None:
            drift.append((float(avg_drift), int(n_drift)))
    for dev_id, n, sum_err, sum_inf, avg_p95, n_p95, avg_drift, n_drift in summ:
        reporting.add(dev_id)
        errors += int(sum_err or 0)
        inferences += int(sum_inf or 0)
        if avg_p95 is not None:
            p95[dev_id].append((float(avg_p95), int(n_p95)))
        if avg_drift is not None:
            drift.append((float(avg_drift), int(n_drift)))
    figures["reporting"] = len(reporting)
    figures["inferences"] = inferences
    figures["error_rate"] = errors / inferences if inferences > 0 else None
    dev_p95 = {d: sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts)) for d, parts in p95.items()}
    if dev_p95:
        figures["p95_ms"] = sum(dev_p95.values()) / len(dev_p95)
        ratios = [v / float(by_device[d].baseline["p95_ms"]) for d, v in dev_p95.items()
                  if float((by_device[d].baseline or {}).get("p95_ms") or 0) > 0]
        figures["p95_ratio"] = sum(ratios) / len(ratios) if ratios else None
    if drift:
        figures["drift_score"] = sum(v * n for v, n in drift) / max(1, sum(n for _, n in drift))

    # confidence shift: the candidate's summaries against the same devices' previous-version summaries
    hist_rows = session.execute(
        select(SummaryRow.device_id, SummaryRow.confidence_bins, SummaryRow.confidence_hist)
        .join(RolloutDeviceRow, (RolloutDeviceRow.device_id == SummaryRow.device_id) & (RolloutDeviceRow.rollout_id == rollout_id))
        .where(RolloutDeviceRow.id.in_(ids), SummaryRow.id > RolloutDeviceRow.since_summary_id,
               SummaryRow.model == model, SummaryRow.version == version)
    ).all()
    cand_sum, cand_n = confidence_moments([(r[1], r[2]) for r in hist_rows])
    with_hist = {r[0] for r in hist_rows if r[2]}
    base_sum = sum(float((by_device[d].baseline or {}).get("conf_sum", 0.0)) for d in with_hist)
    base_n = sum(int((by_device[d].baseline or {}).get("conf_n", 0)) for d in with_hist)
    if cand_n and base_n:
        figures["confidence_shift"] = abs(cand_sum / cand_n - base_sum / base_n)

    # shadow mode: comparisons of the candidate beside the committed model
    shadow_reporting: set[str] = set()
    compared = agreed = 0
    for table in (TelemetryRow, SummaryRow):
        since = RolloutDeviceRow.since_telemetry_id if table is TelemetryRow else RolloutDeviceRow.since_summary_id
        for dev_id, c, a in session.execute(
            select(table.device_id, func.sum(table.shadow_compared), func.sum(table.shadow_agreed))
            .join(RolloutDeviceRow, (RolloutDeviceRow.device_id == table.device_id) & (RolloutDeviceRow.rollout_id == rollout_id))
            .where(RolloutDeviceRow.id.in_(ids), table.id > since, table.shadow_version == version)
            .group_by(table.device_id)
        ).all():
            shadow_reporting.add(dev_id)
            compared += int(c or 0)
            agreed += int(a or 0)
    figures["shadow_reporting"] = len(shadow_reporting)
    figures["shadow_compared"] = compared
    figures["shadow_agreement"] = agreed / compared if compared > 0 else None
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()}
