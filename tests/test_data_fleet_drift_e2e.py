"""Fleet drift end to end: real paho clients (device-token logins) publish Summaries carrying drift sketches
through the embedded broker into a real control plane, which flags the broken device or the shifted fleet
over HTTP and records the alert.

The bundle is a real signed digits bundle with reference statistics from held-out digits; each device
counts its own digits (after the bundle's preprocessing) on the reference's bins and the model's
confidence and classes from a real ONNX Runtime session, as the agent does.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest

from conftest import free_port
from edgewise import protocol as p
from edgewise.bundle.build import build_bundle
from edgewise.data.reference import class_probabilities, confidence_entropy, summary_features
from edgewise.sim.fleet import http_json, wait_until

DEVICES = 10
PER_WINDOW = 120


def make_drift_bundle(out_dir: Path, model_bytes: bytes, version: str, digits_data, signer):
    """(path, manifest) of a signed digits bundle with reference statistics from 300 held-out digits."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    path = out_dir / f"digits-{version}.ewb"
    manifest = build_bundle(model_bytes, name="digits", version=version, signer=signer, out=path,
                            labels=LABELS, preprocessing=PREPROCESSING, reference=digits_data.x_test[:300])
    assert manifest.reference is not None
    return path, manifest


@pytest.fixture(scope="module")
def drift_bundle(tmp_path_factory, digits_models, digits_data, signer):
    """digits 1.0.0 (logreg) with reference statistics."""
    return make_drift_bundle(tmp_path_factory.mktemp("drift-bundle"), digits_models["logreg"], "1.0.0", digits_data, signer)


@pytest.fixture()
def control_plane(tmp_path, keys_dir, drift_bundle):
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    cp = ControlPlane(ServerSettings(data_dir=tmp_path / "cp", port=free_port(), embedded_broker_port=free_port(),
                                     trust=[keys_dir / "signing.pub"]))
    cp.start()
    cp.services.ingest.drift.interval_s = 0.0  # judge the fleet on every sketch (a test cannot wait 10 s)
    upload(cp, drift_bundle[0])
    yield cp
    cp.stop()


