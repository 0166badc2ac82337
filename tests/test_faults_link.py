"""Fault tests for the telemetry path: a cut or stalled link (TCP proxy), a broker restart mid-sync,
an agent SIGKILLed mid-sync. Real Mosquitto, the agent as a real process, the real control plane as
the receiver (its UNIQUE(device_id, seq) is the de-duplication under test).

The accounting, every time: each sequence number the agent issued is stored exactly once at the
control plane, except those the outbox reports dropped and those still waiting in the outbox.
"""

from __future__ import annotations

import time
import uuid

import pytest

from conftest import free_port, wait_port
from edgewise.agent.outbox import Outbox
from edgewise.protocol import Telemetry
from edgewise.sim.fleet import http_json, wait_until
from faultproxy import FaultProxy, agent_process, seed_device
from test_agent_support import Mosquitto

PRELOAD = 12_000  # records a long-offline device has waiting: several drain rounds of 2000
SLOW_LINK = 128 * 1024  # bytes/s through the proxy while we wait to interrupt the sync


def _control_plane(tmp_path, keys_dir, broker_url):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
        broker_url=broker_url, trust=[keys_dir / "signing.pub"],
    )
    cp = ControlPlane(settings)
    cp.start()
    return cp


def _stored_seqs(cp, device: str) -> list[int]:
    t = http_json("GET", f"{cp.url}/api/v1/devices/{device}/telemetry?limit=100000", timeout=30, token=cp.admin_token)
    e = http_json("GET", f"{cp.url}/api/v1/devices/{device}/events?limit=100000", timeout=30, token=cp.admin_token)
    return [r["seq"] for r in t] + [r["seq"] for r in e]


def _preload(state, device: str, n: int) -> None:
    """A device that was offline for a long time: ``n`` telemetry records waiting in its outbox."""
    now = time.time()
    with Outbox(state / "outbox.db", max_bytes=256 * 2**20) as ob:
        for i in range(0, n, 5000):
            ob.enqueue_many([Telemetry(device_id=device, seq=0, ts=now - n + j, mono=float(j), inferences=j)
                             for j in range(i, min(n, i + 5000))])


def drained(agent):  # type: ignore[no-untyped-def]
    """Connected with at most a couple of fresh samples waiting (telemetry keeps coming)."""
    def check():  # type: ignore[no-untyped-def]
        h = agent.health()
        return h if h["connected"] and h["outbox_pending"] <= 2 else None

    return check


def _assert_exactly_once(cp, agent, device: str, timeout: float = 90.0) -> dict:
    """Stop the agent cleanly, read its outbox, and check the control plane stored every issued record once."""
    agent.stop()
    with Outbox(agent.state_dir / "outbox.db") as ob:
        issued = ob.issued()
        waiting = {r.seq for r in ob.peek(1_000_000)}
        dropped = sum(ob.dropped().values())
    must = set(range(issued)) - waiting

    def arrived():  # type: ignore[no-untyped-def]
        seqs = _stored_seqs(cp, device)
        return seqs if len(must - set(seqs)) <= dropped else None

    try:
        seqs = wait_until(arrived, timeout, interval=0.5, what=f"{len(must)} records of {device} at the control plane")
    except Exception:
        seqs = _stored_seqs(cp, device)
        missing = sorted(must - set(seqs))
        raise AssertionError(f"{len(missing)} of {issued} issued records missing (dropped {dropped}): {missing[:20]}") from None
    assert len(seqs) == len(set(seqs)), "duplicate (device, seq) rows stored"
    assert set(seqs) <= set(range(issued)), "a stored seq the agent never issued"
    missing = must - set(seqs)
    assert len(missing) == dropped, f"missing {len(missing)} != dropped {dropped}"
    return {"issued": issued, "stored": len(seqs), "waiting": len(waiting), "dropped": dropped}


