"""Sample capture: keep some of the inputs the device served, for retraining (docs/data-capture.md).

A :class:`SampleCapture` is a prediction observer (``agent.observers``). After every prediction it
decides, row by row, whether to keep the input exactly as the model got it (validated and
preprocessed), for one of three reasons, checked in this order (a row is captured at most once):

- ``drift``: the drift detector said "drifting now" (:meth:`SampleCapture.mark_drift`): the rows
  served just before the mark (a ring buffer of ``drift_window`` rows) and the next ``drift_window``
  rows are captured — the window that made the detector fire and the one after it;
- ``low_confidence``: the top-1 score of the classifier output is below ``low_confidence``;
- ``random``: a uniform draw below ``random_fraction`` (seeded: reproducible in tests).

Captured samples go to a sink under a byte budget:

- ``upload``: :class:`OutboxSink` puts them in the durable outbox at the ``sample`` priority (below
  telemetry: the first records dropped when the outbox is full). Samples waiting in the outbox
  never take more than the budget: the oldest waiting samples are dropped (and counted as outbox
  drops) to make room for a new one.
- ``local``: :class:`SampleStore` keeps them on the device (SQLite, rows sealed like the outbox rows
  when the agent encrypts at rest) for federated learning; when the budget is reached the
  lowest-value, then oldest samples go first (value: drift > low confidence, the lower the
  confidence the higher > random).

Capture is on only when the device's config enables it and its group (the desired state's
``capture`` field) has not switched it off. Only numpy on the hot path; a sample is built (copied,
encoded) only for rows that are kept.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Protocol

import msgpack
import numpy as np

from ..protocol import Sample, SampleArray
from .outbox import PRIORITY_SAMPLE, ROW_OVERHEAD, Outbox

if TYPE_CHECKING:
    from ..security.encryption import RowSealer
    from .runtime import LoadedModel

log = logging.getLogger("edgewise.agent.capture")

Reason = Literal["low_confidence", "drift", "random"]
MAX_SAMPLE_BYTES = 1024 * 1024  # raw input bytes of one row; larger rows are not captured (the wire limit is 4 MiB per batch)
SEAL_OVERHEAD = 1 + 12 + 16  # a sealed row: mark, nonce, GCM tag


class CaptureError(ValueError):
    """A capture setting that cannot work; the message names it and the fix."""


@dataclass(frozen=True)
class CapturePolicy:
    """What to capture and how much to keep. Mirrors the agent config's ``capture_*`` keys."""

    enabled: bool = False
    low_confidence: float = 0.5  # capture rows whose top-1 score is below this; 0: off
    random_fraction: float = 0.01  # fraction of all rows captured at random; 0: off
    drift_window: int = 32  # rows before and after a drift mark; 0: drift capture off
    budget_bytes: int = 4 * 2**20
    destination: Literal["upload", "local"] = "upload"
    seed: int | None = None  # random-fraction draws: None = fresh entropy

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_confidence <= 1.0:
            raise CaptureError(f"capture_low_confidence must be in [0, 1] (0 turns it off), not {self.low_confidence}")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise CaptureError(f"capture_random_fraction must be in [0, 1], not {self.random_fraction}")
        if self.drift_window < 0:
            raise CaptureError(f"capture_drift_window must be >= 0 rows, not {self.drift_window}")
        if self.budget_bytes < 4096:
            raise CaptureError(f"capture_budget_bytes must be at least 4096, not {self.budget_bytes}")
        if self.destination not in ("upload", "local"):
            raise CaptureError(f"capture_destination must be 'upload' or 'local', not {self.destination!r}")


def sample_value(reason: str, confidence: float | None, threshold: float) -> float:
    """How much a sample is worth keeping when the budget is tight (higher stays longer).

    Drift windows are rarest and say the most about the shift (2); a low-confidence sample is
    worth more the less sure the model was (1..2); a random one is a baseline (0).
    """
    if reason == "drift":
        return 2.0
    if reason == "low_confidence":
        if confidence is None or not threshold:
            return 1.0
        return 1.0 + max(0.0, min(1.0, (threshold - confidence) / threshold))
    return 0.0


class SampleSink(Protocol):
    def put(self, sample: Sample, value: float) -> bool:
        """Keep ``sample``; False if it was not kept (too big for the budget, store unusable)."""
        ...


# -- sinks ------------------------------------------------------------------------------------------


