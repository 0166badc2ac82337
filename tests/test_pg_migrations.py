"""Migrations both ways (upgrade head → downgrade base → upgrade head) on SQLite and on PostgreSQL,
and the models == migrations check on PostgreSQL (tests/test_control_db.py does it on SQLite)."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from edgewise.control.db import alembic_config, make_engine, upgrade
from edgewise.control.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request, tmp_path) -> str:
    """An empty database (no tables at all) on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("pg_cluster").create_database(template="template0")


def _tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_migrations_go_up_to_head_down_to_base_and_up_again(empty_db_url):
    engine = make_engine(empty_db_url)
    try:
        upgrade(engine)
        full = _tables(engine)
        assert {"devices", "model_versions", "telemetry", "alembic_version"} <= full
        command.downgrade(alembic_config(empty_db_url, engine), "base")
        assert _tables(engine) <= {"alembic_version"}
        upgrade(engine)
        assert _tables(engine) == full
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == _head()
    finally:
        engine.dispose()


def test_each_migration_step_downgrades_cleanly_to_the_one_before(empty_db_url):
    """Down one revision and up again at every step: a downgrade that leaves a table or type behind fails here."""
    engine = make_engine(empty_db_url)
    cfg = alembic_config(empty_db_url, engine)
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]
    try:
        for rev in revisions:
            upgrade(engine, rev)
            command.downgrade(cfg, "-1")
            upgrade(engine, rev)
    finally:
        engine.dispose()


def test_migrations_create_exactly_the_schema_the_models_describe_on_postgresql(pg_cluster):
    url = pg_cluster.create_database(template="template0")
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_new_postgresql_databases_start_at_the_migrated_head(db_url, _test_database_engine):
    """The session's databases (template1 migrated once) are at head, so init_db has nothing left to do."""
    if _test_database_engine != "postgresql":
        pytest.skip("runs on EDGEWISE_TEST_DB=postgresql")
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == _head()
    finally:
        engine.dispose()
