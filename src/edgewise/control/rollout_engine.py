"""The rollout engine: one background loop that moves every active rollout forward, one tick at a time.

Each tick reads the rollouts from the database, measures each cohort's figures (``control.gates``),
takes at most the decisions those figures call for, records each with its figures, and commits.
Nothing lives only in memory: a control plane restarted mid-rollout resumes on its first tick from
the stored phase, its start time and the devices already started (``tests/test_rollout_engine.py``).

Per cohort (hardware class) and wave:

- ``start``: a wave without devices of this cohort is skipped; with ``shadow_s`` the wave's devices get
  the candidate as ``DesiredState.shadow`` (phase ``shadow``), else installs begin (``installing``).
- ``shadow``: after ``shadow_s`` and once ``min_reporting`` devices sent shadow comparisons, installs begin.
- ``installing``: devices are told to install the candidate (``deployments.deploy``), no more than the
  rate limit allows per minute and only inside the group's maintenance windows.
- ``soaking``: after ``soak_s``, with ``min_reporting`` devices reporting the candidate's health and the
  success condition holding, the cohort proceeds to the next wave (or waits for approval).
- In every phase the error condition is checked first: when it holds the cohort halts and its devices
  of this and earlier waves return to the version each ran before (``deploy(..., rollback=True)``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..protocol import ArtifactRef
from ..protocol.messages import ShadowTarget
from .db import Database
from .deployments import Publisher, deploy, publish_desired
from .errors import ConflictError, ControlError
from .gates import Condition, baselines, compute_figures, watermarks
from .models import Device, RolloutCohortRow, RolloutDeviceRow, RolloutRow
from .rollouts import ACTIVE_PHASES, ACTIVE_STATES, FINAL_STATES, RolloutSpec, cohorts_of, devices_of, get_rollout, record
from .timeutil import utcnow

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0


class RolloutEngine:
    """Runs :meth:`tick` every ``tick_s`` seconds on a daemon thread (``start``/``stop``).

    ``clock`` (epoch seconds) is injectable so tests can drive soak times and rate limits by hand:
    ``engine.tick(now=...)``."""

    def __init__(self, db: Database, publisher: Publisher | None, *, tick_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.publisher = publisher
        self.tick_s = tick_s
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time (the loop and a test or API call)
        self.ticks = 0
        self.lease = None  # issue 9 SCALE: a control.lease.Lease; the loop ticks only while it is held

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgewise-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            if self.lease is not None and not self.lease.held():
                continue  # another process runs the rollouts (docs/scale-out.md)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick (logged with its traceback)
                log.exception("rollout engine tick failed; retrying next tick")

    def tick(self, now: float | None = None) -> int:
        """Advance every active rollout once; returns how many were looked at."""
        now = self.clock() if now is None else now
        with self._lock:
            with self.db.session() as session:
                ids = list(session.scalars(select(RolloutRow.id).where(RolloutRow.state.in_(ACTIVE_STATES))
                                           .order_by(RolloutRow.id)).all())
            for rollout_id in ids:
                with self.db.session() as session:
                    try:
                        advance(session, self.publisher, rollout_id, now)
                    except Exception:  # noqa: BLE001 - one broken rollout must not stop the others
                        session.rollback()
                        log.exception("rollout %s: tick failed", rollout_id)
            self.ticks += 1
        return len(ids)


# -- one rollout ------------------------------------------------------------------------------------


class _Limits:
    """What may start this tick: devices left under the rate limit, whether the maintenance window is open."""

    def __init__(self, budget: int | None, window_open: bool, window_note: str) -> None:
        self.budget = budget
        self.window_open = window_open
        self.window_note = window_note


def _group(session: Session, rollout: RolloutRow) -> Any:
    if rollout.target_kind != "group":
        return None
    try:
        from . import groups

        return groups.get_group(session, rollout.target_value)
    except (ImportError, ControlError):
        return None


def _limits(session: Session, rollout: RolloutRow, spec: RolloutSpec, now: float) -> _Limits:
    group = _group(session, rollout)
    limits = [v for v in (spec.rate_limit_per_min, getattr(group, "rate_limit_per_min", None)) if v]
    budget = None
    if limits:
        recent = session.scalar(select(func.count()).select_from(RolloutDeviceRow).where(
            RolloutDeviceRow.rollout_id == rollout.id, RolloutDeviceRow.started_at.is_not(None),
            RolloutDeviceRow.started_at > now - RATE_WINDOW_S)) or 0
        budget = max(0, min(limits) - int(recent))
    window_open, note = True, ""
    if group is not None and getattr(group, "maintenance", None):
        from . import groups

        when = datetime.fromtimestamp(now, timezone.utc)
        window_open = groups.in_window(group, when)
        if not window_open:
            nxt = groups.next_window_start(group, when) if hasattr(groups, "next_window_start") else None
            note = f"outside group {group.name}'s maintenance windows" + (f"; next opens {nxt.isoformat()}" if nxt else "")
    return _Limits(budget, window_open, note)


def advance(session: Session, publisher: Publisher | None, rollout_id: int, now: float) -> None:
    """One tick of one rollout: every unfinished cohort takes the steps its figures call for. Commits."""
    rollout = session.get(RolloutRow, rollout_id)
    if rollout is None or rollout.state not in ACTIVE_STATES:
        return
    spec = RolloutSpec.model_validate(rollout.spec)
    if rollout.state == "pending":
        rollout.state, rollout.reason = "running", "started"
        record(session, rollout, "start", f"rollout of {rollout.model} {rollout.version} started")
    limits = _limits(session, rollout, spec, now)
    devices = devices_of(session, rollout.id)
    by_cohort: dict[str, list[RolloutDeviceRow]] = defaultdict(list)
    for d in devices:
        by_cohort[d.cohort].append(d)
    for cohort in cohorts_of(session, rollout.id):
        if cohort.phase in (*ACTIVE_PHASES, "waiting_approval"):
            _step_cohort(session, publisher, rollout, spec, cohort, by_cohort[cohort.cohort], limits, now)
            session.commit()  # per cohort: SQLite's write lock is not held across the next cohort's figure queries
    _settle_state(session, rollout)
    session.commit()


def _settle_state(session: Session, rollout: RolloutRow) -> None:
    """The rollout's state from its cohorts' phases (paused/aborted are the operator's and stay)."""
    session.refresh(rollout, ["state"])  # an operator may have paused or aborted it during this tick
    if rollout.state not in ACTIVE_STATES:
        return
    phases = [c.phase for c in cohorts_of(session, rollout.id)]
    if any(p in ACTIVE_PHASES for p in phases):
        new, reason = "running", rollout.reason
    elif "waiting_approval" in phases:
        new, reason = "waiting_approval", "a wave passed its gates and waits for approval (POST .../approve)"
    elif "halted" in phases:
        halted = [c.cohort for c in cohorts_of(session, rollout.id) if c.phase == "halted"]
        new, reason = "halted", f"halted on {', '.join(halted)}" + (
            "; the other hardware classes completed" if len(halted) < len(phases) else "")
    else:
        new, reason = "completed", "every wave passed its gates"
    if new != rollout.state:
        rollout.state, rollout.reason = new, reason
        if new in ("halted", "completed"):
            rollout.finished_at = utcnow()
            record(session, rollout, new, reason)
        rollout.updated_at = utcnow()


def _note(session: Session, rollout: RolloutRow, cohort: RolloutCohortRow, note: str, *, decision: str | None = None,
          figures: dict[str, Any] | None = None) -> None:
    """Set what the cohort waits for; a new wait worth recording (window, rate limit) is recorded once."""
    if note != cohort.note:
        cohort.note = note
        cohort.updated_at = utcnow()
        if decision is not None:
            record(session, rollout, decision, note, wave=cohort.wave, cohort=cohort.cohort, figures=figures)


def _enter_wave(session: Session, rollout: RolloutRow, cohort: RolloutCohortRow, wave: int, now: float,
                spec: RolloutSpec, why: str, figures: dict[str, Any]) -> None:
    last = len(spec.waves) - 1
    if wave > last:
        cohort.phase, cohort.note = "completed", "every wave passed"
        record(session, rollout, "complete", why or f"cohort {cohort.cohort} passed every wave", wave=last,
               cohort=cohort.cohort, figures=figures)
    else:
        if why:
            record(session, rollout, "proceed", why, wave=cohort.wave, cohort=cohort.cohort, figures=figures)
        cohort.wave, cohort.phase, cohort.note, cohort.figures = wave, "start", "", {}
    cohort.phase_started_at = now
    cohort.updated_at = utcnow()


def _step_cohort(session: Session, publisher: Publisher | None, rollout: RolloutRow, spec: RolloutSpec,
                 cohort: RolloutCohortRow, mine: list[RolloutDeviceRow], limits: _Limits, now: float) -> None:
    for _ in range(len(spec.waves) * 4 + 4):  # several cheap transitions may happen in one tick; never loop forever
        if cohort.phase == "approved":
            _enter_wave(session, rollout, cohort, cohort.wave + 1, now, spec, "", cohort.figures)
            continue
        if cohort.phase == "waiting_approval":  # still guarded: a cohort going bad while it waits halts
            w = spec.waves[cohort.wave]
            figures = compute_figures(session, rollout.id, rollout.model, rollout.version,
                                      [d for d in mine if d.wave == cohort.wave])
            cohort.figures = figures
            if Condition.parse(w.error).evaluate(figures):
                _halt(session, publisher, rollout, cohort, mine, now, f"{spec.wave_name(cohort.wave)}: error condition "
                      f"holds on {cohort.cohort} while waiting for approval: {w.error}", figures)
            return
        if cohort.phase not in ACTIVE_PHASES:
            return
        w = spec.waves[cohort.wave]
        wave_devs = [d for d in mine if d.wave == cohort.wave]
        name = spec.wave_name(cohort.wave)
        if cohort.phase == "start":
            if not wave_devs:
                _enter_wave(session, rollout, cohort, cohort.wave + 1, now, spec, "", {})
                continue
            cohort.phase_started_at = now
            if w.shadow_s > 0:
                _start_shadow(session, publisher, rollout, wave_devs, w.shadow_sample_every, now)
                cohort.phase = "shadow"
                record(session, rollout, "shadow", f"{name}: {len(wave_devs)} device(s) of {cohort.cohort} run "
                       f"{rollout.version} in shadow mode for {w.shadow_s:g} s", wave=cohort.wave, cohort=cohort.cohort,
                       figures={"devices": len(wave_devs)})
            else:
                cohort.phase = "installing"
                record(session, rollout, "wave_start", f"{name}: installing on {len(wave_devs)} device(s) of "
                       f"{cohort.cohort}", wave=cohort.wave, cohort=cohort.cohort, figures={"devices": len(wave_devs)})
            continue
        figures = compute_figures(session, rollout.id, rollout.model, rollout.version, wave_devs)
        cohort.figures = figures
        cohort.updated_at = utcnow()
        error = Condition.parse(w.error)
        if error.evaluate(figures):
            _halt(session, publisher, rollout, cohort, mine, now, f"{name}: error condition holds on {cohort.cohort}: "
                  f"{w.error}", figures)
            return
        if cohort.phase == "shadow":
            elapsed = now - cohort.phase_started_at
            if elapsed < w.shadow_s:
                _note(session, rollout, cohort, f"shadow mode, {w.shadow_s - elapsed:.0f} s left")
                return
            if int(figures["shadow_reporting"] or 0) < w.min_reporting:
                _note(session, rollout, cohort, f"waiting for shadow comparisons from {w.min_reporting} device(s) "
                      f"({figures['shadow_reporting']} so far)")
                return
            cohort.phase, cohort.phase_started_at = "installing", now
            record(session, rollout, "shadow_passed", f"{name}: shadow mode passed on {cohort.cohort}; installing",
                   wave=cohort.wave, cohort=cohort.cohort, figures=figures)
            continue
        if cohort.phase == "installing":
            todo = [d for d in wave_devs if d.status in ("pending", "shadow")]
            if todo:
                if not limits.window_open:
                    _note(session, rollout, cohort, limits.window_note, decision="wait_window", figures=figures)
                    return
                n = len(todo) if limits.budget is None else min(limits.budget, len(todo))
                if n > 0:
                    _start_install(session, publisher, rollout, todo[:n], now)
                    if limits.budget is not None:
                        limits.budget -= n
                if n < len(todo):
                    _note(session, rollout, cohort, f"rate limit: {len(todo) - n} device(s) wait for the next minute",
                          decision="wait_rate_limit", figures=figures)
                    return
            cohort.phase, cohort.phase_started_at, cohort.note = "soaking", now, ""
            record(session, rollout, "installed", f"{name}: every device of {cohort.cohort} told to install "
                   f"{rollout.version}; soaking {w.soak_s:g} s", wave=cohort.wave, cohort=cohort.cohort, figures=figures)
            return  # figures of the new installs come with the next tick
        if cohort.phase == "soaking":
            elapsed = now - cohort.phase_started_at
            if elapsed < w.soak_s:
                _note(session, rollout, cohort, f"soaking, {w.soak_s - elapsed:.0f} s left")
                return
            if int(figures["reporting"] or 0) < w.min_reporting:
                _note(session, rollout, cohort, f"waiting for {w.min_reporting} device(s) to report the candidate's "
                      f"health ({figures['reporting']} so far)")
                return
            if not Condition.parse(w.success).evaluate(figures):
                _note(session, rollout, cohort, f"success condition not met yet: {w.success}")
                return
            why = f"{name}: success condition holds on {cohort.cohort}: {w.success}"
            if w.approval:
                cohort.phase, cohort.note = "waiting_approval", "passed; waits for approval (POST .../approve)"
                record(session, rollout, "await_approval", why, wave=cohort.wave, cohort=cohort.cohort, figures=figures)
                return
            _enter_wave(session, rollout, cohort, cohort.wave + 1, now, spec, why, figures)
            continue
        return


# -- acting on devices ------------------------------------------------------------------------------


def _touch(session: Session, pairs: list[tuple[RolloutDeviceRow, Device]], marks: tuple[int, int, int]) -> None:
    """First contact with devices: where their data starts, what each ran before, its previous-version baseline."""
    fresh = [(d, device) for d, device in pairs if d.shadow_at is None and d.started_at is None]
    for d, device in fresh:
        d.previous_model, d.previous_version = device.model, device.version
        if d.previous_version is None and device.desired_version is not None:
            d.previous_model, d.previous_version = device.desired_model, device.desired_version
        d.since_telemetry_id, d.since_summary_id, d.since_event_id = marks
    measured = baselines(session, [(d.device_id, d.previous_model, d.previous_version) for d, _ in fresh], marks)
    for d, _ in fresh:
        d.baseline = measured.get(d.device_id, {})


def _shadow_target(session: Session, rollout: RolloutRow, device: Device, sample_every: int) -> dict[str, Any]:
    from .registry import Registry, bundle_url
    from .tuf_service import tuf_of

    try:
        from .variants import choose

        mv = choose(session, device, rollout.model, rollout.version)[0]
    except ImportError:
        mv = Registry.get(session, rollout.model, rollout.version)
    variant = getattr(mv, "variant", None)
    artifact = ArtifactRef(url=bundle_url(mv.name, mv.version, variant), sha256=mv.sha256, size=mv.size)
    target = None
    tuf = tuf_of(session)
    if tuf is not None:
        target = tuf.register([mv], rollback=False)[0]
    return ShadowTarget(model=mv.name, version=mv.version, artifact=artifact, target=target,
                        sample_every=sample_every).model_dump(mode="json")


def _bump(devices: list[Device], now: float) -> None:
    for device in devices:
        device.desired_generation = Device.desired_generation + 1  # type: ignore[assignment]
        device.desired_issued_at = now


def _publish(session: Session, publisher: Publisher | None, devices: list[Device]) -> None:
    for device in devices:
        session.refresh(device)
        if publisher is not None and not publish_desired(publisher, device):
            log.warning("desired state for %s recorded but not yet published; it goes out when the bus reconnects", device.id)


def _start_shadow(session: Session, publisher: Publisher | None, rollout: RolloutRow, devs: list[RolloutDeviceRow],
                  sample_every: int, now: float) -> None:
    marks = watermarks(session)
    rows = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_([x.device_id for x in devs]))).all()}
    touched: list[Device] = []
    _touch(session, [(d, rows[d.device_id]) for d in devs if d.device_id in rows], marks)
    for d in devs:
        device = rows.get(d.device_id)
        if device is None:
            continue
        try:
            device.desired_shadow = _shadow_target(session, rollout, device, sample_every)
        except ControlError as exc:  # e.g. no variant fits: it will be refused at install too
            log.warning("rollout %s: no shadow for %s: %s", rollout.id, device.id, exc)
            continue
        d.status, d.shadow_at = "shadow", now
        touched.append(device)
    _bump(touched, now)
    session.flush()
    session.commit()
    _publish(session, publisher, touched)