def _stored_size(sample: Sample, sealed: bool) -> int:
    """Bytes a sample takes in the outbox or the store, counted as the outbox counts them."""
    raw = len(msgpack.packb(sample.model_dump(mode="json"), use_bin_type=True))
    return raw + (SEAL_OVERHEAD if sealed else 0) + ROW_OVERHEAD


class OutboxSink:
    """Samples into the outbox (priority ``sample``), at most ``budget_bytes`` of them waiting at a time."""

    def __init__(self, outbox: Outbox, budget_bytes: int, wake: Callable[[], None] | None = None) -> None:
        self.outbox = outbox
        self.budget_bytes = budget_bytes
        self.wake = wake
        self._lock = threading.Lock()

    def put(self, sample: Sample, value: float) -> bool:
        sealed = self.outbox.sealer is not None and self.outbox.sealer.encrypt
        size = _stored_size(sample, sealed)
        if size > self.budget_bytes:
            return False
        with self._lock:  # trim + enqueue together: concurrent predictions cannot overshoot the budget
            self.outbox.trim_priority(PRIORITY_SAMPLE, self.budget_bytes - size)
            self.outbox.enqueue(sample)
            self.outbox.trim_priority(PRIORITY_SAMPLE, self.budget_bytes)  # in case the estimate was short
        if self.wake is not None:
            self.wake()
        return True


_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id      INTEGER PRIMARY KEY,   -- never reused (AUTOINCREMENT): the sealed row is bound to it
    value   REAL    NOT NULL,
    created REAL    NOT NULL,
    size    INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_value ON samples (value, id);