@pytest.fixture()
def control_plane(tmp_path, keys_dir, mosquitto):
    cp = _control_plane(tmp_path, keys_dir, mosquitto)
    yield cp
    cp.stop()


@pytest.mark.parametrize("fault", ["drop", "stall-then-drop", "stall-then-resume"])
def test_a_cut_link_loses_and_duplicates_nothing(fault, tmp_path, keys_dir, bundles, mosquitto, control_plane, digits_data):
    device = f"link-{fault}-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device
    seed_device(state, device, keys_dir, bundles["1.0.0"])
    proxy = FaultProxy(int(mosquitto.rsplit(":", 1)[1]))
    agent = agent_process(state, device, keys_dir, proxy.url, telemetry_interval_s=0.1)
    try:
        agent.start()
        agent.wait_ready(60)
        wait_until(drained(agent), 60, interval=0.1, what="the agent to connect and drain")
        before = agent.health()["outbox_pending"]

        if fault == "drop":
            proxy.drop()
            wait_until(lambda: not agent.health()["connected"], 30, interval=0.1, what="the agent to see the link down")
        else:
            proxy.stall()  # nothing passes; the agent does not know yet
        # The link is bad for a while: the agent keeps serving and buffers telemetry.
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert agent.predict(digits_data.x_test[:1])["version"] == "1.0.0"
            time.sleep(0.1)
        wait_until(lambda: agent.health()["outbox_pending"] >= before + 10, 30, interval=0.1, what="telemetry to pile up")
        if fault == "stall-then-drop":
            proxy.drop()
        proxy.forward()
        wait_until(drained(agent), 90, interval=0.1, what="the agent to reconnect and drain its outbox")
        assert proxy.accepted >= (1 if fault == "stall-then-resume" else 2)
        stats = _assert_exactly_once(control_plane, agent, device)
        assert stats["stored"] >= 20, stats
    finally:
        agent.stop()
        proxy.close()


SCALE = 60  # simulated seconds per real second: the agent's timers are the defaults divided by this


def test_a_link_down_for_ten_simulated_minutes_is_retried_at_the_capped_backoff_and_loses_nothing(
    tmp_path, keys_dir, bundles, mosquitto, control_plane, digits_data
):
    """Ten minutes of outage in ten seconds: every timer of the agent (telemetry 10 s, flush 1 s, reconnect
    0.5 s..30 s) runs 60x faster, so the outage spans as many telemetry intervals and reconnect attempts as
    ten real minutes would. MQTT's keepalive (whole seconds) is not scaled; a refused link does not need it."""
    device = f"link-minutes-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device
    seed_device(state, device, keys_dir, bundles["1.0.0"],
                flush_interval_s=1.0 / SCALE, reconnect_base_s=0.5 / SCALE, reconnect_cap_s=30.0 / SCALE)
    proxy = FaultProxy(int(mosquitto.rsplit(":", 1)[1]))
    agent = agent_process(state, device, keys_dir, proxy.url, telemetry_interval_s=10.0 / SCALE)
    try:
        agent.start()
        agent.wait_ready(60)
        wait_until(drained(agent), 60, interval=0.1, what="the agent to connect and drain")
        proxy.drop()
        wait_until(lambda: not agent.health()["connected"], 30, interval=0.05, what="the agent to see the link down")
        attempts_before, pending_before = proxy.accepted, agent.health()["outbox_pending"]
        outage_s = 10 * 60 / SCALE
        deadline = time.monotonic() + outage_s
        served = 0
        while time.monotonic() < deadline:
            assert agent.predict(digits_data.x_test[:1])["version"] == "1.0.0"
            served += 1
            time.sleep(0.05)
        attempts = proxy.accepted - attempts_before
        piled = agent.health()["outbox_pending"] - pending_before
        # full jitter under a 30 s cap: a delay is at most 30 s, so ten minutes hold at least 20 attempts
        assert attempts >= 10 * 60 // 30, f"{attempts} reconnect attempts in 10 simulated minutes"
        # one sample per 10 s plus the events the agent raised: about 60 records (timers on a busy CI box may slip)
        assert piled >= 40, f"only {piled} records buffered in 10 simulated minutes"
        proxy.forward()
        restored = time.monotonic()
        wait_until(drained(agent), 60, interval=0.05, what="the agent to reconnect and drain its outbox")
        catch_up_sim_s = (time.monotonic() - restored) * SCALE
        # back within about one capped delay (30 simulated s), plus the drain; generous for a loaded CI machine
        assert catch_up_sim_s < 5 * 60, f"link restored -> outbox drained took {catch_up_sim_s:.0f} simulated s"
        stats = _assert_exactly_once(control_plane, agent, device)
        assert stats["stored"] >= piled and served > 0, stats
    finally:
        agent.stop()
        proxy.close()


