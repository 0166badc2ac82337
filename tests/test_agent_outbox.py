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
        ob.ack([r.id for r in ob.peek(3)])
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
        first_two = [r.id for r in ob.peek(2)]
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
