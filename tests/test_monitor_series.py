"""Health series: real ingest into real SQLite, per-minute rollups, retention with a fake clock, queries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from edgewise import protocol as p
from edgewise.control import series
from edgewise.control.db import init_db
from edgewise.control.devices import register_device
from edgewise.control.ingest import Ingest
from edgewise.control.models import Device, SeriesMinute, SummaryRow, TelemetryRow
from edgewise.control.timeutil import utcnow
from edgewise.protocol.messages import ShadowStats

T0 = int(utcnow().timestamp() // 3600) * 3600 - 3600  # an hour or two ago, on an hour boundary


@pytest.fixture()
def db(tmp_path, db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


@pytest.fixture()
def ingest(db):
    return Ingest(db)


def synced(db, *device_ids: str, tags: tuple[str, ...] = ()) -> None:
    """Devices whose clocks the server already trusts (offset 0), so each record lands at its own ts."""
    with db.session() as s:
        for d in device_ids:
            dev, _ = register_device(s, d, list(tags))
            dev.clock_offset_s, dev.clock_offset_at = 0.0, utcnow()
        s.commit()


def send(ingest, device_id: str, *records) -> None:
    ingest.handle(p.topics.telemetry(device_id), p.encode(p.Batch(device_id=device_id, items=list(records))))


def tel(device_id: str, seq: int, ts: float, **kw) -> p.Telemetry:
    base = dict(window_s=10.0, window_inferences=100, latency_p50_ms=5.0, latency_p95_ms=10.0)
    return p.Telemetry(device_id=device_id, seq=seq, ts=ts, **{**base, **kw})


def roll(db) -> int:
    with db.session() as s:
        return series.roll_up(s)


def test_telemetry_rolls_up_into_one_row_per_device_and_minute(db, ingest):
    synced(db, "ms-a")
    send(ingest, "ms-a", *[tel("ms-a", i, T0 + 10 * i, latency_p95_ms=10.0 + i) for i in range(9)])  # 1.5 minutes
    assert roll(db) == 9
    with db.session() as s:
        rows = s.scalars(select(SeriesMinute).order_by(SeriesMinute.minute)).all()
        assert [(r.minute, r.records, r.inferences) for r in rows] == [(T0, 6, 600), (T0 + 60, 3, 300)]
        assert rows[0].latency_p95_max == 15.0 and rows[0].latency_p95_sum == sum(10.0 + i for i in range(6))
    assert roll(db) == 0  # the cursor remembers: nothing is counted twice


def test_a_late_record_merges_into_its_minute_without_recounting_the_others(db, ingest):
    synced(db, "ms-late")
    send(ingest, "ms-late", tel("ms-late", 1, T0 + 5), tel("ms-late", 2, T0 + 15))
    roll(db)
    send(ingest, "ms-late", tel("ms-late", 3, T0 + 25, latency_p95_ms=40.0))  # e.g. emptied from the outbox later
    send(ingest, "ms-late", tel("ms-late", 3, T0 + 25, latency_p95_ms=40.0))  # and redelivered: stored once
    roll(db)
    with db.session() as s:
        row = s.scalars(select(SeriesMinute).where(SeriesMinute.device_id == "ms-late")).one()
        assert (row.records, row.inferences, row.latency_p95_max) == (3, 300, 40.0)


def test_error_rate_comes_from_the_growth_of_the_cumulative_error_counter(db, ingest):
    synced(db, "ms-err")
    errors = [0, 2, 2, 5, 1]  # the agent restarted before the last sample: its counter began again
    send(ingest, "ms-err", *[tel("ms-err", i, T0 + 60 * i, errors=e, window_inferences=98) for i, e in enumerate(errors)])
    roll(db)
    with db.session() as s:
        out = series.device_series(s, "ms-err", ["errors", "error_rate"], since=T0, until=T0 + 300, step=60)
        raw = series.device_series(s, "ms-err", ["errors"], since=T0, until=T0 + 300, step=None)
    assert [v for _, v in out["errors"]] == [0, 2, 0, 3, 1]
    assert out["error_rate"][1] == [T0 + 60, 0.02]  # 2 failed of 100 predictions
    assert [v for _, v in raw["errors"]] == [0, 2, 0, 3, 1]


def test_device_series_come_raw_per_minute_or_per_coarser_step(db, ingest):
    synced(db, "ms-steps")
    send(ingest, "ms-steps", *[tel("ms-steps", i, T0 + 30 * i, latency_p95_ms=float(10 * (i + 1)), cpu_percent=20.0,
                                   temperature_c=50.0 + i, outbox_pending=i, dropped=0) for i in range(10)])
    roll(db)
    with db.session() as s:
        raw = series.device_series(s, "ms-steps", ["latency_p95_ms"], since=T0, until=T0 + 600, step=None)
        per_min = series.device_series(s, "ms-steps", ["latency_p95_ms", "inference_rate", "outbox_depth"],
                                       since=T0, until=T0 + 600, step=60)
        five = series.device_series(s, "ms-steps", ["latency_p95_ms", "latency_p95_max_ms", "temperature_c"],
                                    since=T0, until=T0 + 600, step=300)
    assert [v for _, v in raw["latency_p95_ms"]] == [10.0 * (i + 1) for i in range(10)]
    assert per_min["latency_p95_ms"][0] == [T0, 15.0] and len(per_min["latency_p95_ms"]) == 5
    assert per_min["inference_rate"][0] == [T0, 10.0]  # 200 predictions over 20 s of windows
    assert per_min["outbox_depth"][-1] == [T0 + 240, 9]
    assert five["latency_p95_ms"] == [[T0, 55.0]] and five["latency_p95_max_ms"] == [[T0, 100.0]]
    assert five["temperature_c"] == [[T0, 54.5]]


def test_fleet_series_add_rates_and_average_latencies_over_the_chosen_devices(db, ingest):
    synced(db, "ms-f1", "ms-f2", tags=("shelf",))
    synced(db, "ms-f3")
    for dev, lat in (("ms-f1", 10.0), ("ms-f2", 30.0), ("ms-f3", 500.0)):
        send(ingest, dev, tel(dev, 1, T0 + 1, latency_p95_ms=lat), tel(dev, 2, T0 + 31, latency_p95_ms=lat))
    roll(db)
    with db.session() as s:
        shelf = series.fleet_series(s, ["ms-f1", "ms-f2"], ["inference_rate", "latency_p95_ms", "devices_reporting"],
                                    since=T0, until=T0 + 60, step=60)
        fleet = series.fleet_series(s, None, ["latency_p95_max_ms", "devices_reporting"], since=T0, until=T0 + 60, step=60)
    assert shelf == {"inference_rate": [[T0, 20.0]], "latency_p95_ms": [[T0, 20.0]], "devices_reporting": [[T0, 2]]}
    assert fleet == {"latency_p95_max_ms": [[T0, 500.0]], "devices_reporting": [[T0, 3]]}


def test_summaries_add_up_their_class_and_confidence_histograms(db, ingest):
    synced(db, "ms-sum")
    hist = [0] * 9 + [3]
    summaries = [p.Summary(device_id="ms-sum", seq=i, ts=T0 + 20 * i, window_s=20.0, inferences=50, errors=1,
                           latency_p95_ms=7.0, classes={"3": 40, "7": 10}, confidence_hist=hist, drift_score=0.1 * i,
                           shadow=ShadowStats(model="digits", version="2", compared=10, agreed=9))
                 for i in range(3)]
    send(ingest, "ms-sum", *summaries)
    roll(db)
    with db.session() as s:
        out = series.device_series(s, "ms-sum", ["classes", "confidence_hist", "error_rate", "drift_score_max",
                                                 "shadow_agreement"], since=T0, until=T0 + 60, step=60)
    assert out["classes"] == [[T0, {"3": 120, "7": 30}]]
    assert out["confidence_hist"] == [[T0, [0] * 9 + [9]]]
    assert out["error_rate"] == [[T0, round(3 / 153, 6)]]
    assert out["drift_score_max"] == [[T0, 0.2]] and out["shadow_agreement"] == [[T0, 0.9]]


def test_link_state_is_sampled_from_the_device_status_each_minute(db, ingest):
    synced(db, "ms-up", "ms-down")
    ingest.handle(p.topics.state("ms-up"), p.encode(p.DeviceState(device_id="ms-up", status="online")))
    ingest.handle(p.topics.state("ms-down"), p.encode(p.DeviceState(device_id="ms-down", status="offline")))
    now = utcnow()
    with db.session() as s:
        assert series.sample_link_state(s, now) == 2
        minute = series.minute_of(now.timestamp())
        dev = series.device_series(s, "ms-down", ["link_state"], since=minute, until=minute + 60, step=60)
        fleet = series.fleet_series(s, None, ["link_state", "devices_online"], since=minute, until=minute + 60, step=60)
    assert dev == {"link_state": [[minute, 0.0]]}
    assert fleet == {"link_state": [[minute, 0.5]], "devices_online": [[minute, 1.0]]}


def _count(db, table) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def test_retention_drops_raw_rows_after_a_day_and_rollups_after_a_month_on_a_fake_clock(db, ingest):
    synced(db, "ms-ret")
    send(ingest, "ms-ret", *[tel("ms-ret", i, T0 + 60 * i) for i in range(3)])
    send(ingest, "ms-ret", p.Summary(device_id="ms-ret", seq=10, ts=T0, window_s=10, inferences=5))
    roll(db)
    send(ingest, "ms-ret", tel("ms-ret", 3, T0 + 180))  # not rolled up yet: retention must not lose it
    now = utcnow()
    keep = dict(raw_retention=timedelta(days=1), rollup_retention=timedelta(days=30))
    with db.session() as s:
        assert series.prune(s, now + timedelta(hours=23), **keep) == series.Pruned(0, 0, 0)
        assert series.prune(s, now + timedelta(days=1, minutes=1), **keep) == series.Pruned(3, 1, 0)
    assert _count(db, TelemetryRow) == 1 and _count(db, SummaryRow) == 0 and _count(db, SeriesMinute) == 3
    roll(db)
    with db.session() as s:
        assert series.prune(s, now + timedelta(days=2), **keep).telemetry == 1
        assert series.device_series(s, "ms-ret", ["inferences"], since=T0, until=T0 + 600, step=60)["inferences"][-1] == [T0 + 180, 100]
        assert series.prune(s, now + timedelta(days=31), **keep).rollups == 4
    assert _count(db, SeriesMinute) == 0 and _count(db, Device) == 1


def test_rolling_up_starts_again_when_ids_restart_below_the_cursor_after_everything_was_pruned(db, ingest):
    synced(db, "ms-restart")
    send(ingest, "ms-restart", *[tel("ms-restart", i, T0 + i) for i in range(5)])
    roll(db)
    with db.session() as s:
        series.prune(s, utcnow() + timedelta(days=2), raw_retention=timedelta(days=1), rollup_retention=timedelta(days=30))
    send(ingest, "ms-restart", tel("ms-restart", 100, T0 + 120))  # SQLite gives it id 1 again
    assert roll(db) == 1


def test_unknown_metric_names_and_bad_steps_are_refused_with_what_to_use(db):
    from edgewise.control.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="unknown metric 'latency_p99'.*latency_p95_ms"):
        series.check_metrics(["latency_p99"])
    with db.session() as s, pytest.raises(InvalidRequestError, match="multiple|whole number of minutes"):
        series.device_series(s, "x", ["errors"], since=T0, until=T0 + 60, step=90)


def test_retention_and_webhooks_are_configurable_from_the_environment_and_checked():
    from edgewise.control.settings import ServerSettings

    s = ServerSettings.from_env({"EDGEWISE_RAW_RETENTION": "P2D", "EDGEWISE_ROLLUP_RETENTION": "7776000",
                                 "EDGEWISE_ALERT_WEBHOOKS": "http://a.example/x, https://b.example/y"})
    assert s.raw_retention == timedelta(days=2) and s.rollup_retention == timedelta(days=90)
    assert s.alert_webhooks == ["http://a.example/x", "https://b.example/y"]
    assert ServerSettings().raw_retention == timedelta(days=1) and ServerSettings().rollup_retention == timedelta(days=30)
    with pytest.raises(ValueError, match="positive duration"):
        ServerSettings(raw_retention=0)
    with pytest.raises(ValueError, match="http:// or https://"):
        ServerSettings(alert_webhooks=["ftp://x"])


def test_retention_deletes_raw_rows_oldest_first_in_bounded_batches(db, ingest, monkeypatch):
    monkeypatch.setattr(series, "PRUNE_BATCH", 2)  # several transactions instead of one long write lock
    synced(db, "ms-batch")
    send(ingest, "ms-batch", *[tel("ms-batch", i, T0 + i) for i in range(7)])
    roll(db)
    with db.session() as s:
        pruned = series.prune(s, utcnow() + timedelta(days=2), raw_retention=timedelta(days=1),
                              rollup_retention=timedelta(days=30))
    assert pruned.telemetry == 7 and _count(db, TelemetryRow) == 0
