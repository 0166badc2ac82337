"""Alerts raised on the device itself go out through the outbox as ``alert.<name>`` events (the control plane
turns them into alerts: tests/test_monitor_alerts.py)."""

from __future__ import annotations

import pytest

from edgewise.agent.outbox import PRIORITY_ALERT
from edgewise.protocol import Event, decode
from test_agent_support import make_agent


def _alerts(agent):
    out = []
    for r in agent.outbox.peek(100):
        m = decode(r.payload)
        if isinstance(m, Event) and m.kind.startswith("alert."):
            out.append((m, r.priority))
    return out


def test_a_raised_alert_is_an_alert_event_at_alert_priority_and_info_clears_it(tmp_path, keys_dir):
    agent = make_agent(tmp_path / "a", keys_dir, device_id="alert-raise")
    try:
        agent.raise_alert("sensor_range", "temperature sensor reads 180 C", detail={"sensor": "t0"})
        agent.raise_alert("sensor_range", "temperature sensor back in range", severity="info")
        (raised, prio), (cleared, _) = _alerts(agent)
        assert raised.kind == "alert.sensor_range" and raised.severity == "warning" and raised.detail == {"sensor": "t0"}
        assert prio == PRIORITY_ALERT and cleared.severity == "info"
    finally:
        agent.stop()


def test_in_alerts_only_mode_the_clearing_info_event_still_goes_out(tmp_path, keys_dir):
    agent = make_agent(tmp_path / "b", keys_dir, device_id="alert-quiet", bandwidth_mode="alerts-only")
    try:
        agent.raise_alert("disk", "disk 97% full", severity="error")
        agent.raise_alert("disk", "disk back to 60%", severity="info")
        assert [m.severity for m, _ in _alerts(agent)] == ["error", "info"]
    finally:
        agent.stop()


def test_an_unknown_severity_is_refused():
    from edgewise.agent.service import Agent

    with pytest.raises(ValueError, match="severity"):
        Agent.raise_alert(None, "x", "y", severity="loud")  # type: ignore[arg-type]
