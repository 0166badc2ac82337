"""The durable outbox: everything the agent must report waits here until the broker has it.

One SQLite file in WAL mode. Every record gets the device's next sequence
number, shared by telemetry and events and persisted with the record in the
same transaction; the control plane de-duplicates on them, and a gap tells it
a record was dropped.

Durability (see ``docs/agent.md``, "Telemetry and the outbox"):

- ``synchronous="NORMAL"`` (default): a record ``enqueue`` returned for
  survives a kill of the process at any instant (the commit is in the WAL, in
  the OS page cache). A power cut or kernel crash can lose the commits made
  since the last fsync of the WAL. The outbox bounds that window: a commit is
  fsynced (made ``FULL``) when the previous fsync is older than
  ``sync_every_s`` (1 s), when it holds an alert (error/critical event), and
  whenever it issues a sequence number beyond the durably reserved block
  (``SEQ_BLOCK``). After a reboot that followed an unclean stop, numbering
  resumes at the end of the reserved block, so a number is never issued twice
  even if the last commits were lost: the server sees a gap, never a
  duplicate it would silently discard.
- ``synchronous="FULL"``: every commit is fsynced; nothing ``enqueue``
  returned for is lost to a power cut (about 10-50x slower per transaction).

The store is bounded (``max_bytes``). When it is full the lowest-priority,
oldest records go first (captured samples before routine telemetry, telemetry
before events, events before alerts), and every drop is counted per priority
so the loss is visible. The
same policy applies when the *disk* is full (SQLite "database or disk is
full", ENOSPC): older lower-priority records are deleted to make room once,
and if that does not help the new records are dropped and counted; the agent
keeps serving. Records leave only through ``ack``, which the flusher calls
after the broker's PUBACK.

A file that is not a valid SQLite database (or fails ``PRAGMA quick_check``)
is moved aside to ``outbox.db.corrupt-<UTC timestamp>`` and a fresh outbox is
started, numbering from ``unix time x 10^6`` (above anything the lost file can
have issued, so no new record looks like a duplicate); ``recovered_from`` names
the moved file so the agent can report it.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import msgpack
import zstandard

from ..protocol import Event, Sample, Summary, Telemetry, topics
from ..protocol.codec import COMPRESS_ABOVE
from ..protocol.messages import SCHEMA_VERSION

if TYPE_CHECKING:
    from ..security.encryption import RowSealer

log = logging.getLogger("edgewise.agent.outbox")

PRIORITY_SAMPLE = -1  # captured input samples (agent.capture): below telemetry, the first to go when the store is full
PRIORITY_TELEMETRY = 0
PRIORITY_EVENT = 1
PRIORITY_ALERT = 2
PRIORITY_NAMES = {PRIORITY_SAMPLE: "sample", PRIORITY_TELEMETRY: "telemetry", PRIORITY_EVENT: "event", PRIORITY_ALERT: "alert"}
ROW_OVERHEAD = 64  # bytes counted per row besides the payload: keeps tiny records from being free
SEQ_BLOCK = 100_000  # sequence numbers reserved durably at a time (see the module docstring)
DISK_FULL_FREE_BYTES = 256 * 1024  # on a full disk, try once to free this much (plus the new records)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq      INTEGER PRIMARY KEY,  -- never reused, so it is also the row's identity and its age
    kind     TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    created  REAL    NOT NULL,
    size     INTEGER NOT NULL,
    payload  BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_INSERT = "INSERT INTO records (seq, kind, priority, created, size, payload) VALUES (?, ?, ?, ?, ?, ?)"
_BUMP = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value"
_SET = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"


class OutboxError(RuntimeError):
    """The outbox file cannot be used (disk full, corrupt); the message names the file."""


class _DiskFull(Exception):
    pass


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored record: ``payload`` is the msgpack encoding of the Telemetry or Event."""

    seq: int
    kind: str  # "telemetry" (Telemetry and Summary: the telemetry channel) | "event" | "sample" (telemetry/samples)
    priority: int
    created: float
    payload: bytes