def _start_install(session: Session, publisher: Publisher | None, rollout: RolloutRow, devs: list[RolloutDeviceRow],
                   now: float) -> None:
    """Tell ``devs`` to install the candidate (their shadow, if any, ends in the same desired state)."""
    marks = watermarks(session)
    rows = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_([x.device_id for x in devs]))).all()}
    live = [d for d in devs if d.device_id in rows]
    for d in devs:
        if d.device_id not in rows:
            d.status = "refused"  # deleted since the rollout was created
    _touch(session, [(d, rows[d.device_id]) for d in live], marks)
    for d in live:
        rows[d.device_id].desired_shadow = None
    session.commit()  # what this tick decided so far is kept even if the deployment below is refused
    if not live:
        return
    try:
        deploy(session, publisher, rollout.model, rollout.version, device_ids=[d.device_id for d in live])
    except ControlError as exc:
        # one device that can run no variant refuses the whole batch: deploy one by one, note who was refused
        session.rollback()
        for d in live:
            device = session.get(Device, d.device_id)
            d2 = session.get(RolloutDeviceRow, d.id)
            assert device is not None and d2 is not None
            _touch(session, [(d2, device)], marks)
            device.desired_shadow = None
            try:
                deploy(session, publisher, rollout.model, rollout.version, device_ids=[d2.device_id])
                d2.status, d2.started_at = "started", now
            except ControlError as one:
                session.rollback()
                d2 = session.get(RolloutDeviceRow, d.id)
                assert d2 is not None
                d2.status, d2.started_at = "refused", now
                record(session, rollout, "refused", f"{d2.device_id}: {one.message}", wave=d2.wave, cohort=d2.cohort)
            session.commit()
        log.warning("rollout %s: batch install refused (%s); installed one by one", rollout.id, exc)
        return
    for d in live:
        d.status, d.started_at = "started", now
    session.commit()


