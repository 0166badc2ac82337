"""Fault tests: the agent (a real process, real Mosquitto) is SIGKILLed at every step of an update.

The hook is ``EDGEWISE_FAULT_KILL_AT=<step>`` (read once when ``edgewise.agent.updater`` is imported):
at that step the agent kills itself with SIGKILL, as a power cut or the OOM killer would. The test
restarts it without the hook and checks it serves 1.0.0 or 1.1.0 (never nothing, never a
half-written slot) and then converges to 1.1.0 by itself.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from edgewise.agent.updater import FAULT_STEPS
from edgewise.bundle import sha256_file
from edgewise.agent.slots import Slots
from edgewise.sim.fleet import wait_until
from faultproxy import agent_process, seed_device
from test_agent_support import BundleServer, ControlPlane, artifact_for


@pytest.fixture(scope="module")
def bundle_server(bundles):
    s = BundleServer()
    s.add("/digits-1.1.0.ewb", bundles["1.1.0"].read_bytes())
    yield s
    s.close()


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_agent_killed_at_each_update_step_serves_a_whole_model_and_converges(
    step, tmp_path, keys_dir, bundles, bundle_server, mosquitto, monkeypatch, digits_data
):
    device = f"kill-{step}-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device
    seed_device(state, device, keys_dir, bundles["1.0.0"])
    cp = ControlPlane(mosquitto)
    agent = agent_process(state, device, keys_dir, mosquitto, server_url=bundle_server.base_url)
    try:
        cp.desire(device, 1, model="digits", version="1.1.0",
                  artifact=artifact_for(bundles["1.1.0"], bundle_server.base_url + "/digits-1.1.0.ewb"))
        monkeypatch.setenv("EDGEWISE_FAULT_KILL_AT", step)
        agent.start()
        monkeypatch.delenv("EDGEWISE_FAULT_KILL_AT")
        code = agent.proc.wait(120)
        log = (state / "agent.log").read_text(errors="replace")
        assert code == -9, f"agent exited with {code}, not killed at {step!r}:\n{log[-3000:]}"
        assert f"EDGEWISE_FAULT_KILL_AT={step}" in log

        # On disk, after the kill: the committed slot is a whole, recorded bundle.
        slots = Slots(state / "slots")
        rec = slots.record()
        assert rec is not None and rec.version == ("1.1.0" if step == "commit" else "1.0.0")
        assert sha256_file(slots.bundle(rec.slot)) == rec.sha256
        assert slots.trial() is None or step == "trial"
        if step == "download":  # killed mid-download: a .part, never a finished-looking file
            assert [p.suffix for p in (state / "downloads").iterdir()] == [".part"]

        agent.start()  # no hook this time
        agent.wait_ready(90)
        h = agent.health()
        assert h["version"] in ("1.0.0", "1.1.0"), h
        out = agent.predict(digits_data.x_test[:1])
        assert out["version"] in ("1.0.0", "1.1.0") and len(out["outputs"]["label"]) == 1

        if step == "trial":
            # The start that died counts against the trial: rolled back, and that generation is not
            # retried (a model that crashes the agent would crash it again) until a new one arrives.
            wait_until(lambda: "crashed during trial" in (state / "agent.log").read_text(errors="replace"), 30,
                       what="the crashed trial to be rolled back")
            assert (state / "failed_generation").read_text().strip() == "1"
            assert agent.health()["version"] == "1.0.0"
            cp.desire(device, 2, model="digits", version="1.1.0",
                      artifact=artifact_for(bundles["1.1.0"], bundle_server.base_url + "/digits-1.1.0.ewb"))
        wait_until(lambda: agent.health()["version"] == "1.1.0", 120, what=f"{device} to converge to 1.1.0")
        out = agent.predict(digits_data.x_test[:4])
        assert out["version"] == "1.1.0"
        assert np.asarray(out["outputs"]["label"]).shape == (4,)
        rec = Slots(state / "slots").record()
        assert rec is not None and rec.version == "1.1.0" and Slots(state / "slots").trial() is None
        assert not list((state / "downloads").glob("*")) if (state / "downloads").exists() else True
    finally:
        agent.stop()
        cp.close()