def upload(cp, path: Path) -> None:
    req = urllib.request.Request(f"{cp.url}/api/v1/models", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/octet-stream",
                                          "Authorization": f"Bearer {cp.admin_token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 201), r.read()


class Device:
    """What an agent does for drift: preprocess, infer, count on the reference bins."""

    def __init__(self, manifest, model_bytes: bytes) -> None:
        self.manifest = manifest
        self.model, self.version = manifest.name, manifest.version
        self.ref = manifest.reference
        self.sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    def sketch(self, raw: np.ndarray, t0: float) -> tuple[p.DriftSketch, int]:
        x = self.manifest.preprocessing.apply(raw)
        feats = summary_features(x, self.ref.feature_map)
        counts = {}
        for j, (name, h) in enumerate(zip(self.ref.feature_names, self.ref.features)):
            k = np.searchsorted(np.asarray(h.cuts), feats[:, j], side="right")
            counts[name] = np.bincount(k, minlength=len(h.cuts) + 1).tolist()
        outs = self.sess.run(None, {self.sess.get_inputs()[0].name: x})
        probs = class_probabilities(next(o for o in outs if getattr(o, "ndim", 0) == 2))
        top, conf, _ = confidence_entropy(probs)
        k = np.searchsorted(np.asarray(self.ref.confidence.cuts), conf, side="right")
        return p.DriftSketch(
            model=self.model, version=self.version, reference=self.ref.fingerprint, window_start=t0, window_end=t0 + 10,
            n=len(x), features=counts, confidence_hist=np.bincount(k, minlength=len(self.ref.confidence.counts)).tolist(),
            classes={str(c): int(n) for c, n in enumerate(np.bincount(top)) if n},
        ), len(x)


def publish(cp, device_id: str, summaries: list[p.Summary], *, twice: bool = False) -> None:
    """Log in with the device's token, say what we run and publish the summaries in one batch."""
    host, port = cp.settings.effective_broker_url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(device_id, cp.issue_device_token(device_id))
    c.connect(host, int(port))
    c.loop_start()
    try:
        state = p.DeviceState(device_id=device_id, status="online", model=summaries[0].model,
                              version=summaries[0].version, ts=time.time())
        c.publish(p.topics.state(device_id), p.encode(state), qos=1, retain=True).wait_for_publish(5)
        payload = p.encode(p.Batch(device_id=device_id, items=summaries))
        for _ in range(2 if twice else 1):  # at-least-once delivery: the same batch again must not count twice
            c.publish(p.topics.telemetry(device_id), payload, qos=1).wait_for_publish(5)
    finally:
        c.disconnect()  # before loop_stop: wakes the network loop at once instead of after its 1 s select
        c.loop_stop()


def run_fleet(cp, drift_bundle, digits_models, digits_data, *, shift=None, shifted=(), prefix: str) -> list[str]:
    """Every device sends two windows of its own (held-in) digits; the ``shifted`` ones through ``shift``."""
    _, manifest = drift_bundle
    dev = Device(manifest, digits_models["logreg" if manifest.version == "1.0.0" else "mlp"])
    pool = np.asarray(digits_data.x_train)
    rng = np.random.default_rng(7)
    ids = [f"{prefix}-{i}" for i in range(DEVICES)]
    now = time.time()
    for i, device_id in enumerate(ids):
        summaries = []
        for w in range(2):
            raw = pool[rng.choice(len(pool), PER_WINDOW)].astype(np.float32)
            if i in shifted:
                raw = shift(raw)
            sk, n = dev.sketch(raw, now - 30 + 10 * w)
            summaries.append(p.Summary(device_id=device_id, seq=w, ts=now - 20 + 10 * w, model=dev.model, version=dev.version,
                                       window_s=10.0, inferences=n, predictions=n, sketch=sk))
        publish(cp, device_id, summaries, twice=(i == 0))
    return ids


def dead_columns(raw: np.ndarray) -> np.ndarray:
    return np.where(np.arange(64) % 8 < 3, 0.0, raw).astype(np.float32)


def api(cp, path: str):
    return http_json("GET", f"{cp.url}/api/v1{path}", token=cp.admin_token)


def test_a_device_with_a_dead_sensor_is_flagged_as_peer_outlier_and_alerted_over_mqtt(
        control_plane, drift_bundle, digits_models, digits_data):
    cp = control_plane
    ids = run_fleet(cp, drift_bundle, digits_models, digits_data, shift=dead_columns, shifted={3}, prefix="fdo")
    wait_until(lambda: len(api(cp, "/drift/digits/1.0.0")["devices"]) == DEVICES, 20, what="all sketches stored")
    report = api(cp, "/drift/digits/1.0.0")
    assert report["status"] == "ok" and report["outliers"] == [ids[3]]
    by_id = {d["device_id"]: d for d in report["devices"]}
    assert by_id[ids[0]]["n"] == 2 * PER_WINDOW  # the batch published twice was counted once
    assert by_id[ids[3]]["status"] == "peer_outlier" and by_id[ids[3]]["peers"]["score"] > 1
    assert {d["status"] for k, d in by_id.items() if k != ids[3]} == {"ok"}
    assert [o["device_id"] for o in api(cp, "/drift/outliers")] == [ids[3]]
    assert api(cp, f"/devices/{ids[3]}/drift")[0]["status"] == "peer_outlier"
    wait_until(lambda: api(cp, "/alerts?status=open"), 10, what="the drift alert")
    alerts = api(cp, "/alerts?status=open")
    assert [(a["kind"], a["device_id"]) for a in alerts] == [("drift.peer_outlier", ids[3])]


def test_the_whole_fleet_shifted_is_a_fleet_wide_shift_with_no_device_flagged_over_mqtt(
        control_plane, drift_bundle, digits_models, digits_data):
    cp = control_plane
    gain = lambda raw: np.clip(raw * 1.6, 0, 16).astype(np.float32)  # noqa: E731  every camera got brighter
    run_fleet(cp, drift_bundle, digits_models, digits_data, shift=gain, shifted=set(range(DEVICES)), prefix="fds")
    wait_until(lambda: len(api(cp, "/drift/digits/1.0.0")["devices"]) == DEVICES, 20, what="all sketches stored")
    report = api(cp, "/drift/digits/1.0.0")
    assert report["status"] == "fleet_shift" and report["outliers"] == []
    assert {d["status"] for d in report["devices"]} == {"drifted"}
    assert api(cp, "/drift/outliers") == []
    overview = api(cp, "/drift")
    assert [(o["model"], o["version"], o["status"]) for o in overview] == [("digits", "1.0.0", "fleet_shift")]
    wait_until(lambda: api(cp, "/alerts?status=open&kind=drift."), 10, what="the fleet shift alert")
    assert [(a["kind"], a["device_id"]) for a in api(cp, "/alerts?status=open")] == [("drift.fleet_shift", None)]


def test_a_viewer_can_read_drift_but_a_device_cannot_read_the_fleets(control_plane):
    cp = control_plane
    with pytest.raises(Exception, match="403"):
        http_json("GET", f"{cp.url}/api/v1/drift", token=cp.issue_device_token("fd-nosy"))
    with pytest.raises(Exception, match="404.*no drift sketches"):
        api(cp, "/drift/digits/9.9.9")
    assert json.dumps(api(cp, "/drift")) == "[]"


def test_real_agents_sketches_flag_the_device_with_a_dead_sensor(control_plane, drift_bundle, digits_data, keys_dir, tmp_path):
    """Six real agents (edgewise.agent's own sketch code) serve digits; their outbox batches are
    published with their device tokens; the control plane flags the one whose sensor lost three columns."""
    from edgewise.agent.outbox import batch_payload
    from test_agent_support import make_agent

    cp = control_plane
    pool = np.asarray(digits_data.x_train, dtype=np.float32)
    rng = np.random.default_rng(11)
    ids = [f"fda-{i}" for i in range(6)]
    host, port = cp.settings.effective_broker_url.removeprefix("mqtt://").split(":")
    for i, device_id in enumerate(ids):
        agent = make_agent(tmp_path / device_id, keys_dir, device_id=device_id, bandwidth_mode="summary")
        try:
            assert agent.install(drift_bundle[0]).result == "ok"
            for _ in range(6):
                x = pool[rng.choice(len(pool), 40)]
                agent.predict(dead_columns(x) if i == 2 else x)
            summary = agent.telemetry_tick()
            assert summary.sketch is not None and summary.sketch.n == 240
            payloads = [r.payload for r in agent.outbox.peek(1000) if r.kind == "telemetry"]
        finally:
            agent.stop()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        c.username_pw_set(device_id, cp.issue_device_token(device_id))
        c.connect(host, int(port))
        c.loop_start()
        c.publish(p.topics.telemetry(device_id), batch_payload(device_id, payloads), qos=1).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
    wait_until(lambda: len(api(cp, "/drift/digits/1.0.0")["devices"]) == len(ids), 20, what="all sketches stored")
    report = api(cp, "/drift/digits/1.0.0")
    assert report["outliers"] == [ids[2]] and report["status"] == "ok"
