"""The durable outbox: sequence numbers, crash safety, priorities and the size bound."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from edgewise.agent import Outbox
from edgewise.agent.outbox import PRIORITY_ALERT, PRIORITY_EVENT, PRIORITY_TELEMETRY
from edgewise.protocol import Event, Telemetry, decode


def telemetry(i: int = 0) -> Telemetry:
    return Telemetry(device_id="dev-1", seq=0, ts=time.time(), inferences=i)


def event(severity: str = "info", i: int = 0) -> Event:
    return Event(device_id="dev-1", seq=0, ts=time.time(), kind="test", severity=severity, message=f"e{i}")  # type: ignore[arg-type]


def test_enqueue_assigns_consecutive_seq_shared_by_telemetry_and_events(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        seqs = [ob.enqueue(telemetry()), ob.enqueue(event()), ob.enqueue(telemetry())]
        assert seqs == [0, 1, 2]
        assert ob.issued() == 3
        stored = sorted(decode(r.payload).seq for r in ob.peek(10))
        assert stored == [0, 1, 2]


def test_seq_numbers_continue_after_reopening(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        for _ in range(5):
            ob.enqueue(telemetry())
        ob.ack([r.seq for r in ob.peek(3)])
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.pending() == 2
        assert ob.issued() == 5
        assert ob.enqueue(event()) == 5


def test_records_survive_kill_9_and_seq_numbers_continue(tmp_path):
    db = tmp_path / "o.db"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from edgewise.agent import Outbox
        from edgewise.protocol import Telemetry
        ob = Outbox({str(db)!r})
        for i in range(20):
            ob.enqueue(Telemetry(device_id="dev-1", seq=0, ts=time.time(), inferences=i))
        print("enqueued", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "enqueued" in proc.stdout
    with Outbox(db) as ob:
        assert ob.pending() == 20
        assert ob.issued() == 20
        assert [decode(r.payload).inferences for r in ob.peek(100)] == list(range(20))
        assert ob.enqueue(telemetry()) == 20


def test_peek_returns_alerts_then_events_then_telemetry_oldest_first(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue(telemetry(1))
        ob.enqueue(event("info", 1))
        ob.enqueue(event("error", 1))
        ob.enqueue(telemetry(2))
        ob.enqueue(event("critical", 2))
        prios = [r.priority for r in ob.peek(10)]
        assert prios == [PRIORITY_ALERT, PRIORITY_ALERT, PRIORITY_EVENT, PRIORITY_TELEMETRY, PRIORITY_TELEMETRY]
        assert [r.seq for r in ob.peek(10)] == [2, 4, 1, 0, 3]


def test_ack_removes_only_the_acknowledged_records(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        for i in range(4):
            ob.enqueue(telemetry(i))
        first_two = [r.seq for r in ob.peek(2)]
        assert ob.ack(first_two) == 2
        assert [decode(r.payload).inferences for r in ob.peek(10)] == [2, 3]
        assert ob.ack(first_two) == 0


def test_a_full_outbox_drops_the_oldest_lowest_priority_records_first_and_counts_them(tmp_path):
    with Outbox(tmp_path / "o.db", max_bytes=8192) as ob:
        ob.enqueue(event("error"))
        ob.enqueue(event("info"))
        for i in range(200):
            ob.enqueue(telemetry(i))
        kept = ob.peek(1000)
        assert ob.size_bytes <= 8192
        assert {r.priority for r in kept} == {PRIORITY_ALERT, PRIORITY_EVENT, PRIORITY_TELEMETRY}
        telemetry_kept = [decode(r.payload).inferences for r in kept if r.priority == PRIORITY_TELEMETRY]
        assert telemetry_kept == list(range(200 - len(telemetry_kept), 200))  # the newest survive
        dropped = ob.dropped()
        assert dropped["telemetry"] == 200 - len(telemetry_kept) > 0
        assert dropped["event"] == dropped["alert"] == 0
        assert ob.issued() == 202


def test_when_only_higher_priority_records_are_left_a_new_low_priority_record_is_dropped(tmp_path):
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        while ob.dropped()["alert"] == 0:
            ob.enqueue(event("error"))
        alerts = ob.pending()
        seq = ob.enqueue(telemetry())
        assert ob.pending() == alerts  # nothing of the alerts was sacrificed for telemetry
        assert ob.dropped()["telemetry"] == 1
        assert ob.issued() == seq + 1  # the seq number was used: the server sees the gap


def test_drop_counts_survive_reopening(tmp_path):
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        for i in range(100):
            ob.enqueue(telemetry(i))
        dropped = ob.dropped()["telemetry"]
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        assert ob.dropped()["telemetry"] == dropped > 0


# -- batched enqueue, wire format, power-cut numbering ---------------------------------------------


def test_enqueue_many_stores_all_in_one_transaction_with_consecutive_seq(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue(event())
        seqs = ob.enqueue_many([telemetry(i) for i in range(50)])
        assert seqs == list(range(1, 51))
        assert ob.pending() == 51 and ob.issued() == 51
        assert [decode(r.payload).inferences for r in ob.peek(100) if r.kind == "telemetry"] == list(range(50))


def test_batch_payload_decodes_as_the_protocol_batch(tmp_path):
    from edgewise.agent.outbox import batch_payload
    from edgewise.protocol import Batch

    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue_many([telemetry(i) for i in range(300)])
        payload = batch_payload("dev-1", [r.payload for r in ob.peek(300)])
    assert payload[:4] == b"\x28\xb5\x2f\xfd"  # zstd: it pays at this size
    batch = decode(payload)
    assert isinstance(batch, Batch) and batch.device_id == "dev-1"
    assert [t.inferences for t in batch.items] == list(range(300))
    assert [t.seq for t in batch.items] == list(range(300))


def test_drain_once_acks_only_what_was_published(tmp_path):
    from edgewise.agent.outbox import drain_once

    sent: list[tuple[str, bytes]] = []
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue_many([telemetry(i) for i in range(10)] + [event("error")])
        assert drain_once(ob, "dev-1", lambda topic, payload: False) == 0
        assert ob.pending() == 11
        assert drain_once(ob, "dev-1", lambda topic, payload: sent.append((topic, payload)) or True) == 11
        assert ob.pending() == 0
    assert [t.split("/")[3] for t, _ in sent] == ["events", "telemetry"]


def test_after_a_reboot_that_followed_an_unclean_stop_numbering_skips_the_reserved_block(tmp_path):
    """A power cut can lose the last NORMAL commits; their numbers must never be issued again."""
    import sqlite3

    from edgewise.agent.outbox import SEQ_BLOCK

    db = tmp_path / "o.db"
    with Outbox(db) as ob:
        ob.enqueue_many([telemetry(i) for i in range(5)])
    with Outbox(db) as ob:  # clean stop, same boot: numbering continues
        assert ob.enqueue(telemetry()) == 5
    con = sqlite3.connect(db)  # as if the process died (clean=0) and the machine rebooted (another boot id)
    con.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
    con.execute("UPDATE meta SET value = 12345 WHERE key = 'boot_id'")
    con.commit()
    con.close()
    with Outbox(db) as ob:
        assert ob.enqueue(telemetry()) == 5 + SEQ_BLOCK  # the block reserved when seq 0..4 were issued
        assert ob.pending() == 7


def test_full_synchronous_mode_is_accepted_and_unknown_modes_are_refused(tmp_path):
    import pytest

    with Outbox(tmp_path / "o.db", synchronous="FULL") as ob:
        assert ob.enqueue(telemetry()) == 0
    with pytest.raises(ValueError):
        Outbox(tmp_path / "p.db", synchronous="OFF")


# -- a corrupt file is moved aside -----------------------------------------------------------------


def test_a_file_of_garbage_is_moved_aside_and_a_fresh_outbox_starts(tmp_path):
    db = tmp_path / "outbox.db"
    db.write_bytes(b"this is not sqlite at all \x00\xff" * 200)
    with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert ob.recovered_from.name.startswith("outbox.db.corrupt-")
        assert ob.recovered_from.read_bytes().startswith(b"this is not sqlite")
        seq = ob.enqueue(telemetry())
        assert ob.pending() == 1
        assert seq >= int(time.time() - 60) * 1_000_000  # far above the lost numbering: no false duplicates
    with Outbox(db) as ob:  # the new file is fine: no second recovery; numbering continues
        assert ob.recovered_from is None and ob.pending() == 1
        assert ob.enqueue(telemetry()) == seq + 1


def test_a_truncated_database_is_moved_aside(tmp_path):
    db = tmp_path / "outbox.db"
    with Outbox(db) as ob:
        for i in range(40):
            ob.enqueue_many([telemetry(j) for j in range(100)])
    data = db.read_bytes()
    assert len(data) > 64 * 1024
    db.write_bytes(data[: len(data) // 3])
    with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert ob.pending() == 0
        ob.enqueue(event("critical"))
        assert ob.pending() == 1


def test_the_agent_reports_a_recovered_outbox_as_a_critical_event(tmp_path, keys_dir):
    from test_agent_support import make_agent

    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.db").write_bytes(b"\x00garbage" * 1000)
    agent = make_agent(state, keys_dir)
    try:
        events = [decode(r.payload) for r in agent.outbox.peek(10) if r.kind == "event"]
        recovered = [e for e in events if e.kind == "outbox_recovered"]
        assert len(recovered) == 1 and recovered[0].severity == "critical"
        assert recovered[0].detail["moved_to"] == str(agent.outbox.recovered_from)
        assert agent.outbox.recovered_from.name in recovered[0].message
    finally:
        agent.stop()


# -- a full disk drops by priority and keeps serving -----------------------------------------------


def _fill_until_disk_full_drops(ob: Outbox, limit: int = 20000) -> int:
    for i in range(limit):
        ob.enqueue(telemetry(i))
        if ob.dropped()["telemetry"]:
            return i
    raise AssertionError("the disk never filled up")


def test_disk_full_emulated_with_max_page_count_drops_counts_and_keeps_serving(tmp_path):
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue(event("error"))
        ob._db.execute("PRAGMA max_page_count=24")  # ~96 KiB: SQLite then reports "database or disk is full"
        _fill_until_disk_full_drops(ob)
        for i in range(200):  # keeps accepting without raising; old telemetry makes room for new
            ob.enqueue(telemetry(10_000 + i))
        dropped = ob.dropped()
        assert dropped["telemetry"] > 0 and dropped["alert"] == 0
        kept = ob.peek(100_000)
        assert any(r.priority == PRIORITY_ALERT for r in kept)  # the alert survived
        assert decode(kept[-1].payload).inferences == 10_199  # the newest telemetry is there
        seqs = [r.seq for r in kept]
        assert len(set(seqs)) == len(seqs)
        issued = ob.issued()
    with Outbox(tmp_path / "o.db") as ob:  # counts were saved, numbering continues
        assert ob.dropped()["telemetry"] == dropped["telemetry"]
        assert ob.issued() == issued


def test_disk_full_on_a_real_tiny_tmpfs(tmp_path):
    """A real ENOSPC: another program fills the disk; the outbox drops and counts, and recovers once space is back."""
    import os
    import subprocess

    import pytest

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount is not permitted here: {r.stderr.strip()}")
    try:
        with Outbox(mnt / "o.db", max_bytes=64 * 2**20) as ob:  # the store bound is far above the disk
            ob.enqueue(event("critical"))
            ob.enqueue_many([telemetry(i) for i in range(100)])
            ballast = mnt / "ballast"
            with open(ballast, "wb", buffering=0) as f:  # someone else fills the disk to the last byte
                try:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
                except OSError:
                    pass
            stored = ob.pending()
            for i in range(50):
                ob.enqueue(telemetry(1000 + i))  # must not raise
            assert ob.dropped()["telemetry"] > 0 and ob.dropped()["alert"] == 0
            assert any(r.priority == PRIORITY_ALERT for r in ob.peek(100_000))
            assert ob.pending() <= stored + 50
            ballast.unlink()  # space is back: records are stored again, and the drops are on record
            before = ob.pending()
            ob.enqueue(telemetry(99))
            assert ob.pending() == before + 1
            dropped = ob.dropped()
        with Outbox(mnt / "o.db") as ob:
            assert ob.dropped() == dropped
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _kill9_after(db, body: str) -> None:
    """Run ``body`` (with ``ob`` an open Outbox on ``db``) in a child process, then SIGKILL it."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from edgewise.agent import Outbox
        from edgewise.protocol import Event, Telemetry
        ob = Outbox({str(db)!r}, max_bytes=4096)
        """
    ) + textwrap.dedent(body) + "\nos.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_numbers_of_acknowledged_records_are_not_reissued_after_kill_9_with_an_empty_outbox(tmp_path):
    db = tmp_path / "o.db"
    _kill9_after(db, """
        for i in range(10):
            ob.enqueue(Telemetry(device_id="dev-1", seq=0, ts=time.time(), inferences=i))
        ob.ack([r.seq for r in ob.peek(100)])
    """)
    with Outbox(db) as ob:
        assert ob.pending() == 0
        assert ob.enqueue(telemetry()) == 10


def test_numbers_of_new_records_dropped_by_the_bound_are_not_reissued_after_kill_9(tmp_path):
    db = tmp_path / "o.db"
    _kill9_after(db, """
        ob.enqueue(Event(device_id="dev-1", seq=0, ts=time.time(), kind="x", severity="critical", message="a" * 3000))
        for i in range(5):  # no room and nothing of lower priority to drop: these are dropped, their numbers used
            ob.enqueue(Event(device_id="dev-1", seq=0, ts=time.time(), kind="x", severity="info", message="b" * 3000))
    """)
    with Outbox(db, max_bytes=4096) as ob:
        assert ob.dropped()["event"] == 5
        assert ob.enqueue(telemetry()) == 6


def test_an_outbox_written_by_0_1_is_rekeyed_by_seq_and_keeps_its_records(tmp_path):
    import sqlite3

    db = tmp_path / "o.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.executescript(
        """
        CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, kind TEXT NOT NULL,
            priority INTEGER NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
        CREATE INDEX records_by_priority ON records (priority, id);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('next_seq', 7), ('seq_reserved', 100007), ('clean', 1);
        """
    )
    import msgpack

    for seq in (4, 5, 6):
        payload = msgpack.packb(telemetry(seq).model_dump(mode="json") | {"seq": seq}, use_bin_type=True)
        con.execute("INSERT INTO records (seq, kind, priority, created, size, payload) VALUES (?, 'telemetry', 0, 0, ?, ?)",
                    (seq, len(payload), payload))
    con.close()
    with Outbox(db) as ob:
        assert [r.seq for r in ob.peek(10)] == [4, 5, 6]
        assert ob.ack([4]) == 1
        assert ob.enqueue(telemetry()) == 7
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(records)")]
    assert "id" not in cols
