"""Monitoring cost at fleet size (issue 7): what the monitor loop and ``/metrics`` cost with 1,000 devices.

Setup: a real SQLite database (WAL, migrated), 1,000 devices, each having sent ``MINUTES`` minutes of
telemetry at one record every 10 s, stored through the real ingest (``Ingest.handle``, one Batch per
device per minute). Then, timed on this machine (one process):

- **ingest**: records stored per second through ``Ingest.handle`` (decode, de-duplicate, insert, commit);
- **roll-up**: raw rows folded into per-minute rollups per second (``series.roll_up`` from scratch);
- **rule check**: one ``RuleEvaluator.evaluate`` of a threshold rule over all devices plus an absence
  rule and a fleet-offline rule (what every monitor tick does);
- **fleet series**: ``GET /api/v1/fleet/series`` work for one metric over the whole fleet, the last hour, step 60;
- **/metrics**: one collect of the fleet collector (what a Prometheus scrape costs).

Figures are wall-clock on a shared 2-core machine: compare them with each other, not across machines.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 1000
MINUTES = 10
PER_MINUTE = 6


def run(devices: int = DEVICES, minutes: int = MINUTES) -> dict[str, Any]:
    from edgewise import protocol as p
    from edgewise.control import alerts as al
    from edgewise.control import series
    from edgewise.control.db import init_db
    from edgewise.control.devices import register_device
    from edgewise.control.ingest import Ingest
    from edgewise.control.timeutil import utcnow

    with tempfile.TemporaryDirectory() as tmp:
        db = init_db(f"sqlite:///{Path(tmp) / 'bench.db'}")
        ingest = Ingest(db)
        ids = [f"bench-{i:05d}" for i in range(devices)]
        with db.session() as s:
            for d in ids:
                dev, _ = register_device(s, d, ["bench"])
                dev.clock_offset_s, dev.clock_offset_at = 0.0, utcnow()
            s.commit()
        for d in ids:
            ingest.handle(p.topics.state(d), p.encode(p.DeviceState(device_id=d, status="online")))
        t_start = time.time() - minutes * 60
        payloads = []
        for m in range(minutes):
            for i, d in enumerate(ids):
                recs = [p.Telemetry(device_id=d, seq=m * PER_MINUTE + k, ts=t_start + m * 60 + k * 10, window_s=10,
                                    window_inferences=100, errors=m, latency_p50_ms=4.0, latency_p95_ms=8.0 + (i % 50),
                                    cpu_percent=30.0, outbox_pending=0) for k in range(PER_MINUTE)]
                payloads.append((p.topics.telemetry(d), p.encode(p.Batch(device_id=d, items=recs))))
        t0 = time.perf_counter()
        for topic, payload in payloads:
            ingest.handle(topic, payload)
        ingest_s = time.perf_counter() - t0
        rows = devices * minutes * PER_MINUTE

        t0 = time.perf_counter()
        with db.session() as s:
            rolled = series.roll_up(s)
        rollup_s = time.perf_counter() - t0

        with db.session() as s:
            al.create_rule(s, al.RuleIn(name="slow", kind="threshold", metric="latency_p95_ms", threshold=50, for_s=0))
            al.create_rule(s, al.RuleIn(name="silent", kind="absence", for_s=600))
            al.create_rule(s, al.RuleIn(name="offline", kind="fleet_offline", tag="bench", threshold=0.05, for_s=0))
        ev = al.RuleEvaluator()
        with db.session() as s:
            t0 = time.perf_counter()
            changed = ev.evaluate(s, utcnow())
            rules_s = time.perf_counter() - t0
        with db.session() as s:
            t0 = time.perf_counter()
            out = series.fleet_series(s, None, ["latency_p95_ms"], since=t_start, until=time.time(), step=60)
            fleet_s = time.perf_counter() - t0

        class _Services:  # what the collector reads: the database, ingest's counters, no monitor thread
            pass

        from edgewise.control.metrics import FleetCollector

        svc = _Services()
        svc.db, svc.ingest, svc.monitor = db, ingest, None  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        families = list(FleetCollector(svc).collect())  # type: ignore[arg-type]
        metrics_s = time.perf_counter() - t0
        db.dispose()
    return {
        "devices": devices, "raw_rows": rows, "rolled": rolled,
        "ingest_records_per_s": round(rows / ingest_s), "rollup_rows_per_s": round(rolled / rollup_s),
        "rule_check_s": round(rules_s, 3), "alerts_opened": len(changed),
        "fleet_series_s": round(fleet_s, 3), "fleet_series_points": len(out["latency_p95_ms"]),
        "metrics_collect_s": round(metrics_s, 3), "metric_families": len(families),
    }


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        f"### Monitoring at {r['devices']:,} devices ({r['raw_rows']:,} raw telemetry rows, SQLite)",
        "",
        "| step | figure |",
        "|---|---|",
        f"| ingest (Ingest.handle, batches of {PER_MINUTE}) | {r['ingest_records_per_s']:,} records/s |",
        f"| roll-up of raw rows into per-minute rows | {r['rollup_rows_per_s']:,} rows/s |",
        f"| one rule check (threshold + absence + fleet-offline over all devices; {r['alerts_opened']} alerts opened) | {r['rule_check_s']} s |",
        f"| fleet series, 1 metric, step 60 ({r['fleet_series_points']} points) | {r['fleet_series_s']} s |",
        f"| one /metrics collect ({r['metric_families']} families) | {r['metrics_collect_s']} s |",
        "",
    ])


if __name__ == "__main__":
    res = run()
    print(markdown(res))
