"""Crash accounting: a model that crashes the agent (a real process, really killed) is reported as a model.crash event."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from edgewise.agent import shadow as shadow_module
from edgewise.protocol import Event, decode
from test_agent_support import make_agent

TESTS = Path(__file__).parent


def _events(agent, *kinds):
    return [r for r in (decode(rec.payload) for rec in agent.outbox.peek(10000)) if isinstance(r, Event) and r.kind in kinds]


def _crash_kinds(agent):
    return _events(agent, "model.crash", "agent.crash", "agent.unclean_exit")


def _seed(state: Path, keys_dir: Path, device: str, bundle: Path) -> None:
    """A device that has ``bundle`` committed and is not running (as after provisioning)."""
    seed = make_agent(state, keys_dir, device_id=device)
    assert seed.install(bundle).result == "ok"
    seed.stop()


def _run(script: str, state: Path, keys_dir: Path, device: str, **env: str) -> int:
    """Run ``script`` in a fresh interpreter with ``agent`` bound to an agent on ``state``; return its exit code."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, {tests!r})
        from pathlib import Path
        from test_agent_support import make_agent
        agent = make_agent(Path({state!r}), Path({keys!r}), device_id={device!r})
    """).format(tests=str(TESTS), state=str(state), keys=str(keys_dir), device=device) + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, timeout=120)
    return proc.returncode


def test_a_model_that_segfaults_while_serving_is_reported_as_a_model_crash_on_the_next_start(tmp_path, keys_dir, bundles):
    state, device = tmp_path / "dev", "crash-serving"
    _seed(state, keys_dir, device, bundles["1.0.0"])
    # The device process: fault log on (as run_agent does), started, then a native crash inside the model's code path.
    code = _run("""
        import faulthandler
        import numpy as np
        from edgewise.agent.crash import enable_fault_log
        enable_fault_log(agent.state_dir)
        agent.start()
        model = agent.current_model
        model._pre = lambda x: faulthandler._sigsegv()   # stands in for a segfault in ONNX Runtime or a custom op
        agent.predict(np.zeros((1, 64), np.float32))
    """, state, keys_dir, device)
    assert code == -11  # SIGSEGV
    agent = make_agent(state, keys_dir, device_id=device)
    try:
        agent.start()
        crashes = _crash_kinds(agent)
        assert [e.kind for e in crashes] == ["model.crash"]
        ev = crashes[0]
        assert ev.severity == "error" and "Segmentation fault" in ev.message
        assert {k: ev.detail[k] for k in ("model", "version", "phase")} == {"model": "digits", "version": "1.0.0", "phase": "serving"}
        assert "runtime.py" in ev.detail["stack"]
    finally:
        agent.stop()
    again = make_agent(state, keys_dir, device_id=device)  # the evidence was consumed: the crash is not reported twice
    try:
        again.start()
        assert [e.kind for e in _crash_kinds(again)] == ["model.crash"]  # the first report, still unsent in the outbox
    finally:
        again.stop()


def test_a_model_that_kills_the_agent_during_its_trial_is_rolled_back_and_reported_as_a_model_crash(tmp_path, keys_dir, bundles):
    state, device = tmp_path / "dev", "crash-trial"
    _seed(state, keys_dir, device, bundles["1.0.0"])
    code = _run(f"agent.install({str(bundles['1.1.0'])!r})\n", state, keys_dir, device, EDGEWISE_FAULT_KILL_AT="trial")
    assert code == -9  # killed while 1.1.0 was on trial, as a crash would
    agent = make_agent(state, keys_dir, device_id=device)
    try:
        agent.start()
        assert agent.model_version == "1.0.0"  # the slots' trial rolled it back
        crashes = _crash_kinds(agent)
        assert [e.kind for e in crashes] == ["model.crash"]
        d = crashes[0].detail
        assert (d["model"], d["version"], d["phase"], d["starts"], d["passed"]) == ("digits", "1.1.0", "trial", 1, 0)
        assert "rolled_back" in [e.detail["result"] for e in _events(agent, "update")]
    finally:
        agent.stop()


def test_an_agent_killed_without_a_fatal_signal_is_an_unclean_exit_not_a_model_crash(tmp_path, keys_dir, bundles):
    state, device = tmp_path / "dev", "crash-kill"
    _seed(state, keys_dir, device, bundles["1.0.0"])
    code = _run("""
        import os, signal
        from edgewise.agent.crash import enable_fault_log
        enable_fault_log(agent.state_dir)   # on, as in run_agent: a SIGKILL still leaves no fatal-signal trace
        agent.start()
        os.kill(os.getpid(), signal.SIGKILL)   # the OOM killer or a power cut look the same from the next start
    """, state, keys_dir, device)
    assert code == -9
    agent = make_agent(state, keys_dir, device_id=device)
    try:
        agent.start()
        crashes = _crash_kinds(agent)
        assert [(e.kind, e.severity) for e in crashes] == [("agent.unclean_exit", "warning")]
        assert crashes[0].detail["model"] == "digits" and crashes[0].detail["phase"] == "serving"
    finally:
        agent.stop()


def test_a_clean_stop_and_restart_reports_no_crash(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    first = make_agent(state, keys_dir, device_id="crash-none")
    assert first.install(bundles["1.0.0"]).result == "ok"
    first.start()
    first.stop()
    second = make_agent(state, keys_dir, device_id="crash-none")
    try:
        second.start()
        assert _crash_kinds(second) == []
    finally:
        second.stop()


def test_the_shadow_module_examples_run():
    result = doctest.testmod(shadow_module)
    assert result.failed == 0 and result.attempted > 0
