"""The MQTT link: backoff, the session against a real broker, and garbage on the wire."""

from __future__ import annotations

import random
import threading

import pytest

from edgewise.agent.link import Link, backoff
from edgewise.protocol import DeviceState, encode, topics
from test_agent_support import ControlPlane, wait_for


def test_backoff_bound_doubles_from_base_up_to_the_cap():
    bounds = [backoff(a, base=0.5, cap=30.0, rand=lambda: 1.0) for a in range(10)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_backoff_is_full_jitter_within_zero_and_the_bound():
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(30.0, 0.5 * 2**attempt)
        delays = [backoff(attempt, rand=rng.random) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        assert len(set(delays)) > 150  # spread out, not one value
        assert min(delays) < bound * 0.2 and max(delays) > bound * 0.8


def test_backoff_survives_huge_attempt_numbers_and_refuses_negative_ones():
    assert backoff(10_000, cap=30.0, rand=lambda: 1.0) == 30.0
    with pytest.raises(ValueError):
        backoff(-1)


def _link(broker_url: str, device_id: str, desired: list, bad: list) -> Link:
    host, port = broker_url.removeprefix("mqtt://").split(":")
    return Link(
        device_id, host, int(port),
        on_desired=desired.append,
        on_bad_message=lambda topic, reason: bad.append((topic, reason)),
        state=lambda: DeviceState(device_id=device_id, model="digits", version="1.0.0"),
        backoff_base=0.05, backoff_cap=0.2,
    )


def test_link_connects_publishes_retained_state_and_receives_desired_state(mosquitto):
    cp = ControlPlane(mosquitto)
    desired: list = []
    link = _link(mosquitto, "link-1", desired, [])
    try:
        link.start()
        assert link.wait_connected(10)
        wait_for(lambda: cp.last_state("link-1"), what="state")
        assert cp.last_state("link-1").status == "online"
        cp.desire("link-1", 3, model="digits", version="1.1.0")
        wait_for(lambda: desired, what="desired state")
        assert desired[0].generation == 3 and desired[0].version == "1.1.0"
        assert link.publish(topics.telemetry("link-1"), b"\x80", qos=1) is True  # True only after PUBACK
        link.stop(offline_state=DeviceState(device_id="link-1", status="offline"))
        wait_for(lambda: cp.last_state("link-1").status == "offline", what="offline state on a clean stop")
        assert not link.connected
    finally:
        link.stop()
        cp.close()


def test_malformed_payload_is_counted_reported_and_the_session_survives(mosquitto):
    cp = ControlPlane(mosquitto)
    desired: list = []
    bad: list = []
    link = _link(mosquitto, "link-2", desired, bad)
    try:
        link.start()
        assert link.wait_subscribed(10)
        cp.publish(topics.desired("link-2"), b"\xc1 definitely not msgpack", retain=False)
        cp.publish(topics.desired("link-2"), encode(DeviceState(device_id="link-2")), retain=False)  # wrong type for channel
        wait_for(lambda: len(bad) == 2, what="two bad messages")
        assert link.bad_messages == 2
        assert bad[0][0] == topics.desired("link-2") and "not msgpack" in bad[0][1]
        assert "does not belong on channel 'desired'" in bad[1][1]
        cp.desire("link-2", 1, model="digits", version="1.0.0")
        wait_for(lambda: desired, what="a good message after the bad ones")
        assert link.connected
    finally:
        link.stop()
        cp.close()


def test_link_keeps_retrying_while_the_broker_is_unreachable():
    from conftest import free_port

    link = Link(
        "link-3", "127.0.0.1", free_port(),
        on_desired=lambda d: None, on_bad_message=lambda t, r: None,
        state=lambda: DeviceState(device_id="link-3"), backoff_base=0.01, backoff_cap=0.05,
    )
    link.start()
    try:
        wait_for(lambda: link.last_error and "cannot connect" in link.last_error, what="a connect error")
        assert not link.connected
        assert link.publish(topics.telemetry("link-3"), b"x") is False  # nothing pretends to be delivered
        assert any(t.name == "edgewise-link-link-3" for t in threading.enumerate())
    finally:
        link.stop()
