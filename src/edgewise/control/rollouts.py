"""Staged rollouts: the spec an operator writes, and the store behind it.

A rollout takes ``model`` ``version`` to a target (a saved group, a tag, or a device list) in
waves. Each device is assigned a wave when the rollout is created and a *cohort*, its hardware
class: percent waves are cumulative shares of each hardware class (a 1% canary holds at least one
device of every class), explicit waves name their devices. Cohorts move through the waves
independently (``control.rollout_engine``), so a candidate that is bad on one hardware class halts
and rolls back there while the others go on.

Rollout states: pending → running ⇄ paused, waiting_approval, then completed | halted | aborted.
A cohort's phases per wave: start → [shadow] → installing → soaking → [waiting_approval → approved]
→ next wave ... → completed, or halted (its devices sent back to their previous version).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from .devices import get_device, list_devices
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .gates import Condition
from .models import Device, RolloutCohortRow, RolloutDecisionRow, RolloutDeviceRow, RolloutRow
from .registry import Registry
from .timeutil import utcnow

STATES = ("pending", "running", "waiting_approval", "paused", "halted", "completed", "aborted")
ACTIVE_STATES = ("pending", "running", "waiting_approval")
FINAL_STATES = ("halted", "completed", "aborted")
ACTIVE_PHASES = ("start", "shadow", "installing", "soaking", "approved")
DONE_PHASES = ("completed", "halted", "aborted")
UNCLASSIFIED = "unclassified"
DEFAULT_SUCCESS = "true"
DEFAULT_ERROR = "failed_fraction > 0.2 or crashes > 0"


class RolloutNotFoundError(NotFoundError):
    pass


class WaveSpec(BaseModel):
    """One wave: which devices (a cumulative percent of each hardware class, or a device list) and its gates."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=64, description="Label shown in status (default wave-<n>).")
    percent: float | None = Field(default=None, gt=0, le=100, description="Cumulative share of each hardware class.")
    devices: list[str] | None = Field(default=None, description="Explicit devices of this wave.")
    min_reporting: int = Field(default=1, ge=0, description="Devices that must report candidate health before success.")
    soak_s: float = Field(default=0.0, ge=0, description="Seconds after the wave's last install before success may hold.")
    success: str = Field(default=DEFAULT_SUCCESS, description="Condition to proceed (after soak and min_reporting).")
    error: str = Field(default=DEFAULT_ERROR, description="Condition to halt and roll the cohort back (checked every tick).")
    approval: bool = Field(default=False, description="After success, wait for POST .../approve before the next wave.")
    shadow_s: float = Field(default=0.0, ge=0, description="Run the candidate in shadow mode this long before installing it.")
    shadow_sample_every: int = Field(default=1, ge=1, description="Shadow the candidate on every n-th served input.")

    @model_validator(mode="after")
    def _one_selector(self) -> "WaveSpec":
        if (self.percent is None) == (self.devices is None):
            raise ValueError("give a wave exactly one of percent (e.g. 10) or devices (a list of device ids)")
        if self.devices is not None and not self.devices:
            raise ValueError("a wave's devices list is empty")
        return self


class RolloutSpec(BaseModel):
    """What ``POST /api/v1/rollouts`` takes (and ``edgewise rollout start SPEC.yaml`` reads)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=128)
    group: str | None = Field(default=None, description="A saved group (control.groups); resolved now.")
    tag: str | None = Field(default=None, description="Every device carrying this tag now.")
    devices: list[str] | None = Field(default=None, description="Exactly these devices.")
    waves: list[WaveSpec] = Field(min_length=1, max_length=50)
    rate_limit_per_min: int | None = Field(default=None, ge=1, description="Devices started per minute, at most.")
    start_paused: bool = Field(default=False, description="Create paused; POST .../resume starts it.")

    @model_validator(mode="after")
    def _one_target(self) -> "RolloutSpec":
        given = [k for k in ("group", "tag", "devices") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one target: group, tag or devices (got {', '.join(given) or 'none'})")
        last = 0.0
        for i, w in enumerate(self.waves):
            if w.percent is not None:
                if w.percent < last:
                    raise ValueError(f"wave {i} ({w.name or 'unnamed'}): percents are cumulative, so {w.percent} after "
                                     f"{last} goes backwards; write e.g. 1, 10, 50, 100")
                last = w.percent
        return self

    def wave_name(self, index: int) -> str:
        return self.waves[index].name or f"wave-{index + 1}"


def check_conditions(spec: RolloutSpec) -> None:
    """Parse every wave's conditions (422 naming the unknown figure or bad syntax, and the wave)."""
    for i, w in enumerate(spec.waves):
        for which in ("success", "error"):
            Condition.parse(getattr(w, which), where=f"waves[{i}].{which} ({spec.wave_name(i)})")


