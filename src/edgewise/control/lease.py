"""A lease in the database: which one of several control-plane processes runs a once-per-fleet job.

The rollout engine, the monitor loop (series roll-ups, alert rules, webhooks), the federated-learning
engine, the TUF refresher and the fleet drift judge must each run **once per fleet**, however many
processes serve the API or ingest telemetry. Every process that could run them keeps a :class:`Lease`;
an engine's loop asks :meth:`Lease.held` before each tick and skips it otherwise.

Taking and renewing is one conditional UPDATE::

    UPDATE leases SET holder = :me, expires_at = :now + ttl
     WHERE name = :name AND (holder = :me OR expires_at < :now)

which both SQLite and PostgreSQL execute atomically (row lock / database lock), so two processes can
never both see ``rowcount == 1`` for the same expiry. The first process ever INSERTs the row; a
concurrent INSERT loses on the primary key and simply does not hold the lease.

Timing (defaults): the lease lasts ``ttl_s`` = 15 s in the database and is renewed every ``renew_s`` = 5 s.
The holder itself stops ticking ``renew_s`` before the database expiry (it counts on its own monotonic
clock from the moment it *sent* the renewal), so a holder whose database went away, or whose process
froze, stops before anyone else may start: clocks of the processes may differ by up to ``renew_s``
(keep them in NTP sync). When the holder dies, another process takes over at its first renewal after
the expiry: within ``ttl_s + renew_s``. A holder that stops cleanly releases the lease at once.

>>> lease = Lease(db, "engines")            # doctest: +SKIP
>>> lease.start()                            # first attempt now, then a renewal thread
>>> if lease.held(): engine.tick()           # what every engine loop does
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .db import Database
from .models import LeaseRow
from .timeutil import utcnow

log = logging.getLogger(__name__)

ENGINES = "engines"  # rollout engine, monitor loop, FL engine, TUF refresher
DRIFT_JUDGE = "drift-judge"  # the fleet drift judgement scheduled by ingest
TTL_S = 15.0
RENEW_S = 5.0


def default_holder() -> str:
    """``host:pid:random``: unique per process, readable in the ``leases`` table."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def try_acquire(db: Database, name: str, holder: str, ttl_s: float, now: datetime) -> bool:
    """One attempt to take or renew ``name`` for ``holder`` until ``now + ttl_s``; True if it is ours now."""
    expires = now + timedelta(seconds=ttl_s)
    with db.session() as session:
        result = session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == name, or_(LeaseRow.holder == holder, LeaseRow.expires_at < now))
            .values(holder=holder, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            session.commit()
            return True
        session.rollback()
        if session.get(LeaseRow, name) is not None:
            return False  # somebody else holds it and it has not expired
        session.add(LeaseRow(name=name, holder=holder, expires_at=expires))
        try:
            session.commit()
        except IntegrityError:  # another process inserted it first: theirs
            session.rollback()
            return False
        return True


def release(db: Database, name: str, holder: str) -> None:
    """Let the lease go at once (a clean stop): the next process takes it at its next renewal, not after the TTL."""
    with db.session() as session:
        session.execute(
            update(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder)
            .values(expires_at=datetime(1970, 1, 1, tzinfo=utcnow().tzinfo))
            .execution_options(synchronize_session=False)
        )
        session.commit()


def current_holder(db: Database, name: str) -> tuple[str, datetime] | None:
    """(holder, expires_at) as recorded, for the health endpoint, the docs and tests."""
    with db.session() as session:
        row = session.get(LeaseRow, name)
        return (row.holder, row.expires_at) if row is not None else None


class Lease:
    """Keeps trying to hold ``name``; :meth:`held` says whether this process may run its job right now."""

    def __init__(self, db: Database, name: str = ENGINES, *, holder: str | None = None, ttl_s: float = TTL_S,
                 renew_s: float = RENEW_S, clock: Callable[[], datetime] = utcnow) -> None:
        if not 0 < renew_s < ttl_s:
            raise ValueError(f"lease {name!r}: renew_s ({renew_s}) must be positive and shorter than ttl_s ({ttl_s})")
        self.db, self.name, self.ttl_s, self.renew_s, self.clock = db, name, ttl_s, renew_s, clock
        self.holder = holder or default_holder()
        self.acquisitions = 0  # times this process went from not holding to holding (for tests and logs)
        self._valid_until = 0.0  # monotonic: held() is True before this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def held(self) -> bool:
        """True while the last renewal succeeded recently enough that nobody else can have taken over."""
        return time.monotonic() < self._valid_until

    def renew(self) -> bool:
        """One attempt to take or keep the lease (the thread calls this every ``renew_s``)."""
        sent = time.monotonic()
        was = self.held()
        try:
            ok = try_acquire(self.db, self.name, self.holder, self.ttl_s, self.clock())
        except SQLAlchemyError as exc:  # the database is away: keep what we have until it runs out
            log.warning("lease %s: cannot renew (%s); %s", self.name, exc.__class__.__name__,
                        "still valid for a few seconds" if was else "not held")
            return self.held()
        if ok:
            self._valid_until = sent + self.ttl_s - self.renew_s
            if not was:
                self.acquisitions += 1
                log.info("lease %s: held by this process (%s); its jobs run here", self.name, self.holder)
        else:
            self._valid_until = 0.0
            if was:
                log.warning("lease %s: taken over by another process; its jobs stop here", self.name)
        return ok

    def start(self) -> bool:
        """First attempt now (so a lone process runs its engines from the start), then renew in the background."""
        if self._thread is not None:
            return self.held()
        self.renew()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"edgewise-lease-{self.name}", daemon=True)
        self._thread.start()
        return self.held()

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()

    def stop(self, *, release_it: bool = True) -> None:
        """Stop renewing; by default give the lease up at once so another process takes over without waiting."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        was = self.held()
        self._valid_until = 0.0
        if release_it and was:
            try:
                release(self.db, self.name, self.holder)
            except SQLAlchemyError:
                log.warning("lease %s: could not release it; another process takes over after %.0f s",
                            self.name, self.ttl_s)


def may_run(lease: "Lease | None") -> bool:
    """What an engine loop asks before a tick: no lease configured (a test, one process) or the lease held."""
    return lease is None or lease.held()


__all__ = ["DRIFT_JUDGE", "ENGINES", "Lease", "current_holder", "may_run", "release", "try_acquire"]
