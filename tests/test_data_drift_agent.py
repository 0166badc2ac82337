"""Drift detection on a real agent: a signed bundle with reference statistics, real ONNX Runtime, the real outbox."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgewise.bundle import build_bundle, read_manifest, verify_bundle
from edgewise.cli.main import app
from edgewise.protocol import Event, Summary, Telemetry, decode
from test_agent_support import make_agent


@pytest.fixture(scope="module")
def drift_bundle(tmp_path_factory, digits_models, digits_data, signer):
    """digits 3.0.0 (logreg) with reference statistics from the first half of the held-out digits."""
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    path = tmp_path_factory.mktemp("drift") / "digits-3.0.0.ewb"
    build_bundle(digits_models["logreg"], name="digits", version="3.0.0", signer=signer, out=path, labels=LABELS,
                 preprocessing=PREPROCESSING, reference=digits_data.x_test[:270])
    return path


def _records(agent, cls):
    return [r for r in (decode(rec.payload) for rec in agent.outbox.peek(10000)) if isinstance(r, cls)]


def _serve(agent, x, order):
    for i in order:
        agent.predict(x[i : i + 1])


def test_a_bundle_carries_signed_reference_statistics_computed_from_held_out_data(drift_bundle, trusted):
    vb = verify_bundle(drift_bundle, trusted)
    ref = vb.manifest.reference
    assert ref is not None and ref.samples == 270 and ref.input == "x" and ref.output == "probabilities"
    assert ref.num_features == 64 and sum(ref.classes) == 270 and max(ref.feature_mean) <= 1.0  # after preprocessing (/16)


def test_bundle_create_with_reference_npz_stores_statistics_and_inspect_shows_them(tmp_path, digits_models, digits_data, keys_dir):
    runner = CliRunner()
    model = tmp_path / "m.onnx"
    model.write_bytes(digits_models["logreg"])
    np.savez(tmp_path / "held_out.npz", x=digits_data.x_test[:100])
    (tmp_path / "prep.json").write_text('{"steps": [{"op": "cast", "dtype": "float32"}, {"op": "scale", "factor": 0.0625}]}')
    out = tmp_path / "d.ewb"
    r = runner.invoke(app, ["bundle", "create", str(model), "--name", "digits", "--version", "1.0.0", "--key", str(keys_dir / "signing.key"),
                            "--preprocessing", str(tmp_path / "prep.json"), "--reference", str(tmp_path / "held_out.npz"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest, _ = read_manifest(out)
    assert manifest.reference is not None and manifest.reference.samples == 100
    r = runner.invoke(app, ["bundle", "inspect", str(out)])
    assert "100 held-out samples" in r.output
    np.savez(tmp_path / "wrong.npz", a=np.zeros((30, 64), np.float32), b=np.zeros((30, 64), np.float32))
    r = runner.invoke(app, ["bundle", "create", str(model), "--name", "digits", "--version", "1.0.1", "--key", str(keys_dir / "signing.key"),
                            "--reference", str(tmp_path / "wrong.npz"), "--out", str(tmp_path / "e.ewb")])
    assert r.exit_code != 0 and "input" in r.output and "'x'" in r.output


def test_shifted_inputs_raise_a_drift_event_and_recovery_ends_it(tmp_path, keys_dir, drift_bundle, digits_data):
    agent = make_agent(tmp_path / "a", keys_dir, device_id="drift-events-1")
    try:
        assert agent.install(drift_bundle).result == "ok"
        x = digits_data.x_test[270:]
        rng = np.random.default_rng(0)
        _serve(agent, x, np.concatenate([rng.permutation(len(x)), rng.permutation(len(x))]))
        assert not [e for e in _records(agent, Event) if e.kind == "drift"], "no drift on unshifted data"
        agent.request_adaptation = lambda trigger="drift": False  # adaptation has its own tests (test_data_adapt*)
        _serve(agent, np.clip(x * 0.5, 0, 16).astype(np.float32), rng.permutation(len(x)))  # gain halved
        starts = [e for e in _records(agent, Event) if e.kind == "drift"]
        assert len(starts) == 1 and starts[0].severity == "warning" and starts[0].detail["active"] is True
        assert starts[0].detail["model"] == "digits" and starts[0].detail["version"] == "3.0.0" and starts[0].detail["fired"]
        assert agent.health()["drift"]["active"] is True
        _serve(agent, x, np.concatenate([rng.permutation(len(x)), rng.permutation(len(x))]))
        events = [e for e in _records(agent, Event) if e.kind == "drift"]
        assert [e.detail["active"] for e in events] == [True, False] and events[1].severity == "info"
    finally:
        agent.stop()


@pytest.mark.parametrize("mode, cls", [("full", Telemetry), ("summary", Summary)])
def test_telemetry_carries_the_drift_score_and_a_sketch_of_the_interval(tmp_path, keys_dir, drift_bundle, digits_data, mode, cls):
    agent = make_agent(tmp_path / "t", keys_dir, device_id=f"drift-tel-{mode}", bandwidth_mode=mode, telemetry_interval_s=3600)
    try:
        assert agent.install(drift_bundle).result == "ok"
        x = digits_data.x_test[270:]
        agent.predict(x[:50])  # one batch of 50 rows
        _serve(agent, x, range(50, 120))
        record = agent.telemetry_tick()
        assert isinstance(record, cls) and record.drift_score is not None and record.drift_score >= 0
        sk = record.sketch
        ref = agent.current_model.manifest.reference
        assert sk is not None and sk.n == 120 and sk.model == "digits" and sk.version == "3.0.0" and sk.reference == ref.fingerprint
        assert set(sk.features) == set(ref.feature_names)
        assert all(sum(c) == 120 and len(c) == len(h.counts) for c, h in zip((sk.features[n] for n in ref.feature_names), ref.features))
        assert sum(sk.confidence_hist) == 120 and sum(sk.classes.values()) == 120
        assert agent.telemetry_tick().sketch is None  # counts are per interval: an idle one sends no sketch
        stored = _records(agent, cls)
        assert stored and stored[0].sketch is not None and stored[0].sketch.n == 120  # through the outbox's codec
    finally:
        agent.stop()


def test_a_model_without_reference_statistics_reports_no_drift_fields(tmp_path, keys_dir, bundles, digits_data):
    agent = make_agent(tmp_path / "n", keys_dir, device_id="drift-none-1")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        agent.predict(digits_data.x_test[:5])
        record = agent.telemetry_tick()
        assert record.drift_score is None and record.sketch is None and agent.health()["drift"] is None
    finally:
        agent.stop()


def test_sketch_counts_non_finite_features_as_missing(digits_data):
    from edgewise.agent.drift import DriftObserver
    from edgewise.data.reference import compute_reference

    x = (digits_data.x_test / 16).astype(np.float32)
    obs = DriftObserver(compute_reference(x[:200]), block=8)
    bad = x[200:210].copy()
    bad[:, 5] = np.nan
    obs.observe(None, {"x": bad}, {})
    counts = obs.take_sketch_counts()
    assert counts["n"] == 10 and counts["missing"][5] == 10 and sum(counts["features"][5]) == 0 and sum(counts["features"][4]) == 10
    assert json.dumps(counts)  # plain lists: ready for the wire


def test_drift_start_asks_for_adaptation_and_keeps_watching_an_adapted_model_of_the_same_bundle(tmp_path, keys_dir, drift_bundle, digits_data):
    agent = make_agent(tmp_path / "ad", keys_dir, device_id="drift-adapt-1")
    try:
        assert agent.install(drift_bundle).result == "ok"
        asked = []
        agent.request_adaptation = lambda trigger="drift": asked.append(trigger) or False  # the adaptation engineer's hook
        x = digits_data.x_test[270:]
        _serve(agent, x, range(len(x)))
        watching = agent.drift.observer
        _serve(agent, np.clip(x * 0.5, 0, 16).astype(np.float32), range(len(x)))
        assert asked == ["drift"] and agent.drift.active
        from edgewise.agent.runtime import LoadedModel

        same = agent.current_model
        twin = LoadedModel(same._session, same.manifest, sha256=same.sha256)  # what an adapted model looks like to the watcher
        agent._activate(twin)
        agent.predict(x[:1])
        assert agent.drift.observer is watching and agent.drift.active  # state carried over, no second start event
    finally:
        agent.stop()


def test_sketch_counts_equal_a_recount_on_the_reference_bins_even_when_the_caller_reuses_its_buffer(digits_data):
    from edgewise.agent.drift import DriftObserver
    from edgewise.data.reference import compute_reference

    x = (digits_data.x_test / 16).astype(np.float32)
    ref = compute_reference(x[:200])
    obs = DriftObserver(ref, block=16)
    buf = np.empty((1, x.shape[1]), dtype=np.float32)
    rows = x[200:300]
    for row in rows:  # one reused input buffer, as a streaming caller would do
        buf[0] = row
        obs.observe(None, {"x": buf}, {})
    buf[0] = 0.0
    counts = obs.take_sketch_counts()
    for f, h in enumerate(ref.features):
        expected = np.bincount(np.searchsorted(np.asarray(h.cuts), rows[:, f].astype(np.float64), side="right"), minlength=len(h.counts))
        assert counts["features"][f] == expected.tolist()
    assert counts["n"] == len(rows)


def test_drift_and_adaptation_settings_in_the_config_reach_the_detectors_and_the_adapter(tmp_path, keys_dir, drift_bundle, digits_data):
    agent = make_agent(tmp_path / "cfg", keys_dir, device_id="drift-config", drift_block=8, drift_window=50, drift_input_test="ks",
                       drift_scalar_detector="none", adapt_window=32, adapt_min_samples=16, adapt_method="coral", adapt_on_drift=False)
    try:
        assert agent.install(drift_bundle).result == "ok"
        agent.predict(digits_data.x_test[:3])
        obs = agent.drift.observer
        assert obs.block == 8 and obs.window == 50 and type(obs.input_detector).__name__ == "KS" and not obs.scalar_scores
        s = agent.adapter.settings
        assert (s.window, s.min_samples, s.method) == (32, 16, "coral") and agent.adapt_on_drift is False
    finally:
        agent.stop()


def test_drift_off_in_the_config_watches_nothing(tmp_path, keys_dir, drift_bundle, digits_data):
    agent = make_agent(tmp_path / "off", keys_dir, device_id="drift-off", drift=False)
    try:
        assert agent.install(drift_bundle).result == "ok"
        agent.predict(digits_data.x_test[:3])
        assert agent.drift.observer is None and agent.drift not in agent.observers
    finally:
        agent.stop()