def _halt(session: Session, publisher: Publisher | None, rollout: RolloutRow, cohort: RolloutCohortRow,
          mine: list[RolloutDeviceRow], now: float, reason: str, figures: dict[str, Any]) -> None:
    """Stop the cohort and send its devices of this and earlier waves back to what each ran before."""
    cohort.phase, cohort.note, cohort.phase_started_at = "halted", reason, now
    cohort.updated_at = utcnow()
    record(session, rollout, "halt", reason, wave=cohort.wave, cohort=cohort.cohort, figures=figures)
    back = [d for d in mine if d.wave <= cohort.wave and d.status in ("shadow", "started")]
    revert_devices(session, publisher, rollout, back, now, wave=cohort.wave, cohort=cohort.cohort)


def revert_devices(session: Session, publisher: Publisher | None, rollout: RolloutRow, back: list[RolloutDeviceRow],
                   now: float, *, wave: int | None = None, cohort: str | None = None, actor: str | None = None) -> None:
    """End the shadow of shadowing devices; deploy each started device's previous version with rollback=True."""
    if not back:
        return
    rows = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_([x.device_id for x in back]))).all()}
    shadow_only = [rows[d.device_id] for d in back if d.status == "shadow" and d.device_id in rows]
    for device in shadow_only:
        device.desired_shadow = None
    _bump(shadow_only, now)
    targets: dict[tuple[str, str], list[RolloutDeviceRow]] = defaultdict(list)
    stranded: list[str] = []
    for d in back:
        if d.status == "started":
            if d.device_id in rows:
                rows[d.device_id].desired_shadow = None
            if d.previous_version is None or d.previous_model is None or (d.previous_model, d.previous_version) == (
                    rollout.model, rollout.version):
                stranded.append(d.device_id)
            else:
                targets[(d.previous_model, d.previous_version)].append(d)
        d.status, d.reverted_at = "reverted", now
    session.flush()
    session.commit()
    _publish(session, publisher, shadow_only)
    for (model, version), devs in targets.items():
        ids = [d.device_id for d in devs]
        try:
            deploy(session, publisher, model, version, device_ids=ids, rollback=True)
            record(session, rollout, "rollback", f"{len(ids)} device(s) back to {model} {version}", wave=wave, cohort=cohort,
                   figures={"devices": ids[:100], "count": len(ids)}, actor=actor)
        except ControlError as exc:
            session.rollback()
            record(session, rollout, "rollback_failed", f"cannot return {len(ids)} device(s) to {model} {version}: "
                   f"{exc.message}", wave=wave, cohort=cohort, figures={"devices": ids[:100]}, actor=actor)
        session.commit()
    if stranded:
        record(session, rollout, "rollback_skipped", f"{len(stranded)} device(s) had no earlier version to return to; "
               "they keep the candidate", wave=wave, cohort=cohort, figures={"devices": stranded[:100]}, actor=actor)
    if shadow_only:
        record(session, rollout, "shadow_end", f"{len(shadow_only)} device(s) stop shadowing {rollout.version}",
               wave=wave, cohort=cohort, figures={"count": len(shadow_only)}, actor=actor)
    session.commit()


def abort(session: Session, publisher: Publisher | None, rollout_id: int, *, actor: str | None = None,
          rollback: bool = False, now: float | None = None) -> RolloutRow:
    """Stop the rollout for good. Shadows end; with ``rollback`` the started devices return to their previous version."""
    rollout = get_rollout(session, rollout_id)
    if rollout.state in FINAL_STATES:
        raise ConflictError(f"rollout {rollout_id} is already {rollout.state}")
    now = time.time() if now is None else now
    rollout.state, rollout.reason, rollout.finished_at = "aborted", f"aborted by {actor or 'an operator'}", utcnow()
    for c in cohorts_of(session, rollout_id):
        if c.phase not in ("completed", "halted"):
            c.phase = "aborted"
    record(session, rollout, "abort", rollout.reason + ("; rolling back started devices" if rollback else ""), actor=actor)
    session.commit()
    devs = devices_of(session, rollout_id)
    back = [d for d in devs if d.status == "shadow" or (rollback and d.status == "started")]
    revert_devices(session, publisher, rollout, back, now, actor=actor)
    session.commit()
    return rollout