def test_broker_restart_during_a_sync_loses_and_duplicates_nothing(tmp_path, keys_dir, bundles):
    port = free_port()
    broker = Mosquitto(port, tmp_path, persistent=True)  # the control plane's queued messages survive it
    broker.start()
    wait_port(port)
    cp = _control_plane(tmp_path, keys_dir, broker.url)
    device = f"brestart-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device
    seed_device(state, device, keys_dir, bundles["1.0.0"])
    _preload(state, device, PRELOAD)
    proxy = FaultProxy(port, rate_bytes_s=SLOW_LINK)  # a slow link, so the sync is long enough to interrupt
    agent = agent_process(state, device, keys_dir, proxy.url, telemetry_interval_s=0.2)
    try:
        agent.start()
        agent.wait_ready(60)
        wait_until(lambda: 1000 < agent.health()["outbox_pending"] < PRELOAD - 500, 60, interval=0.01, what="the sync to be under way")
        broker.stop()
        pending_at_fault = agent.health()["outbox_pending"]
        time.sleep(1.0)
        assert agent.predict(__import__("numpy").zeros((1, 64), dtype="float32"))["version"] == "1.0.0"
        broker.start()
        wait_port(port)
        proxy.rate_bytes_s = None  # the rest of the sync at full speed
        wait_until(drained(agent), 120, interval=0.1, what="the agent to reconnect and drain its outbox")
        stats = _assert_exactly_once(cp, agent, device, timeout=120)
        assert pending_at_fault > 1000 and stats["stored"] >= PRELOAD, (pending_at_fault, stats)
    finally:
        agent.stop()
        proxy.close()
        cp.stop()
        broker.remove()


def test_agent_killed_during_a_sync_loses_and_duplicates_nothing(tmp_path, keys_dir, bundles, mosquitto, control_plane):
    device = f"synckill-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device
    seed_device(state, device, keys_dir, bundles["1.0.0"])
    _preload(state, device, PRELOAD)
    proxy = FaultProxy(int(mosquitto.rsplit(":", 1)[1]), rate_bytes_s=SLOW_LINK)
    agent = agent_process(state, device, keys_dir, proxy.url, telemetry_interval_s=0.2)
    try:
        agent.start()
        agent.wait_ready(60)
        wait_until(lambda: 1000 < agent.health()["outbox_pending"] < PRELOAD - 500, 60, interval=0.01, what="the sync to be under way")
        agent.kill()  # SIGKILL mid-sync: some batches published, maybe not acknowledged
        with Outbox(state / "outbox.db") as ob:
            pending_at_kill = ob.pending()
        assert pending_at_kill > 1000  # killed with part of the backlog still to send
        agent.start()
        agent.wait_ready(60)
        proxy.rate_bytes_s = None  # the restarted agent may drain at full speed
        wait_until(drained(agent), 120, interval=0.1, what="the restarted agent to drain its outbox")
        stats = _assert_exactly_once(control_plane, agent, device, timeout=120)
        assert stats["stored"] >= PRELOAD, stats
    finally:
        agent.stop()
        proxy.close()
