"""A private PostgreSQL cluster for one test session (Debian's packages, no system service).

``EDGEWISE_TEST_DB=postgresql`` makes tests/conftest.py start one cluster per session on a free
loopback port under a temporary folder, and point every control plane at a fresh database on it
(docs/scale-out-postgres.md). The cluster is tuned for tests, not durability: fsync off.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

USER = "edgewise"  # the cluster's superuser; trust authentication on loopback only


def selected_engine() -> str:
    """``postgresql`` or ``sqlite`` (the default): which engine this test session runs against."""
    value = os.environ.get("EDGEWISE_TEST_DB", "sqlite").strip().lower() or "sqlite"
    if value not in ("sqlite", "postgresql"):
        raise ValueError(f"EDGEWISE_TEST_DB={value!r}: use 'sqlite' or 'postgresql'")
    return value


def pg_bin_dir() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin), newest major first; None if not installed."""
    root = Path("/usr/lib/postgresql")
    dirs = sorted((d / "bin" for d in root.glob("*") if (d / "bin" / "initdb").is_file()),
                  key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    if dirs:
        return dirs[0]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """initdb + pg_ctl under ``base``; as root the server runs as the ``postgres`` user (initdb refuses root)."""

    def __init__(self, base: Path) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: run `make test-pg` (it runs apt-get install postgresql)")
        self.bindir = bindir
        self.base = Path(base)
        self.data = self.base / "data"
        self.port = _free_port()
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError("running as root needs the 'postgres' user (Debian's postgresql package creates it)") from exc
            self.run_as = "postgres"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.run_as:  # base must be reachable by the server user: use a folder in /tmp (tempfile.mkdtemp)
            shutil.chown(self.base, user=self.run_as)
        self._run(self.bindir / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=1000 "
                   "-c shared_buffers=64MB")
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.base / "server.log", "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        """One statement in autocommit (CREATE DATABASE cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname=database, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str | None = None, template: str = "template1") -> str:
        """A new empty database; its SQLAlchemy URL. ``template0`` gives a truly empty one."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        for attempt in range(20):
            try:
                self.execute(f'CREATE DATABASE "{name}" TEMPLATE {template}')
                break
            except Exception as exc:  # another session is connected to the template: retry shortly
                if "being accessed by other users" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.1)
        return self.url(name)