def cohort_of(device: Device) -> str:
    """A device's hardware class as reported in its state (``HardwareInfo.hardware_class``)."""
    hw = device.hardware or {}
    cls = hw.get("hardware_class") if isinstance(hw, dict) else None
    return str(cls)[:64] if cls else UNCLASSIFIED


def _resolve_target(session: Session, spec: RolloutSpec) -> tuple[str, str, list[Device]]:
    if spec.group is not None:
        try:
            from . import groups
        except ImportError:
            raise InvalidRequestError("groups are not available on this control plane; target a tag or devices") from None
        return "group", spec.group, list(groups.resolve(session, spec.group))
    if spec.tag is not None:
        devices = list_devices(session, tag=spec.tag)
        if not devices:
            raise NotFoundError(f"no registered device has tag {spec.tag!r}; tag devices first")
        return "tag", spec.tag, devices
    assert spec.devices is not None
    return "devices", ",".join(spec.devices)[:512], [get_device(session, d) for d in dict.fromkeys(spec.devices)]


def _order_key(seed: str, device_id: str) -> str:
    """A stable pseudo-random order, so the canary is not always the alphabetically first devices."""
    return hashlib.sha256(f"{seed}\0{device_id}".encode()).hexdigest()


def assign_waves(spec: RolloutSpec, devices: list[Device], seed: str) -> list[tuple[Device, int, str]]:
    """(device, wave index, cohort) for every device the rollout reaches.

    Explicit waves take their devices first; each percent wave then takes, per hardware class, up to
    ceil(percent% of that class) devices in total (so every class has a canary), in a stable order.
    Devices beyond the last wave's percent are not part of the rollout."""
    by_id = {d.id: d for d in devices}
    out: list[tuple[Device, int, str]] = []
    taken: set[str] = set()
    for i, w in enumerate(spec.waves):
        for dev_id in w.devices or []:
            if dev_id in taken:
                raise InvalidRequestError(f"device {dev_id!r} is in two waves ({spec.wave_name(i)} and an earlier one)")
            if dev_id not in by_id:
                raise InvalidRequestError(f"device {dev_id!r} of wave {spec.wave_name(i)} is not in the rollout's target")
            taken.add(dev_id)
            out.append((by_id[dev_id], i, cohort_of(by_id[dev_id])))
    pools: dict[str, list[Device]] = defaultdict(list)
    for d in sorted((d for d in devices if d.id not in taken), key=lambda d: _order_key(seed, d.id)):
        pools[cohort_of(d)].append(d)
    for cohort, pool in pools.items():
        n, done = len(pool), 0
        for i, w in enumerate(spec.waves):
            if w.percent is None:
                continue
            upto = min(n, math.ceil(w.percent / 100.0 * n - 1e-9))
            for d in pool[done:upto]:
                out.append((d, i, cohort))
            done = max(done, upto)
    return out


def record(session: Session, rollout: RolloutRow, decision: str, reason: str = "", *, wave: int | None = None,
           cohort: str | None = None, figures: dict[str, Any] | None = None, actor: str | None = None) -> RolloutDecisionRow:
    """Add one decision with its figures (the caller commits)."""
    row = RolloutDecisionRow(rollout_id=rollout.id, at=utcnow(), wave=wave, cohort=cohort, decision=decision,
                             reason=reason, figures=dict(figures or {}), actor=actor)
    session.add(row)
    rollout.updated_at = utcnow()
    return row