def priority_of(record: Telemetry | Summary | Event | Sample) -> int:
    """Alerts (error/critical events, and every ``alert.*`` event: raising and clearing) > other events > telemetry
    > captured samples."""
    if isinstance(record, Event):
        return PRIORITY_ALERT if record.severity in ("error", "critical") or record.kind.startswith("alert.") else PRIORITY_EVENT
    if isinstance(record, Sample):
        return PRIORITY_SAMPLE
    return PRIORITY_TELEMETRY


def _boot_id() -> int:
    """This boot's identity (Linux), folded to a signed 63-bit int; 0 when unknown."""
    try:
        raw = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        return int(raw, 16) & (2**63 - 1)
    except (OSError, ValueError):
        return 0


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code == getattr(sqlite3, "SQLITE_FULL", 13):
        return True
    return "database or disk is full" in str(exc)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """Not a database / malformed image (not: locked, I/O error, read-only, ...)."""
    if isinstance(exc, sqlite3.OperationalError):
        return False
    return isinstance(exc, sqlite3.DatabaseError)


class Outbox:
    """A bounded, prioritized, crash-safe queue of Telemetry and Event records."""

    def __init__(
        self, path: Path, *, max_bytes: int = 16 * 2**20, synchronous: str = "NORMAL", sync_every_s: float = 1.0,
        sealer: "RowSealer | None" = None,
    ) -> None:
        """``sealer`` (``security.encryption.RowSealer``): store payloads encrypted, each bound to (device id, seq).

        Rows stored before (plaintext msgpack) stay readable: a sealed row starts with 0xC1, which msgpack never uses.
        """
        self.sealer = sealer
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.synchronous = synchronous.upper()
        self.sync_every_s = sync_every_s
        self.recovered_from: Path | None = None  # the corrupt file moved aside on open, if any
        self._lock = threading.Lock()
        self._unsaved_drops: dict[int, int] = {}  # drops counted while the disk was full, saved at the next commit
        self._last_sync = 0.0
        self._sync_now = self.synchronous
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._open()
            except sqlite3.Error as exc:
                if not _is_corrupt(exc):
                    raise
                self._move_aside(str(exc))
                self._open()
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; move the file aside to start a new one") from None

    # -- open / recover -------------------------------------------------------------------------

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            self._set_sync("FULL")
            self._db.execute("PRAGMA cache_size=-2048")  # KiB: append at the tail, delete at the head
            self._db.execute("PRAGMA journal_size_limit=4194304")  # > one auto-checkpoint's WAL (1000 pages): reused, not re-grown
            self._migrate_v1()
            self._db.executescript(_SCHEMA)
            self._bytes = self._recount()
            # ``next_seq`` is saved only when the newest record may be gone (ack, drops); otherwise the table tells
            newest = self._db.execute("SELECT MAX(seq) FROM records").fetchone()[0]
            self._next_seq = max(self._meta("next_seq"), -1 if newest is None else int(newest) + 1)
            self._reserved = self._meta("seq_reserved")
            if self.recovered_from is not None and self._next_seq == 0:
                # the old numbering is lost with the corrupt file: start far above anything it can have issued,
                # so the server never discards new records as duplicates of old numbers (it sees one big gap)
                self._next_seq = self._reserved = int(time.time()) * 1_000_000
            boot, last_boot, clean = _boot_id(), self._meta("boot_id"), self._meta("clean")
            if (last_boot and not clean and (boot == 0 or boot != last_boot)) and self._reserved > self._next_seq:
                # rebooted after an unclean stop: the last NORMAL commits may be gone; never re-issue their numbers
                log.warning("outbox %s: unclean stop before a reboot; sequence numbers resume at %d (was %d)",
                            self.path, self._reserved, self._next_seq)
                self._next_seq = self._reserved
            self._db.execute("BEGIN IMMEDIATE")
            for k, v in (("next_seq", self._next_seq), ("boot_id", boot), ("clean", 0)):
                self._db.execute(_SET, (k, v))
            self._db.execute("COMMIT")
            self._last_sync = time.monotonic()
            self._set_sync(self.synchronous)
        except BaseException:
            self._db.close()
            raise

    def _migrate_v1(self) -> None:
        """Outboxes written before 0.2 keyed records by an AUTOINCREMENT id: re-key them by seq, in one transaction."""
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(records)").fetchall()]
        if "id" not in cols:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DROP INDEX IF EXISTS records_by_priority")
            self._db.execute("ALTER TABLE records RENAME TO records_v1")
            self._db.execute(_SCHEMA.split(";")[0])
            self._db.execute(
                "INSERT INTO records (seq, kind, priority, created, size, payload) "
                "SELECT seq, kind, priority, created, size, payload FROM records_v1 ORDER BY id"
            )
            self._db.execute("DROP TABLE records_v1")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        log.info("outbox %s: re-keyed the records table by sequence number", self.path)

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):  # a stale WAL must never be replayed into the new file
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        self.recovered_from = target
        log.critical("outbox %s is corrupt (%s): moved aside to %s, starting a new one", self.path, why, target)

    def _set_sync(self, mode: str) -> None:
        if self._sync_now != mode:
            self._db.execute(f"PRAGMA synchronous={mode}")
            self._sync_now = mode

    # -- meta counters --------------------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str, by: int = 1) -> None:
        self._db.execute(_BUMP, (key, by))

    # -- queue ----------------------------------------------------------------------------------

    def enqueue(self, record: Telemetry | Summary | Event | Sample) -> int:
        """Store ``record`` with the next sequence number (whatever ``seq`` it carries is replaced); return it.

        If the store is full, older lower-priority records are dropped to make
        room; if nothing of lower or equal priority is left to drop, this record
        is dropped instead (its seq number stays used, so the server sees the gap).
        """
        return self.enqueue_many((record,))[0]

    def enqueue_many(self, records: Sequence[Telemetry | Summary | Event | Sample]) -> list[int]:
        """Store several records in one transaction (one fsync at most); return their sequence numbers.

        All or nothing on a crash: either every record of the call is stored or none is.
        """
        if not records:
            return []
        now = time.time()
        rows = []  # (kind, priority, payload)
        for record in records:
            d = record.model_dump(mode="json")
            kind = d["type"] if d["type"] in ("event", "sample", "fl_update") else "telemetry"  # fl_update: learn (telemetry/fl)
            rows.append((kind, priority_of(record), d))
        with self._lock:
            first = self._next_seq
            seqs = list(range(first, first + len(rows)))
            encoded = []
            for seq, (kind, priority, d) in zip(seqs, rows):
                d["seq"] = seq
                payload = msgpack.packb(d, use_bin_type=True)
                if self.sealer is not None and self.sealer.encrypt:
                    payload = self.sealer.seal(seq, payload)
                encoded.append((seq, kind, priority, now, payload))
            try:
                self._write(encoded, make_room_on_disk_full=False)
            except _DiskFull:
                try:
                    self._free_for_disk_full(encoded)
                    self._write(encoded, make_room_on_disk_full=True)
                except _DiskFull:
                    for _, _, priority, _, _ in encoded:
                        self._unsaved_drops[priority] = self._unsaved_drops.get(priority, 0) + 1
                    self._next_seq += len(encoded)  # keep the numbers used: saved with the next commit
                    log.error("outbox %s: disk full, dropped %d new record(s); the agent keeps running", self.path, len(encoded))
        return seqs

    def _write(self, encoded: list[tuple], *, make_room_on_disk_full: bool) -> None:
        """One transaction: make room within ``max_bytes``, insert, bump counters. Raises _DiskFull."""
        end = encoded[-1][0] + 1
        full = (
            self.synchronous == "FULL"
            or end > self._reserved
            or time.monotonic() - self._last_sync >= self.sync_every_s
            or any(e[2] == PRIORITY_ALERT for e in encoded)
        )
        try:
            self._set_sync("FULL" if full else "NORMAL")
            added = sum(len(e[4]) + ROW_OVERHEAD for e in encoded)
            with self._transaction():
                dropped_new = False
                if self._bytes + added <= self.max_bytes:  # the common case: room for all, one executemany
                    self._db.executemany(_INSERT, [(e[0], e[1], e[2], e[3], len(e[4]), e[4]) for e in encoded])
                else:  # one at a time, so older records (also of this call) go before newer ones
                    added = 0
                    for e in encoded:
                        size = len(e[4]) + ROW_OVERHEAD
                        if self._make_room(size, e[2]):
                            self._db.execute(_INSERT, (e[0], e[1], e[2], e[3], len(e[4]), e[4]))
                            self._bytes += size
                        else:
                            self._bump(f"dropped_{e[2]}")
                            dropped_new = True
                            log.warning("outbox full: dropped new %s record seq %d", PRIORITY_NAMES[e[2]], e[0])
                if dropped_new or self._unsaved_drops:  # numbers were used by records that are not in the table
                    self._db.execute(_SET, ("next_seq", end))
                if end > self._reserved:
                    self._db.execute(_SET, ("seq_reserved", end + SEQ_BLOCK))
                for p, n in self._unsaved_drops.items():
                    self._bump(f"dropped_{p}", n)
        except (sqlite3.Error, OSError) as exc:
            if _is_disk_full(exc):
                raise _DiskFull() from None
            raise OutboxError(f"cannot write to the outbox {self.path}: {exc}; check free disk space") from None
        finally:
            self._set_sync(self.synchronous)
        self._bytes += added
        self._next_seq = end
        if end > self._reserved:
            self._reserved = end + SEQ_BLOCK
        self._unsaved_drops.clear()
        if full:
            self._last_sync = time.monotonic()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT; on any error ROLLBACK and recount the bytes (what the failed statements
        subtracted or added never happened), then re-raise for the caller to translate."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._bytes = self._recount()
            raise

    def _free_for_disk_full(self, encoded: list[tuple]) -> None:
        """The disk is full: delete the oldest records of priority <= the new ones' until enough bytes are freed."""
        need = sum(len(e[4]) + ROW_OVERHEAD for e in encoded) + DISK_FULL_FREE_BYTES
        top = max(e[2] for e in encoded)
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a shorter WAL gives the deletes room to commit
        except sqlite3.Error:
            pass
        try:
            saved = dict(self._unsaved_drops)
            try:
                with self._transaction():
                    freed = 0
                    for row in self._db.execute(
                        "SELECT seq, priority, size FROM records WHERE priority <= ? ORDER BY priority, seq", (top,)
                    ).fetchall():
                        if freed >= need:
                            break
                        self._db.execute("DELETE FROM records WHERE seq = ?", (row[0],))
                        self._unsaved_drops[row[1]] = self._unsaved_drops.get(row[1], 0) + 1
                        freed += row[2] + ROW_OVERHEAD
                    for p, n in self._unsaved_drops.items():
                        self._bump(f"dropped_{p}", n)
            except BaseException:
                self._unsaved_drops = saved  # nothing was deleted after all
                raise
            self._unsaved_drops.clear()
        except (sqlite3.Error, OSError) as exc:
            self._bytes = self._recount()
            if _is_disk_full(exc):
                raise _DiskFull() from None
            raise OutboxError(f"cannot free space in the outbox {self.path}: {exc}") from None
        self._bytes = self._recount()
        if freed:
            log.error("outbox %s: disk full, dropped %d bytes of older records to make room", self.path, freed)

    def _make_room(self, size: int, priority: int) -> bool:
        """Drop lowest-priority, oldest records (never higher than ``priority``) until ``size`` fits."""
        if self._bytes + size <= self.max_bytes:
            return True
        if size > self.max_bytes:
            return False
        freeable = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records WHERE priority <= ?", (ROW_OVERHEAD, priority)
        ).fetchone()[0]
        if self._bytes - int(freeable) + size > self.max_bytes:
            return False  # dropping everything droppable would not make room: keep what is there
        while self._bytes + size > self.max_bytes:
            row = self._db.execute(
                "SELECT seq, priority, size FROM records WHERE priority <= ? ORDER BY priority, seq LIMIT 1", (priority,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM records WHERE seq = ?", (row[0],))
            self._bump(f"dropped_{row[1]}")
            self._bytes -= row[2] + ROW_OVERHEAD
            log.warning("outbox full: dropped a %s record to make room", PRIORITY_NAMES.get(row[1], row[1]))
        return True

    def priority_bytes(self, priority: int) -> int:
        """Bytes (counted as against ``max_bytes``) held by records of one priority."""
        with self._lock:
            return int(self._db.execute(
                "SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records WHERE priority = ?", (ROW_OVERHEAD, priority)
            ).fetchone()[0])

    def trim_priority(self, priority: int, max_bytes: int) -> int:
        """Drop the oldest records of ``priority`` until that priority holds at most ``max_bytes``; return how many.

        Counted as drops (``dropped()``), like drops for the store bound: the capture budget for
        waiting samples (``agent.capture.OutboxSink``) uses it.
        """
        with self._lock:
            held = int(self._db.execute(
                "SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records WHERE priority = ?", (ROW_OVERHEAD, priority)
            ).fetchone()[0])
            if held <= max_bytes:
                return 0
            try:
                with self._transaction():
                    n = 0
                    for seq, size in self._db.execute(
                        "SELECT seq, size FROM records WHERE priority = ? ORDER BY seq", (priority,)
                    ).fetchall():
                        if held <= max_bytes:
                            break
                        self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
                        held -= size + ROW_OVERHEAD
                        self._bytes -= size + ROW_OVERHEAD
                        n += 1
                    self._bump(f"dropped_{priority}", n)
                    self._db.execute(_SET, ("next_seq", self._next_seq))  # the newest record may be gone
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot drop records from the outbox {self.path}: {exc}") from None
        return n

    def _recount(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM records", (ROW_OVERHEAD,)).fetchone()[0])

    def peek(self, n: int = 100) -> list[OutboxRecord]:
        """Up to ``n`` records, highest priority first, oldest first within a priority. Nothing is removed."""
        out: list[OutboxRecord] = []
        with self._lock:
            for p in (PRIORITY_ALERT, PRIORITY_EVENT, PRIORITY_TELEMETRY, PRIORITY_SAMPLE):  # one index range scan per priority
                if len(out) >= n:
                    break
                rows = self._db.execute(
                    "SELECT seq, kind, priority, created, payload FROM records WHERE priority = ? ORDER BY seq LIMIT ?",
                    (p, n - len(out)),
                ).fetchall()
                out.extend(OutboxRecord(r[0], r[1], r[2], r[3], self._plain(r[0], bytes(r[4]))) for r in rows)
        return out

    def _plain(self, seq: int, payload: bytes) -> bytes:
        """The msgpack bytes of a stored row: opened when sealed; b"" (dropped as unreadable by the drain) when it does not open."""
        if payload[:1] != b"\xc1":
            return payload
        if self.sealer is None:
            log.error("outbox row seq %d is encrypted but the outbox has no key to open it; it will be dropped", seq)
            return b""
        from ..security.encryption import EncryptionError

        try:
            return self.sealer.open(seq, payload)
        except EncryptionError as exc:
            log.error("%s; dropping it", exc)
            return b""

    def ack(self, seqs: Iterable[int]) -> int:
        """Remove records (by sequence number) the broker has acknowledged; return how many were removed.

        The same transaction saves the next sequence number: once the newest
        record is gone, the table alone no longer tells where numbering stands.
        """
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            try:
                with self._transaction():
                    removed = 0
                    for i in range(0, len(seqs), 500):
                        chunk = seqs[i : i + 500]
                        marks = ",".join("?" * len(chunk))
                        freed = self._db.execute(f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records WHERE seq IN ({marks})", chunk).fetchone()
                        self._db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
                        self._bytes -= int(freed[0]) + int(freed[1]) * ROW_OVERHEAD
                        removed += int(freed[1])
                    self._db.execute(_SET, ("next_seq", self._next_seq))
            except sqlite3.Error as exc:
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
            return self._next_seq

    def dropped(self) -> dict[str, int]:
        """Records dropped (store bound or full disk), per priority name (kept across restarts)."""
        with self._lock:
            return {name: self._meta(f"dropped_{p}") + self._unsaved_drops.get(p, 0) for p, name in PRIORITY_NAMES.items()}

    @property
    def size_bytes(self) -> int:
        """Bytes counted against ``max_bytes``."""
        return self._bytes

    def close(self) -> None:
        """Mark a clean stop with one fsynced commit and close. Safe to call twice."""
        with self._lock:
            try:
                self._set_sync("FULL")
                self._db.execute(_SET, ("clean", 1))
            except sqlite3.Error:
                pass
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- draining ---------------------------------------------------------------------------------------

_zc = zstandard.ZstdCompressor(level=3)
DRAIN_RECORDS = 2000  # records read per drain round
BATCH_MAX_BYTES = 1024 * 1024  # msgpack bytes per Batch before compression (the decoder accepts 4 MiB)


def batch_payload(device_id: str, items: Sequence[bytes]) -> bytes:
    """The wire bytes of ``Batch(device_id, items)`` from already-encoded records, without re-encoding them.

    Identical to ``protocol.encode(Batch(...))`` up to key order: msgpack map with
    the stored item maps spliced in; zstd when it pays.
    """
    p = msgpack.Packer(use_bin_type=True)
    raw = b"".join(
        (
            p.pack_map_header(4), p.pack("v"), p.pack(SCHEMA_VERSION), p.pack("type"), p.pack("batch"),
            p.pack("device_id"), p.pack(device_id), p.pack("items"), p.pack_array_header(len(items)), *items,
        )
    )
    if len(raw) > COMPRESS_ABOVE:
        packed = _zc.compress(raw)
        if len(packed) < len(raw):
            return packed
    return raw


def _well_formed(payload: bytes, kind: str) -> bool:
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception:
        return False
    return isinstance(obj, dict) and (obj.get("type") == kind or (kind == "telemetry" and obj.get("type") == "summary"))


def drain_once(
    outbox: Outbox, device_id: str, publish: Callable[[str, bytes], bool], *, max_records: int = DRAIN_RECORDS
) -> int:
    """Publish up to ``max_records`` records as Batch messages (events first), acking each batch after its PUBACK.

    ``publish(topic, payload)`` must return True only once the broker acknowledged
    (QoS 1). Returns how many records were acknowledged; stops at the first
    publish that was not acknowledged (everything unacknowledged stays stored).
    """
    records = outbox.peek(max_records)
    if not records:
        return 0
    sent = 0
    for kind, topic in (
        ("event", topics.events(device_id)), ("telemetry", topics.telemetry(device_id)),
        ("sample", topics.telemetry(device_id, "samples")), ("fl_update", topics.telemetry(device_id, "fl")),
    ):
        group = [r for r in records if r.kind == kind]
        poison = [r.seq for r in group if not _well_formed(r.payload, kind)]
        if poison:
            log.error("outbox: %d unreadable %s record(s) dropped", len(poison), kind)
            outbox.ack(poison)
            bad = set(poison)
            group = [r for r in group if r.seq not in bad]
        start = 0
        while start < len(group):
            end, size = start, 0
            while end < len(group) and (end == start or size + len(group[end].payload) <= BATCH_MAX_BYTES - 1024):
                size += len(group[end].payload)
                end += 1
            chunk = group[start:end]
            if not publish(topic, batch_payload(device_id, [r.payload for r in chunk])):
                return sent  # not acknowledged: everything stays in the outbox for the next session
            outbox.ack([r.seq for r in chunk])
            sent += len(chunk)
            start = end
    return sent