"""


class SampleStore:
    """Samples kept on the device (for federated learning), bounded by ``budget_bytes``.

    One SQLite file (WAL). A row's payload is the msgpack of the :class:`Sample`, sealed with
    ``sealer`` (its own data key, ``samples.key``, bound to the row id) when the agent encrypts at
    rest. When a new sample does not fit, the lowest-value, then oldest rows go first; a sample
    worth less than everything it would have to displace is not kept.
    """

    def __init__(self, path: Path, budget_bytes: int, *, sealer: "RowSealer | None" = None) -> None:
        self.path = Path(path)
        self.budget_bytes = budget_bytes
        self.sealer = sealer
        self.evicted = 0  # since open
        self.refused = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recovered_from: Path | None = None  # a corrupt store moved aside on open
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # not a database / malformed: keep it for forensics, start afresh
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.recovered_from = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            self.path.replace(self.recovered_from)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            log.error("sample store %s is unusable (%s): moved aside to %s, starting a new one", self.path, exc, self.recovered_from)
            self._open()

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            self._db.executescript(_STORE_SCHEMA.replace("INTEGER PRIMARY KEY,", "INTEGER PRIMARY KEY AUTOINCREMENT,"))
            self._bytes = self._recount()
        except BaseException:
            self._db.close()
            raise

    def _recount(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) + COUNT(*) * ? FROM samples", (ROW_OVERHEAD,)).fetchone()[0])

    @property
    def size_bytes(self) -> int:
        """Bytes counted against the budget (payloads + a fixed overhead per row)."""
        return self._bytes

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def put(self, sample: Sample, value: float) -> bool:
        plain = msgpack.packb(sample.model_dump(mode="json"), use_bin_type=True)
        sealed = self.sealer is not None and self.sealer.encrypt
        size = len(plain) + (SEAL_OVERHEAD if sealed else 0) + ROW_OVERHEAD
        if size > self.budget_bytes:
            self.refused += 1
            return False
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                victims: list[tuple[int, int]] = []
                freed = 0
                if self._bytes + size > self.budget_bytes:
                    for rid, rvalue, rsize in self._db.execute("SELECT id, value, size FROM samples ORDER BY value, id"):
                        if self._bytes - freed + size <= self.budget_bytes:
                            break
                        if rvalue > value:  # never displace a more valuable sample for a less valuable one
                            break
                        victims.append((rid, rsize))
                        freed += rsize + ROW_OVERHEAD
                    if self._bytes - freed + size > self.budget_bytes:
                        self._db.execute("ROLLBACK")
                        self.refused += 1
                        return False
                for rid, _ in victims:
                    self._db.execute("DELETE FROM samples WHERE id = ?", (rid,))
                cur = self._db.execute(
                    "INSERT INTO samples (value, created, size, payload) VALUES (?, ?, ?, ?)", (value, time.time(), 0, b"")
                )
                rid = int(cur.lastrowid or 0)
                payload = self.sealer.seal(rid, plain) if sealed and self.sealer is not None else plain
                self._db.execute("UPDATE samples SET size = ?, payload = ? WHERE id = ?", (len(payload), payload, rid))
                self._db.execute("COMMIT")
            except BaseException:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._bytes = self._recount()
                raise
            self._bytes = self._bytes - freed + len(payload) + ROW_OVERHEAD
            self.evicted += len(victims)
        return True

    def samples(self) -> Iterator[tuple[float, Sample]]:
        """(value, sample) for every kept sample, oldest first; rows that do not open (altered, other key) are skipped."""
        with self._lock:
            rows = self._db.execute("SELECT id, value, payload FROM samples ORDER BY id").fetchall()
        for rid, value, payload in rows:
            payload = bytes(payload)
            try:
                if payload[:1] == b"\xc1":
                    if self.sealer is None:
                        raise ValueError("the row is sealed and this store has no key")
                    payload = self.sealer.open(rid, payload)
                yield float(value), Sample.model_validate(msgpack.unpackb(payload, raw=False))
            except Exception as exc:  # a bad row costs that row, never the others
                log.error("sample store %s: row %d unreadable (%s); skipped", self.path, rid, exc)

    def arrays(self) -> dict[str, np.ndarray]:
        """The kept samples as stacked arrays (what the lab and federated rounds read); see ``stack_samples``."""
        return stack_samples([s for _, s in self.samples()])

    def clear(self) -> int:
        """Delete every kept sample (e.g. after a federated round consumed them); return how many."""
        with self._lock:
            n = self._db.execute("DELETE FROM samples").rowcount
            self._bytes = 0
        return int(n)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


def stack_samples(samples: list[Sample]) -> dict[str, np.ndarray]:
    """Samples as arrays, one row per sample: ``x:<input>`` (each sample's array, stacked on axis 0),
    ``top1``, ``confidence`` (NaN when absent), ``reason``, ``ts``, ``seq``.

    Every sample must have the same inputs with the same dtype and row shape (one model version);
    ValueError names the first that does not.
    """
    out: dict[str, np.ndarray] = {}
    if not samples:
        return out
    first = {a.name: a for a in samples[0].inputs}
    cols: dict[str, list[np.ndarray]] = {name: [] for name in first}
    for s in samples:
        got = {a.name: a for a in s.inputs}
        if set(got) != set(first):
            raise ValueError(f"sample seq {s.seq}: inputs {sorted(got)} differ from {sorted(first)}; export one model version at a time")
        for name, a in got.items():
            if a.dtype != first[name].dtype or a.shape[1:] != first[name].shape[1:]:
                raise ValueError(
                    f"sample seq {s.seq}: input {name!r} is {a.dtype}{a.shape}, others are {first[name].dtype}{first[name].shape}; "
                    "export one model version at a time"
                )
            arr = a.array()
            cols[name].append(arr if arr.ndim else arr.reshape(1))
    for name, parts in cols.items():
        out[f"x:{name}"] = np.concatenate(parts, axis=0)
    out["top1"] = np.array([-1 if s.top1 is None else s.top1 for s in samples], dtype=np.int64)
    out["confidence"] = np.array([np.nan if s.confidence is None else s.confidence for s in samples], dtype=np.float32)
    out["reason"] = np.array([s.reason for s in samples])
    out["ts"] = np.array([s.ts for s in samples], dtype=np.float64)
    out["seq"] = np.array([s.seq for s in samples], dtype=np.int64)
    return out


# -- the observer -----------------------------------------------------------------------------------


class SampleCapture:
    """The capture observer: ``observe`` after each prediction, ``mark_drift`` from the drift detector."""

    def __init__(
        self, policy: CapturePolicy, sink: SampleSink, device_id: str, *,
        scores_of: Callable[[Mapping[str, np.ndarray]], np.ndarray | None] | None = None,
    ) -> None:
        self.policy = policy
        self.sink = sink
        self.device_id = device_id
        self._scores_of = scores_of or _first_2d_float
        self._rng = np.random.default_rng(policy.seed)
        self._lock = threading.Lock()
        self._group_enabled: bool | None = None
        self._recent: deque[tuple[dict[str, np.ndarray], Any, Any, int | None, float | None, float]] = deque(
            maxlen=max(policy.drift_window, 1)
        )
        self._drift_left = 0
        self.captured: dict[str, int] = {"low_confidence": 0, "drift": 0, "random": 0}
        self.not_kept = 0  # chosen by a policy but refused by the sink (budget, size)

    # -- switches --------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """On when the device config enables capture and its group has not switched it off."""
        return self.policy.enabled and self._group_enabled is not False

    def set_group_enabled(self, value: bool | None) -> None:
        """The desired state's ``capture`` (False: off for this device's group; None/True: the device config decides)."""
        if value != self._group_enabled:
            log.info("sample capture %s by the desired state", {None: "left to the device config", True: "allowed", False: "switched off"}[value])
        self._group_enabled = value
        if value is False:
            with self._lock:
                self._recent.clear()
                self._drift_left = 0

    @property
    def drifting(self) -> bool:
        """True while rows are being captured for a drift mark."""
        return self._drift_left > 0

    def mark_drift(self, rows: int | None = None) -> int:
        """Drift detected now: capture the last ``drift_window`` rows served and the next ``rows`` (default
        ``drift_window``). Called by the drift detector; cheap and safe from any thread. Returns how many
        buffered rows were captured."""
        if not self.enabled or self.policy.drift_window == 0:
            return 0
        with self._lock:
            buffered = list(self._recent)
            self._recent.clear()
            self._drift_left = max(self._drift_left, self.policy.drift_window if rows is None else max(0, int(rows)))
        for feed, model, version, top1, conf, ts in buffered:
            self._keep(feed, model, version, "drift", top1, conf, ts)
        return len(buffered)

    # -- the hot path ----------------------------------------------------------------------------

    def observe(self, model: "LoadedModel", feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        p = self.policy
        scores = self._scores_of(outputs)
        if scores is not None:
            n = scores.shape[0]
            top1s = scores.argmax(axis=1)
            confs = scores.max(axis=1)
        else:
            first = next(iter(feed.values()), None)
            n = int(first.shape[0]) if first is not None and first.ndim else 1
            top1s = confs = None
        if n == 0:
            return
        draws = self._rng.random(n) if p.random_fraction > 0 else None
        now = time.time()
        for i in range(n):
            top1 = int(top1s[i]) if top1s is not None else None
            conf = float(confs[i]) if confs is not None else None
            reason: Reason | None = None
            with self._lock:
                if self._drift_left > 0:
                    self._drift_left -= 1
                    reason = "drift"
            if reason is None:
                if conf is not None and conf < p.low_confidence:
                    reason = "low_confidence"
                elif draws is not None and draws[i] < p.random_fraction:
                    reason = "random"
            if reason is None:
                if p.drift_window:
                    row = _row(feed, i, n)
                    with self._lock:
                        self._recent.append(({k: v.copy() for k, v in row.items()}, model.name, model.version, top1, conf, now))
                continue
            self._keep(_row(feed, i, n), model.name, model.version, reason, top1, conf, now)

    def _keep(self, row: Mapping[str, np.ndarray], model: str | None, version: str | None, reason: Reason,
              top1: int | None, conf: float | None, ts: float) -> None:
        if sum(a.nbytes for a in row.values()) > MAX_SAMPLE_BYTES:
            self.not_kept += 1
            return
        sample = Sample(
            device_id=self.device_id, seq=0, ts=ts, mono=time.monotonic(), model=model, version=version, reason=reason,
            top1=top1, confidence=conf, inputs=[SampleArray.of(k, v) for k, v in row.items()],
        )
        try:
            kept = self.sink.put(sample, sample_value(reason, conf, self.policy.low_confidence))
        except Exception as exc:  # a full disk must not fail predictions
            log.error("cannot keep a captured sample: %s", exc)
            kept = False
        if kept:
            self.captured[reason] += 1
        else:
            self.not_kept += 1

    def stats(self) -> dict[str, Any]:
        """Counters for health and tests."""
        return {"enabled": self.enabled, "destination": self.policy.destination, "captured": dict(self.captured),
                "not_kept": self.not_kept, "drifting": self.drifting}


def _row(feed: Mapping[str, np.ndarray], i: int, n: int) -> dict[str, np.ndarray]:
    """Row ``i`` of a batch of ``n``, keeping the batch axis (shape (1, ...)): what the model takes for one sample.
    Inputs that are not batched (first dimension is not ``n``) are kept whole."""
    return {k: (v[i : i + 1] if v.ndim and v.shape[0] == n else v) for k, v in feed.items()}


def _first_2d_float(out: Mapping[str, np.ndarray]) -> np.ndarray | None:
    for arr in out.values():
        if getattr(arr, "ndim", 0) == 2 and arr.dtype.kind == "f" and arr.shape[1] > 0:
            return arr
    return None
