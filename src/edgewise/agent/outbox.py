"""The durable outbox: everything the agent must report waits here until the broker has it.

One SQLite file (WAL mode, ``synchronous=FULL``) so a record that ``enqueue``
returned for survives a process kill and a power cut. Every record gets the
device's next sequence number, shared by telemetry and events and persisted
with the record in the same transaction, so numbers never repeat after a
restart; the control plane de-duplicates on them, and a gap tells it a record
was dropped.

The store is bounded (``max_bytes``). When it is full the lowest-priority,
oldest records go first (routine telemetry before events, events before
alerts), and every drop is counted per priority so the loss is visible.
Records leave only through ``ack``, which the flusher calls after the broker's
PUBACK.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..protocol import Event, Telemetry, encode

log = logging.getLogger("edgewise.agent.outbox")

PRIORITY_TELEMETRY = 0
PRIORITY_EVENT = 1
PRIORITY_ALERT = 2
PRIORITY_NAMES = {PRIORITY_TELEMETRY: "telemetry", PRIORITY_EVENT: "event", PRIORITY_ALERT: "alert"}
ROW_OVERHEAD = 64  # bytes counted per row besides the payload: keeps tiny records from being free

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    seq      INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    created  REAL    NOT NULL,
    size     INTEGER NOT NULL,
    payload  BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    """The outbox file cannot be used (disk full, corrupt); the message names the file."""


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored record: ``payload`` is the msgpack encoding of the Telemetry or Event."""

    id: int
    seq: int
    kind: str  # "telemetry" | "event"
    priority: int
    created: float
    payload: bytes


def priority_of(record: Telemetry | Event) -> int:
    """Alerts (error/critical events) > other events > telemetry."""
    if isinstance(record, Event):
        return PRIORITY_ALERT if record.severity in ("error", "critical") else PRIORITY_EVENT
    return PRIORITY_TELEMETRY


class Outbox:
    """A bounded, prioritized, crash-safe queue of Telemetry and Event records."""

    def __init__(self, path: Path, *, max_bytes: int = 16 * 2**20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a lost commit could re-issue a seq number after a power cut
            self._db.execute("PRAGMA cache_size=-512")  # KiB: append at the tail, delete at the head; a big cache buys nothing
            self._db.executescript(_SCHEMA)
            self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records", (ROW_OVERHEAD,)).fetchone()[0])
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; move the file aside to start a new one") from None

    # -- meta counters --------------------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )

    # -- queue ----------------------------------------------------------------------------------

    def enqueue(self, record: Telemetry | Event) -> int:
        """Store ``record`` with the next sequence number (whatever ``seq`` it carries is replaced); return it.

        If the store is full, older lower-priority records are dropped to make
        room; if nothing of lower or equal priority is left to drop, this record
        is dropped instead (its seq number stays used, so the server sees the gap).
        """
        kind = "event" if isinstance(record, Event) else "telemetry"
        priority = priority_of(record)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    seq = self._meta("next_seq")
                    self._bump("next_seq")
                    payload = encode(record.model_copy(update={"seq": seq}), compress=False)
                    size = len(payload) + ROW_OVERHEAD
                    if self._make_room(size, priority):
                        self._db.execute(
                            "INSERT INTO records (seq, kind, priority, created, size, payload) VALUES (?, ?, ?, ?, ?, ?)",
                            (seq, kind, priority, time.time(), len(payload), payload),
                        )
                        self._bytes += size
                    else:
                        self._bump(f"dropped_{priority}")
                        log.warning("outbox full: dropped new %s record seq %d", PRIORITY_NAMES[priority], seq)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    self._bytes = self._recount()
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot write to the outbox {self.path}: {exc}; check free disk space") from None
        return seq

    def _make_room(self, size: int, priority: int) -> bool:
        """Drop lowest-priority, oldest records (never higher than ``priority``) until ``size`` fits."""
        if size > self.max_bytes:
            return False
        if self._bytes + size > self.max_bytes:
            freeable = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records WHERE priority <= ?", (ROW_OVERHEAD, priority)
            ).fetchone()[0]
            if self._bytes - int(freeable) + size > self.max_bytes:
                return False  # dropping everything droppable would not make room: keep what is there
        while self._bytes + size > self.max_bytes:
            row = self._db.execute(
                "SELECT id, priority, size FROM records WHERE priority <= ? ORDER BY priority, id LIMIT 1", (priority,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM records WHERE id = ?", (row[0],))
            self._bump(f"dropped_{row[1]}")
            self._bytes -= row[2] + ROW_OVERHEAD
            log.warning("outbox full: dropped a %s record to make room", PRIORITY_NAMES.get(row[1], row[1]))
        return True

    def _recount(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records", (ROW_OVERHEAD,)).fetchone()[0])

    def peek(self, n: int = 100) -> list[OutboxRecord]:
        """Up to ``n`` records, highest priority first, oldest first within a priority. Nothing is removed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, seq, kind, priority, created, payload FROM records ORDER BY priority DESC, id LIMIT ?", (n,)
            ).fetchall()
        return [OutboxRecord(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Remove records the broker has acknowledged; return how many were removed."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                removed = 0
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    freed = self._db.execute(f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records WHERE id IN ({marks})", chunk).fetchone()
                    self._db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                    self._bytes -= int(freed[0]) + int(freed[1]) * ROW_OVERHEAD
                    removed += int(freed[1])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._bytes = self._recount()
                raise OutboxError(f"cannot remove records from the outbox {self.path}: {exc}") from None
        return removed

    # -- stats ----------------------------------------------------------------------------------

    def pending(self) -> int:
        """Records waiting to be sent."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def issued(self) -> int:
        """Sequence numbers issued so far (the next record gets this number)."""
        with self._lock:
            return self._meta("next_seq")

    def dropped(self) -> dict[str, int]:
        """Records dropped because the store was full, per priority name (kept across restarts)."""
        with self._lock:
            return {name: self._meta(f"dropped_{p}") for p, name in PRIORITY_NAMES.items()}

    @property
    def size_bytes(self) -> int:
        """Bytes counted against ``max_bytes``."""
        return self._bytes

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