def create_rollout(session: Session, spec: RolloutSpec, *, actor: str | None = None) -> RolloutRow:
    """Check the spec, resolve its target now, assign waves and cohorts, store it. Commits.

    The engine starts it on its next tick (state ``pending``), or it waits ``paused`` when asked."""
    check_conditions(spec)
    Registry.get(session, spec.model, spec.version)  # 404 naming it when the version was never uploaded
    kind, value, devices = _resolve_target(session, spec)
    if not devices:
        raise NotFoundError(f"the rollout's target ({kind} {value}) has no devices")
    assigned = assign_waves(spec, devices, seed=f"{spec.model}\0{spec.version}")
    if not assigned:
        raise InvalidRequestError("no device falls in any wave; give a wave percent > 0 or explicit devices")
    busy = session.execute(
        select(RolloutDeviceRow.device_id, RolloutRow.id)
        .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
        .where(RolloutRow.state.in_((*ACTIVE_STATES, "paused")), RolloutDeviceRow.device_id.in_([d.id for d, _, _ in assigned]),
               RolloutRow.model == spec.model)
    ).first()
    if busy is not None:
        raise ConflictError(f"device {busy[0]!r} is already in rollout {busy[1]} of {spec.model}, which is not finished; "
                            f"abort it (POST /api/v1/rollouts/{busy[1]}/abort) or wait for it")
    now = utcnow()
    row = RolloutRow(model=spec.model, version=spec.version, target_kind=kind, target_value=value,
                     spec=spec.model_dump(mode="json"), state="paused" if spec.start_paused else "pending",
                     reason="created paused; resume to start" if spec.start_paused else "", created_by=actor,
                     created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    for cohort in sorted({c for _, _, c in assigned}):
        session.add(RolloutCohortRow(rollout_id=row.id, cohort=cohort, wave=0, phase="start", phase_started_at=0.0,
                                     note="", figures={}, updated_at=now))
    for device, wave, cohort in assigned:
        session.add(RolloutDeviceRow(rollout_id=row.id, device_id=device.id, wave=wave, cohort=cohort, status="pending",
                                     since_telemetry_id=0, since_summary_id=0, since_event_id=0, baseline={}))
    waves = defaultdict(int)
    for _, w, _ in assigned:
        waves[spec.wave_name(w)] += 1
    record(session, row, "created", f"{len(assigned)} device(s) of {kind} {value} in {len(spec.waves)} wave(s): "
           + ", ".join(f"{k} {v}" for k, v in waves.items()), actor=actor,
           figures={"devices": len(assigned), "cohorts": sorted({c for _, _, c in assigned})})
    session.commit()
    return row


def get_rollout(session: Session, rollout_id: int) -> RolloutRow:
    row = session.get(RolloutRow, rollout_id)
    if row is None:
        raise RolloutNotFoundError(f"no rollout with id {rollout_id}; list them: GET /api/v1/rollouts")
    return row


def list_rollouts(session: Session, *, state: str | None = None, limit: int = 100) -> list[RolloutRow]:
    q = select(RolloutRow).order_by(RolloutRow.id.desc()).limit(limit)
    if state is not None:
        q = q.where(RolloutRow.state == state)
    return list(session.scalars(q).all())


def cohorts_of(session: Session, rollout_id: int) -> list[RolloutCohortRow]:
    return list(session.scalars(select(RolloutCohortRow).where(RolloutCohortRow.rollout_id == rollout_id)
                                .order_by(RolloutCohortRow.cohort)).all())


def devices_of(session: Session, rollout_id: int) -> list[RolloutDeviceRow]:
    return list(session.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id)
                                .order_by(RolloutDeviceRow.wave, RolloutDeviceRow.device_id)).all())


# -- operator actions -------------------------------------------------------------------------------


def pause(session: Session, rollout_id: int, *, actor: str | None = None) -> RolloutRow:
    """Hold the rollout where it is: no device is started, no gate evaluated, until resume."""
    row = get_rollout(session, rollout_id)
    if row.state not in ACTIVE_STATES:
        raise ConflictError(f"rollout {rollout_id} is {row.state}; only a pending, running or waiting rollout can be paused")
    row.state, row.reason = "paused", f"paused by {actor or 'an operator'}"
    record(session, row, "pause", row.reason, actor=actor)
    session.commit()
    return row


def resume(session: Session, rollout_id: int, *, actor: str | None = None) -> RolloutRow:
    row = get_rollout(session, rollout_id)
    if row.state != "paused":
        raise ConflictError(f"rollout {rollout_id} is {row.state}, not paused")
    row.state, row.reason = "running", f"resumed by {actor or 'an operator'}"
    record(session, row, "resume", row.reason, actor=actor)
    session.commit()
    return row


