"""End to end: an agent process with capture on, a real broker, a real control plane; the export is what the device served."""

from __future__ import annotations

import io
import uuid

import httpx
import numpy as np
import pytest

from conftest import free_port
from edgewise.agent.config import write_toml
from edgewise.lab.demo_model import PREPROCESSING
from edgewise.sim.demo import upload_bundle
from edgewise.sim.fleet import AgentProcess, http_json, wait_until


@pytest.fixture()
def control_plane(tmp_path, keys_dir, bundles, request):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    broker_url = request.getfixturevalue("mosquitto") if getattr(request, "param", None) == "mosquitto" else None
    settings = ServerSettings(
        data_dir=tmp_path / "control", port=free_port(), embedded_broker_port=free_port(),
        broker_url=broker_url, trust=[keys_dir / "signing.pub"],
    )
    cp = ControlPlane(settings)
    cp.start()
    upload_bundle(cp.url, bundles["1.0.0"], cp.admin_token)
    yield cp
    cp.stop()


@pytest.mark.parametrize("control_plane", [None, "mosquitto"], indirect=True, ids=["embedded-amqtt", "mosquitto"])
def test_samples_captured_by_an_agent_arrive_once_and_export_as_the_arrays_it_served(control_plane, tmp_path, keys_dir, digits_data):
    cp = control_plane
    dev = f"cap-e2e-{uuid.uuid4().hex[:6]}"
    state = tmp_path / dev
    state.mkdir()
    # capture every row at random (fraction 1), nothing else: the export must hold exactly what was served
    write_toml(state / "config.toml", {"device_id": dev, "capture": True, "capture_random_fraction": 1.0,
                                       "capture_low_confidence": 0.0, "capture_drift_window": 0, "capture_seed": 3})
    a = AgentProcess(device_id=dev, state_dir=state, server_url=cp.url, broker_url=cp.settings.effective_broker_url,
                     trust=keys_dir / "signing.pub", telemetry_interval_s=0.5, device_token=cp.issue_device_token(dev))
    a.start()
    try:
        a.wait_ready()
        wait_until(lambda: any(d["id"] == dev for d in http_json("GET", f"{cp.url}/api/v1/devices", token=cp.admin_token)),
                   30, what="the agent to register")
        http_json("POST", f"{cp.url}/api/v1/deployments", {"model": "digits", "version": "1.0.0", "device_id": dev},
                  token=cp.admin_token)
        wait_until(lambda: a.health().get("version") == "1.0.0", 60, what="1.0.0 on the device")
        x = digits_data.x_test[:12]
        for i in range(len(x)):
            a.predict(x[i : i + 1])
        a.predict(x[:3])  # a batch of 3: three samples
        served = PREPROCESSING.apply(np.concatenate([x, x[:3]])).astype(np.float32)

        def listed():
            rows = http_json("GET", f"{cp.url}/api/v1/samples?model=digits&version=1.0.0&device_id={dev}&limit=1000",
                             token=cp.admin_token)
            return rows if len(rows) >= 15 else None

        rows = wait_until(listed, 30, what="15 samples at the control plane")
        assert len(rows) == 15 and len({r["seq"] for r in rows}) == 15
        assert a.health()["capture"]["captured"]["random"] == 15
        r = httpx.get(f"{cp.url}/api/v1/models/digits/versions/1.0.0/samples/export",
                      headers={"Authorization": f"Bearer {cp.admin_token}"}, timeout=30)
        assert r.status_code == 200, r.text
        data = np.load(io.BytesIO(r.content))
        order = np.argsort(data["seq"])  # export order is (device, seq): the order the device captured them
        assert data["x:x"].dtype == np.float32 and data["x:x"].shape == (15, 64)
        np.testing.assert_array_equal(data["x:x"][order], served)
        assert set(data["device_id"]) == {dev} and set(data["reason"]) == {"random"}
        # the CLI writes the same data set
        from typer.testing import CliRunner

        from edgewise.cli.main import app

        out = tmp_path / "export" / "digits.npz"
        res = CliRunner().invoke(app, ["samples", "export", "digits", "1.0.0", "--out", str(out), "--server", cp.url,
                                       "--api-token", cp.admin_token])
        assert res.exit_code == 0, res.output
        np.testing.assert_array_equal(np.load(out)["x:x"], data["x:x"])
        # a device may not list or export samples (only its operators and viewers)
        dev_token = (state / "keys" / "device.token").read_text().strip()
        denied = httpx.get(f"{cp.url}/api/v1/devices/{dev}/samples", headers={"Authorization": f"Bearer {dev_token}"})
        assert denied.status_code == 403
    finally:
        a.stop()
