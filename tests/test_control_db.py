"""Control-plane storage: settings, migrations and the database engine (no HTTP, no broker)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from edgewise.control.db import MIGRATIONS_DIR, init_db
from edgewise.control.models import Base
from edgewise.control.settings import ServerSettings


def test_migrations_create_exactly_the_schema_the_models_describe(tmp_path):
    db = init_db(f"sqlite:///{tmp_path / 'cp.db'}")
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert {"devices", "model_versions", "deployments", "telemetry", "events", "alembic_version"} <= tables


def test_migrating_twice_is_harmless_and_keeps_data(db_url):
    url = db_url
    db = init_db(url)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO devices (id, tags, status, desired_generation, registered_at) "
                          "VALUES ('d1', '[]', 'registered', 0, '2025-01-01 00:00:00')"))
    db.dispose()
    db = init_db(url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM devices")).scalar_one() == "d1"


def test_sqlite_runs_in_wal_mode_so_readers_do_not_block_ingest(tmp_path):
    db = init_db(f"sqlite:///{tmp_path / 'cp.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


def test_migration_scripts_are_located_next_to_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert MIGRATIONS_DIR.is_absolute() and (MIGRATIONS_DIR / "env.py").is_file()
    init_db("sqlite://")  # in-memory, from an unrelated cwd


def test_settings_default_to_sqlite_and_the_embedded_broker_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEWISE_DATABASE_URL_TEMPLATE", raising=False)  # set by EDGEWISE_TEST_DB=postgresql
    s = ServerSettings(data_dir=tmp_path)
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'edgewise.db'}"
    assert s.embedded_broker and s.effective_broker_url == "mqtt://127.0.0.1:1883"
    assert s.effective_public_url == "http://127.0.0.1:8000"


def test_settings_read_edgewise_env_vars_and_explicit_options_win(tmp_path):
    env = {
        "EDGEWISE_DATA_DIR": str(tmp_path),
        "EDGEWISE_BROKER_URL": "mqtt://broker.local:1884",
        "EDGEWISE_PORT": "9000",
        "EDGEWISE_TRUST": f"{tmp_path / 'a.pub'}:{tmp_path / 'b.pub'}",
    }
    s = ServerSettings.from_env(env, port=9100, host=None)
    assert s.data_dir == Path(tmp_path) and s.port == 9100 and s.host == "127.0.0.1"
    assert not s.embedded_broker and s.effective_broker_url == "mqtt://broker.local:1884"
    assert s.trust == [tmp_path / "a.pub", tmp_path / "b.pub"]


def test_a_database_url_template_gives_each_data_dir_a_database_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEWISE_DATABASE_URL_TEMPLATE", "postgresql+psycopg://u@db/ew_{key}")
    a, b = ServerSettings(data_dir=tmp_path / "a"), ServerSettings(data_dir=tmp_path / "b")
    assert a.effective_database_url.startswith("postgresql+psycopg://u@db/ew_")
    assert a.effective_database_url != b.effective_database_url
    assert ServerSettings(data_dir=tmp_path / "a").effective_database_url == a.effective_database_url
    assert ServerSettings(data_dir=tmp_path, database_url="sqlite://").effective_database_url == "sqlite://"


def test_a_templated_postgresql_database_is_created_on_first_use_and_reused_after(pg_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEWISE_DATABASE_URL_TEMPLATE", pg_cluster.url("ew_{key}"))
    url = ServerSettings(data_dir=tmp_path).effective_database_url
    db = init_db(url)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO devices (id, tags, status, desired_generation, registered_at) "
                          "VALUES ('d1', '[]', 'registered', 0, '2025-01-01 00:00:00+00')"))
    db.dispose()
    db = init_db(url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM devices")).scalar_one() == "d1"
    db.dispose()