def approve(session: Session, rollout_id: int, *, actor: str | None = None, wave: int | None = None) -> RolloutRow:
    """Let every cohort waiting for approval (of ``wave``, if given) go on to its next wave."""
    row = get_rollout(session, rollout_id)
    waiting = [c for c in cohorts_of(session, rollout_id)
               if c.phase == "waiting_approval" and (wave is None or c.wave == wave)]
    if not waiting:
        raise ConflictError(f"nothing in rollout {rollout_id} waits for approval (state {row.state})"
                            + (f" in wave {wave}" if wave is not None else ""))
    if row.state in FINAL_STATES:
        raise ConflictError(f"rollout {rollout_id} is {row.state}")
    for c in waiting:
        c.phase, c.note, c.updated_at = "approved", f"approved by {actor or 'an operator'}", utcnow()
        record(session, row, "approved", c.note, wave=c.wave, cohort=c.cohort, actor=actor, figures=c.figures)
    if row.state == "waiting_approval":
        row.state, row.reason = "running", f"approved by {actor or 'an operator'}"
    session.commit()
    return row


# -- the view the API and CLI show ------------------------------------------------------------------


def rollout_view(session: Session, row: RolloutRow, *, with_devices: bool = False, decisions_limit: int = 500) -> dict[str, Any]:
    """The rollout as the API returns it: state, waves with per-cohort progress and figures, decisions."""
    spec = RolloutSpec.model_validate(row.spec)
    cohorts = cohorts_of(session, row.id)
    devices = devices_of(session, row.id)
    status_of = {d: (m, v) for d, m, v in session.execute(
        select(Device.id, Device.model, Device.version).where(Device.id.in_([d.device_id for d in devices]))).all()}
    waves: list[dict[str, Any]] = []
    for i, w in enumerate(spec.waves):
        wave_devices = [d for d in devices if d.wave == i]
        per_cohort = []
        for c in cohorts:
            mine = [d for d in wave_devices if d.cohort == c.cohort]
            if not mine:
                continue
            if c.phase == "completed" or i < c.wave:
                phase = "passed"
            elif i == c.wave:
                phase = c.phase
            else:
                phase = "not_started"
            per_cohort.append({
                "cohort": c.cohort, "phase": phase, "devices": len(mine),
                "started": sum(d.status in ("shadow", "started", "reverted") for d in mine),
                "updated": sum(status_of.get(d.device_id) == (row.model, row.version) for d in mine),
                "reverted": sum(d.status == "reverted" for d in mine),
                "figures": c.figures if c.wave == i else {},
                "note": c.note if c.wave == i else "",
            })
        waves.append({"index": i, "name": spec.wave_name(i), "percent": w.percent, "devices": len(wave_devices),
                      "min_reporting": w.min_reporting, "soak_s": w.soak_s, "shadow_s": w.shadow_s, "approval": w.approval,
                      "success": w.success, "error": w.error, "cohorts": per_cohort})
    decisions = session.scalars(select(RolloutDecisionRow).where(RolloutDecisionRow.rollout_id == row.id)
                                .order_by(RolloutDecisionRow.id).limit(decisions_limit)).all()
    out: dict[str, Any] = {
        "id": row.id, "model": row.model, "version": row.version,
        "target": {"kind": row.target_kind, "value": row.target_value},
        "state": row.state, "reason": row.reason, "created_by": row.created_by,
        "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "rate_limit_per_min": spec.rate_limit_per_min,
        "devices": len(devices),
        "updated": sum(status_of.get(d.device_id) == (row.model, row.version) for d in devices),
        "reverted": sum(d.status == "reverted" for d in devices),
        "cohorts": [{"cohort": c.cohort, "wave": c.wave, "wave_name": spec.wave_name(min(c.wave, len(spec.waves) - 1)),
                     "phase": c.phase, "note": c.note, "figures": c.figures} for c in cohorts],
        "halted_cohorts": [c.cohort for c in cohorts if c.phase == "halted"],
        "waves": waves,
        "decisions": [{"at": d.at.isoformat(), "wave": d.wave,
                       "wave_name": spec.wave_name(d.wave) if d.wave is not None and d.wave < len(spec.waves) else None,
                       "cohort": d.cohort, "decision": d.decision, "reason": d.reason, "figures": d.figures,
                       "actor": d.actor} for d in decisions],
        "spec": row.spec,
    }
    if with_devices:
        out["device_list"] = [{"device_id": d.device_id, "wave": d.wave, "cohort": d.cohort, "status": d.status,
                               "previous_version": d.previous_version,
                               "running": (status_of.get(d.device_id) or (None, None))[1]} for d in devices]
    return out
