"""Dialect-specific code paths, on SQLite and on PostgreSQL (the session's cluster, tests/pg.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from edgewise.control.db import init_db, insert_ignore
from edgewise.control.devices import register_device
from edgewise.control.models import TelemetryRow


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cp.db'}"
    else:
        url = request.getfixturevalue("pg_cluster").create_database()
    d = init_db(url)
    yield d
    d.dispose()


def _telemetry(seq: int) -> dict:
    return {"device_id": "pg-d1", "seq": seq, "ts": 1000.0 + seq, "received_at": datetime.now(UTC), "uptime_s": 1.0,
            "inferences": 0, "errors": 0, "window_inferences": 0, "window_s": 1.0}


def test_insert_ignore_says_inserted_for_a_new_row_and_duplicate_for_a_repeated_one(db):
    with db.session() as s:
        register_device(s, "pg-d1", [])
        assert insert_ignore(s, TelemetryRow.__table__, _telemetry(1)) is True
        assert insert_ignore(s, TelemetryRow.__table__, _telemetry(2)) is True
        assert insert_ignore(s, TelemetryRow.__table__, _telemetry(1)) is False
        s.commit()
        assert s.scalar(select(func.count()).select_from(TelemetryRow)) == 2


def test_registering_a_device_twice_creates_it_once(db):
    with db.session() as s:
        assert register_device(s, "pg-d2", ["a"])[1] is True
        assert register_device(s, "pg-d2", ["a"])[1] is False
