"""The engines lease (issue 9 SCALE): one holder per fleet, taken over after the holder dies. Real SQLite file shared
by threads and by a separate process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest

from edgewise.control.alerts import MonitorEngine
from edgewise.control.db import init_db
from edgewise.control.lease import Lease, current_holder, try_acquire
from edgewise.control.timeutil import utcnow

TTL, RENEW = 1.5, 0.3


@pytest.fixture()
def db(tmp_path):
    d = init_db(f"sqlite:///{tmp_path / 'cp.db'}")
    yield d
    d.dispose()


def _wait(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_only_one_of_two_processes_holds_the_lease(db):
    a, b = Lease(db, "engines", holder="a", ttl_s=TTL, renew_s=RENEW), Lease(db, "engines", holder="b", ttl_s=TTL, renew_s=RENEW)
    a.start()
    b.start()
    try:
        for _ in range(10):
            assert a.held() != b.held()
            time.sleep(RENEW / 2)
        assert a.held() and current_holder(db, "engines")[0] == "a"
    finally:
        a.stop()
        b.stop()


def test_a_lease_is_renewed_by_its_holder_and_refused_to_others_until_it_expires(db):
    now = utcnow()
    assert try_acquire(db, "engines", "a", 10, now)
    assert try_acquire(db, "engines", "a", 10, now + timedelta(seconds=5))  # renewal moves the expiry
    assert not try_acquire(db, "engines", "b", 10, now + timedelta(seconds=14))  # a's lease runs until now + 15 s
    assert try_acquire(db, "engines", "b", 10, now + timedelta(seconds=16))
    assert not try_acquire(db, "engines", "a", 10, now + timedelta(seconds=17))
    assert current_holder(db, "engines")[0] == "b"


def test_contending_threads_never_hold_the_lease_at_the_same_time(db):
    leases = [Lease(db, "engines", holder=f"t{i}", ttl_s=0.6, renew_s=0.05) for i in range(4)]
    overlaps, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            held = [x.holder for x in leases if x.held()]
            if len(held) > 1:
                overlaps.append(held)
            time.sleep(0.005)

    for x in leases:
        x.start()
    w = threading.Thread(target=watch)
    w.start()
    try:
        time.sleep(1.0)
        holder = next(x for x in leases if x.held())
        holder.stop(release_it=False)  # dies without a word: someone else after the TTL
        assert _wait(lambda: any(x.held() for x in leases if x is not holder), 5)
        time.sleep(0.3)
    finally:
        stop.set()
        w.join()
        for x in leases:
            x.stop()
    assert overlaps == []


def test_a_process_restarted_under_the_same_holder_takes_its_lease_back_at_once(db):
    """Role `all` names its holder after host + MQTT client id, so one process killed and restarted does not wait out
    its own lease."""
    before = Lease(db, "engines", holder="host:edgewise-control-1234", ttl_s=30, renew_s=5)
    assert before.start()
    before.stop(release_it=False)  # killed: the lease stays recorded for 30 s
    again = Lease(db, "engines", holder="host:edgewise-control-1234", ttl_s=30, renew_s=5)
    try:
        assert again.start()
    finally:
        again.stop()


def test_a_clean_stop_hands_the_lease_over_at_the_next_renewal(db):
    a, b = Lease(db, "engines", holder="a", ttl_s=30, renew_s=0.2), Lease(db, "engines", holder="b", ttl_s=30, renew_s=0.2)
    a.start()
    b.start()
    try:
        assert a.held() and not b.held()
        t0 = time.monotonic()
        a.stop()
        assert _wait(b.held, 5) and time.monotonic() - t0 < 5  # not after the 30 s TTL
    finally:
        b.stop()


def test_an_engine_ticks_only_while_its_process_holds_the_lease(db):
    holder = Lease(db, "engines", holder="other", ttl_s=TTL, renew_s=RENEW)
    mine = Lease(db, "engines", holder="mine", ttl_s=TTL, renew_s=RENEW)
    holder.start()
    mine.start()
    engine = MonitorEngine(db, tick_s=0.05)
    engine.lease = mine
    engine.start()
    try:
        time.sleep(0.5)
        assert engine.ticks == 0 and not mine.held()
        holder.stop()  # the other process goes away cleanly
        assert _wait(lambda: engine.ticks > 0, 5)
    finally:
        engine.stop()
        mine.stop()


HOLDER = textwrap.dedent("""
    import sys, time
    from edgewise.control.db import init_db
    from edgewise.control.lease import Lease
    lease = Lease(init_db(sys.argv[1]), "engines", holder="doomed", ttl_s=float(sys.argv[2]), renew_s=float(sys.argv[3]))
    lease.start()
    print("held" if lease.held() else "not held", flush=True)
    time.sleep(600)
""")


def test_when_the_holder_process_is_killed_another_takes_over_within_ttl_and_one_renewal(db, tmp_path):
    url = str(db.engine.url)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(TTL), str(RENEW)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        survivor = Lease(db, "engines", holder="survivor", ttl_s=TTL, renew_s=RENEW)
        survivor.start()
        assert not survivor.held()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert _wait(survivor.held, TTL + RENEW + 2.0), "no takeover within TTL + one renewal (+2 s for a busy machine)"
        assert current_holder(db, "engines")[0] == "survivor"
        survivor.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_lease_whose_renewal_is_not_shorter_than_its_ttl_is_refused(db):
    with pytest.raises(ValueError, match="renew_s"):
        Lease(db, "engines", ttl_s=5, renew_s=5)
