"""Database engine, sessions and migrations.

``init_db`` runs ``alembic upgrade head`` programmatically, with the scripts located
next to this file, so it works from an installed wheel as well as a checkout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _is_memory_sqlite(url: str) -> bool:
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def make_engine(url: str) -> Engine:
    """An engine tuned for concurrent use from the API threadpool and the MQTT thread.

    SQLite gets WAL (readers never block the writer), a busy timeout instead of
    instant ``database is locked`` errors, foreign keys on, and
    ``check_same_thread=False`` because sessions hop threads. An in-memory SQLite
    database shares one connection so every thread sees the same data.
    """
    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if _is_memory_sqlite(url):
            kwargs["poolclass"] = StaticPool
        elif u.database:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if u.get_backend_name() == "sqlite":
        memory = _is_memory_sqlite(url)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes; WAL makes it safe
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def alembic_config(url: str, engine: Engine | None = None) -> Any:
    """An Alembic ``Config`` pointing at the packaged migrations (no ini file needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation character; URLs with escaped passwords contain it.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(engine.url.render_as_string(hide_password=False), engine), revision)


class Database:
    """An engine and its session factory; one per app (or per test)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that rolls back on error and always closes."""
        session = self.sessionmaker()
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def create_database_if_missing(url: str) -> bool:
    """Create the PostgreSQL database ``url`` names, through the server's ``postgres`` database; True if created.

    Only for URLs made from ``EDGEWISE_DATABASE_URL_TEMPLATE`` (one database per data dir, as the test suite
    runs): a production database is created by its operator, and a typo there must fail, not create one.
    The role needs CREATEDB. No-op on other engines."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql" or not u.database:
        return False
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": u.database}).first():
                return False
            quoted = conn.dialect.identifier_preparer.quote_identifier(u.database)
            try:
                conn.execute(text(f"CREATE DATABASE {quoted}"))
            except DBAPIError as exc:  # another process created it meanwhile
                if "already exists" not in str(exc.orig):
                    raise
                return False
            return True
    finally:
        admin.dispose()


def init_db(url: str) -> Database:
    """Create the engine, run migrations to head, and return the :class:`Database`."""
    if os.environ.get("EDGEWISE_DATABASE_URL_TEMPLATE"):
        create_database_if_missing(url)
    engine = make_engine(url)
    upgrade(engine)
    return Database(engine)


_IGNORING_INSERTS: dict[tuple[str, str], Any] = {}


def insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> bool:
    """Insert one row unless it violates a unique constraint; True if it was inserted.

    This is how redelivered telemetry (same device and seq) is dropped without an
    error and without a read-before-write race: the database decides.
    """
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        # One statement per table and dialect, values as parameters: SQLAlchemy compiles it once and caches it
        # (building ``.values(**row)`` anew for every row cost ~0.5 ms of coercions per insert at ingest).
        stmt = _IGNORING_INSERTS.get((dialect, table.name))
        if stmt is None:
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert

                stmt = insert(table).on_conflict_do_nothing()
            else:  # PostgreSQL: an explicit RETURNING says whether a row went in (psycopg reports rowcount -1
                # under the implicit RETURNING of a generated key, so rowcount == 1 counted every row a duplicate)
                from sqlalchemy import literal_column
                from sqlalchemy.dialects.postgresql import insert

                stmt = insert(table).on_conflict_do_nothing().returning(literal_column("1"))
            stmt = _IGNORING_INSERTS.setdefault((dialect, table.name), stmt)
        # on the session's connection (same transaction), not through the ORM: a core insert needs no autoflush of
        # the ORM's pending changes first (at ingest that was one UPDATE of the device per stored record)
        result = session.connection().execute(stmt, values)
        if dialect == "postgresql":
            return result.first() is not None  # no row back: the conflict dropped it
        return result.rowcount == 1  # type: ignore[attr-defined]
    from sqlalchemy import insert as core_insert
    from sqlalchemy.exc import IntegrityError

    try:
        with session.begin_nested():
            session.execute(core_insert(table).values(**values))
    except IntegrityError:
        return False
    return True
