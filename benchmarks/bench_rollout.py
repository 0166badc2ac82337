"""The rollout engine's own cost at 1,000 devices (issue 7): how long one tick takes on SQLite.

Setup: a fresh SQLite database (the control plane's schema, migrations applied), 1,000 devices in 4
hardware classes running digits 1.0.0, each with 10 summaries of 1.0.0 (the previous-version
baseline). A rollout of 1.1.0 to all of them: waves 1% / 10% / 100%, zero soak, min_reporting 0,
success ``error_rate <= 0.01``, the usual error condition. No broker (publisher None), no TUF: what is
measured is the engine — target resolution, wave assignment, per-device baseline, deploy records,
gate figures — not the network. Between ticks every started device "installs" the candidate (its
state row says so) and sends 3 summaries of it, written straight into the tables.

Figures: time to create the rollout (wave/cohort assignment), time of each tick (the largest is the
tick that starts the 900-device last wave), ticks until completed, and the time of one gate-only tick
over a fully reporting 1,000-device wave (30,000 candidate summary rows).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 1000
CLASSES = ("rpi4", "jetson", "x86", "imx8")
BASELINE_ROWS = 10
CANDIDATE_ROWS = 3


def run() -> dict[str, Any]:
    from sqlalchemy import insert

    from edgewise.control.db import init_db
    from edgewise.control.models import Device, ModelVersion, SummaryRow
    from edgewise.control.rollout_engine import RolloutEngine
    from edgewise.control.rollouts import RolloutSpec, WaveSpec, create_rollout
    from edgewise.control.timeutil import utcnow

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    db = init_db(f"sqlite:///{tmp / 'cp.db'}")
    seq = iter(range(1, 10**9))
    with db.session() as s:
        for v in ("1.0.0", "1.1.0"):
            s.add(ModelVersion(name="digits", version=v, sha256="0" * 64, size=1000, key_id="k", manifest={},
                               path=f"digits-{v}.ewb"))
        s.execute(insert(Device), [{
            "id": f"b{i:04d}", "tags": ["bench"], "hardware": {"hardware_class": CLASSES[i % 4], "ram_mb": 2048},
            "status": "online", "model": "digits", "version": "1.0.0", "desired_model": "digits",
            "desired_version": "1.0.0", "desired_generation": 1, "registered_at": utcnow()} for i in range(DEVICES)])
        s.execute(insert(SummaryRow), [_summary(f"b{i:04d}", next(seq), "1.0.0", 10.0)
                                       for i in range(DEVICES) for _ in range(BASELINE_ROWS)])
        s.commit()
    error = "failed_fraction > 0.2 or error_rate > 0.05 or p95_ratio > 1.5 or crashes > 0"
    spec = RolloutSpec(model="digits", version="1.1.0", tag="bench", waves=[
        WaveSpec(name=n, percent=pct, min_reporting=0, success="error_rate <= 0.01", error=error)
        for n, pct in (("canary", 1), ("early", 10), ("all", 100))])
    with db.session() as s:
        t = time.perf_counter()
        rollout_id = create_rollout(s, spec).id
        create_s = time.perf_counter() - t
    engine = RolloutEngine(db, None, tick_s=3600)
    ticks: list[float] = []
    state = "pending"
    now = 1_800_000_000.0
    while state not in ("completed", "halted") and len(ticks) < 50:
        t = time.perf_counter()
        engine.tick(now=now)
        ticks.append(time.perf_counter() - t)
        now += 1
        with db.session() as s:
            from edgewise.control.models import RolloutRow

            state = s.get(RolloutRow, rollout_id).state  # type: ignore[union-attr]
            updated = s.query(Device).filter(Device.desired_version == "1.1.0", Device.version != "1.1.0").all()
            rows = []
            for d in updated:
                d.version = "1.1.0"
                rows += [_summary(d.id, next(seq), "1.1.0", 11.0) for _ in range(CANDIDATE_ROWS)]
            if rows:
                s.execute(insert(SummaryRow), rows)
            s.commit()
    # a gate-only tick over a fully reporting 1,000-device wave
    from edgewise.control.gates import compute_figures
    from edgewise.control.rollouts import devices_of

    with db.session() as s:
        for _ in range(9):
            s.execute(insert(SummaryRow), [_summary(f"b{i:04d}", next(seq), "1.1.0", 11.0) for i in range(DEVICES)])
        s.commit()
        devs = [d for d in devices_of(s, rollout_id)]
        t = time.perf_counter()
        figures = compute_figures(s, rollout_id, "digits", "1.1.0", devs)
        gate_s = time.perf_counter() - t
    db.dispose()
    return {
        "devices": DEVICES, "state": state, "ticks": len(ticks), "create_s": round(create_s, 3),
        "tick_max_s": round(max(ticks), 3), "tick_median_s": round(sorted(ticks)[len(ticks) // 2], 3),
        "tick_total_s": round(sum(ticks), 3), "gates_1000_s": round(gate_s, 3),
        "gates_rows": DEVICES * (CANDIDATE_ROWS + 9), "p95_ratio": figures["p95_ratio"],
    }


def _summary(device_id: str, seq: int, version: str, p95: float) -> dict[str, Any]:
    from edgewise.control.timeutil import utcnow

    return {"device_id": device_id, "seq": seq, "ts": 0.0, "received_at": utcnow(), "model": "digits", "version": version,
            "window_s": 10.0, "inferences": 100, "errors": 0, "predictions": 100, "latency_p95_ms": p95,
            "classes": {}, "confidence_bins": [], "confidence_hist": [0] * 8 + [100, 0]}


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        f"Rollout engine on SQLite, {r['devices']} devices in 4 hardware classes, waves 1% / 10% / 100%, zero soak "
        "(no broker, no TUF: the engine's own cost).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| create the rollout (resolve, assign waves and cohorts) | {r['create_s']} s |",
        f"| ticks until {r['state']} | {r['ticks']} |",
        f"| slowest tick (starts the 900-device wave: baselines + deploy) | {r['tick_max_s']} s |",
        f"| median tick | {r['tick_median_s']} s |",
        f"| all ticks together | {r['tick_total_s']} s |",
        f"| gate figures of one 1,000-device wave ({r['gates_rows']} candidate summaries) | {r['gates_1000_s']} s |",
    ])


if __name__ == "__main__":
    result = run()
    print(result)
    print(markdown(result))
