"""Safe model updates: golden inputs, trial across agent starts, rollback protection, disk budget."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgewise.bundle.build as build_mod
from edgewise.bundle import GOLDEN_MEMBER, build_bundle, read_manifest, verify_bundle
from edgewise.lab.demo_model import LABELS, PREPROCESSING
from edgewise.protocol import ArtifactRef, DesiredState, decode
from edgewise.security import load_signer
from test_agent_support import BundleServer, artifact_for, make_agent


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


def _events(agent, kind="update"):
    return [e for e in (decode(r.payload) for r in agent.outbox.peek(200) if r.kind == "event") if e.kind == kind]


def _state(agent) -> dict:
    return json.loads((agent.state_dir / "slots" / "state.json").read_text())


def _build(tmp_path, keys_dir, model, version, **kw):
    path = tmp_path / f"digits-{version}.ewb"
    build_bundle(model, name="digits", version=version, signer=load_signer(keys_dir / "signing.key"), out=path,
                 labels=LABELS, preprocessing=PREPROCESSING, **kw)
    return path


# -- golden inputs ---------------------------------------------------------------------------------


def test_golden_inputs_and_outputs_are_a_signed_member_and_builds_stay_byte_identical(tmp_path, keys_dir, digits_models, digits_data, trusted):
    golden = ({"x": digits_data.x_test[:16]}, 1e-3, 250.0)
    a = _build(tmp_path / "a", keys_dir, digits_models["mlp"], "2.0.0", golden=golden, created_at=None)
    manifest, _ = read_manifest(a)
    assert manifest.golden is not None
    assert (manifest.golden.member, manifest.golden.samples, manifest.golden.atol, manifest.golden.latency_budget_ms) == (GOLDEN_MEMBER, 16, 1e-3, 250.0)
    assert GOLDEN_MEMBER in manifest.members  # hashed in the manifest, so covered by the signature
    vb = verify_bundle(a, trusted)
    import io

    with np.load(io.BytesIO(vb.read_member(GOLDEN_MEMBER)), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["inputs/x", "outputs/label", "outputs/probabilities"]
        assert npz["outputs/probabilities"].shape == (16, 1, 10)
    from datetime import datetime, timezone

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    b1 = _build(tmp_path / "b1", keys_dir, digits_models["mlp"], "2.0.0", golden=golden, created_at=t)
    b2 = _build(tmp_path / "b2", keys_dir, digits_models["mlp"], "2.0.0", golden=golden, created_at=t)
    assert b1.read_bytes() == b2.read_bytes()


def test_golden_inputs_that_do_not_fit_the_model_are_refused_at_build_time(tmp_path, keys_dir, digits_models, digits_data):
    from edgewise.bundle import BundleError

    with pytest.raises(BundleError, match="golden inputs"):
        _build(tmp_path, keys_dir, digits_models["mlp"], "2.0.0", golden=({"pixels": digits_data.x_test[:4]},))
    with pytest.raises(BundleError, match="dtype float64"):
        _build(tmp_path, keys_dir, digits_models["mlp"], "2.0.0", golden=({"x": digits_data.x_test[:4].astype(np.float64)},))


def test_cli_bundle_create_takes_golden_inputs(tmp_path, keys_dir, digits_models, digits_data):
    from typer.testing import CliRunner

    from edgewise.cli.main import app

    model = tmp_path / "m.onnx"
    model.write_bytes(digits_models["logreg"])
    npz = tmp_path / "golden.npz"
    np.savez(npz, x=digits_data.x_test[:8])
    out = tmp_path / "d.ewb"
    r = CliRunner().invoke(app, ["bundle", "create", str(model), "--name", "digits", "--version", "3.0.0", "--key",
                                 str(keys_dir / "signing.key"), "--out", str(out), "--golden", str(npz),
                                 "--golden-atol", "0.01", "--golden-latency-ms", "500"])
    assert r.exit_code == 0, r.output
    g = read_manifest(out)[0].golden
    assert (g.samples, g.atol, g.latency_budget_ms) == (8, 0.01, 500.0)


def test_a_model_whose_outputs_differ_from_its_golden_outputs_is_rolled_back(tmp_path, keys_dir, bundles, digits_models, digits_data, monkeypatch):
    real = build_mod.golden_outputs

    def skewed(*a, **kw):
        arrays = real(*a, **kw)
        arrays["outputs/probabilities"] = arrays["outputs/probabilities"] + 0.25  # what another runtime might give
        return arrays

    monkeypatch.setattr(build_mod, "golden_outputs", skewed)
    bad = _build(tmp_path, keys_dir, digits_models["mlp"], "2.0.0", golden=({"x": digits_data.x_test[:16]},))
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="gold-1")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        result = agent.install(bad)
        assert result.result == "rolled_back"
        assert "output 'probabilities'" in result.reason and "differs from the build-time result by up to 0.25" in result.reason
        assert agent.model_version == "1.0.0" and agent.slots.record().version == "1.0.0"
        assert agent.slots.trial() is None
        assert agent.predict(digits_data.x_test[:2])["label"].shape == (2,)
    finally:
        agent.stop()


def test_a_model_over_its_latency_budget_is_rolled_back(tmp_path, keys_dir, bundles, digits_models, digits_data):
    slow = _build(tmp_path, keys_dir, digits_models["mlp"], "2.0.0", golden=({"x": digits_data.x_test[:16]}, None, 1e-6))
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="gold-2")
    try:
        assert agent.install(bundles["1.0.0"]).result == "ok"
        result = agent.install(slow)
        assert result.result == "rolled_back"
        assert "median latency" in result.reason and "exceeds the budget of 1e-06 ms" in result.reason
        assert agent.model_version == "1.0.0"
    finally:
        agent.stop()


# -- trial across agent starts ---------------------------------------------------------------------


def test_with_two_trial_starts_a_new_model_commits_only_after_a_restart(tmp_path, keys_dir, bundles, digits_data):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="trial-1", trial_starts=2)
    agent.install(bundles["1.0.0"])
    agent.stop()
    agent = make_agent(state, keys_dir, device_id="trial-1", trial_starts=2)
    agent.start()
    assert agent.slots.record().version == "1.0.0"  # the first model went through its trial too
    result = agent.install(bundles["1.1.0"])
    assert result.result == "ok" and "on trial" in result.reason
    assert agent.model_version == "1.1.0"  # serving the model on trial
    assert _state(agent)["trial"]["version"] == "1.1.0" and _state(agent)["trial"]["starts"] == 1
    assert agent.slots.record().version == "1.0.0"  # not committed yet
    agent.stop()
    again = make_agent(state, keys_dir, trial_starts=2)
    try:
        again.start()
        assert again.model_version == "1.1.0"
        assert again.slots.record().version == "1.1.0" and again.slots.trial() is None
        assert again.slots.previous().version == "1.0.0"
        assert any("committed after passing its trial on 2 start(s)" in e.message for e in _events(again))
        assert again.predict(digits_data.x_test[:2])["label"].shape == (2,)
    finally:
        again.stop()


def test_a_crash_during_trial_rolls_back_to_the_committed_model_on_the_next_start(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="trial-2")  # trial_starts=1: commits at once
    assert agent.install(bundles["1.0.0"]).result == "ok"
    assert agent.slots.record().version == "1.0.0" and agent.slots.trial() is None
    agent.stop()
    agent = make_agent(state, keys_dir, trial_starts=2)
    assert agent.install(bundles["1.1.0"]).result == "ok"
    agent.slots.trial_started()  # the next start began trying 1.1.0 ... and the device died
    agent.stop()
    assert _state(agent)["trial"]["starts"] == 2 and _state(agent)["trial"]["passed"] == 1
    again = make_agent(state, keys_dir, trial_starts=2)
    try:
        again.start()
        assert again.model_version == "1.0.0"
        assert again.slots.record().version == "1.0.0" and again.slots.trial() is None
        ev = [e for e in _events(again) if e.detail.get("result") == "rolled_back"]
        assert ev and "crashed during trial" in ev[-1].detail["reason"] and "1.1.0" in ev[-1].message
        assert again.health()["last_update"]["result"] == "rolled_back"
    finally:
        again.stop()


def test_a_crash_during_the_install_trial_is_rolled_back_even_with_one_trial_start(tmp_path, keys_dir, bundles):
    state = tmp_path / "dev"
    agent = make_agent(state, keys_dir, device_id="trial-3")
    agent.install(bundles["1.0.0"])
    vb = verify_bundle(bundles["1.1.0"], agent.updater.trusted())
    staged = agent.slots.stage(bundles["1.1.0"])
    agent.slots.begin_trial(staged, vb.manifest, vb.sha256)  # power cut while the new model loads
    agent.stop()
    again = make_agent(state, keys_dir)
    try:
        again.start()
        assert again.model_version == "1.0.0"
        assert any("crashed during trial" in (e.detail.get("reason") or "") for e in _events(again))
    finally:
        again.stop()


# -- rollback protection ---------------------------------------------------------------------------


@pytest.fixture
def on_110(tmp_path, keys_dir, bundles, server):
    a = make_agent(tmp_path / "dev", keys_dir, device_id="upd-1", server_url=server.base_url)
    assert a.install(bundles["1.0.0"]).result == "ok"
    assert a.install(bundles["1.1.0"]).result == "ok"
    yield a
    a.stop()


def test_a_version_below_the_highest_committed_is_refused_naming_both(on_110, server, bundles):
    url = server.add("/old.ewb", bundles["1.0.0"].read_bytes())
    desired = DesiredState(device_id="upd-1", generation=1, model="digits", version="1.0.0", artifact=artifact_for(bundles["1.0.0"], url))
    result, retryable = on_110.updater.attempt(desired)
    assert result.result == "failed" and not retryable
    assert "refusing digits 1.0.0" in result.reason and "digits 1.1.0, the highest version" in result.reason
    assert "rollback: true" in result.reason
    assert server.requests == []  # refused before downloading anything
    assert on_110.model_version == "1.1.0"
    assert on_110.install(bundles["1.0.0"]).result == "failed"  # the offline path refuses it too


def test_an_explicit_rollback_installs_the_lower_version_and_keeps_the_high_water_mark(on_110, server, bundles):
    url = server.add("/old.ewb", bundles["1.0.0"].read_bytes())
    desired = DesiredState(device_id="upd-1", generation=2, model="digits", version="1.0.0",
                           artifact=artifact_for(bundles["1.0.0"], url), rollback=True)
    result, _ = on_110.updater.attempt(desired)
    assert result.result == "ok" and on_110.model_version == "1.0.0"
    assert on_110.slots.record().version == "1.0.0"
    assert on_110.slots.highest_committed("digits") == "1.1.0"
    # back on 1.0.0, going up again is fine; a lower version without the flag is still refused
    assert on_110.updater.install(bundles["1.1.0"]).result == "ok"


# -- disk budget -----------------------------------------------------------------------------------


def test_an_artifact_that_does_not_fit_on_the_disk_is_refused_before_downloading(on_110, server, bundles):
    free = shutil.disk_usage(on_110.state_dir).free
    url = server.add("/huge.ewb", b"x")
    art = ArtifactRef(url=url, sha256="0" * 64, size=free + 1)
    result, retryable = on_110.updater.attempt(DesiredState(device_id="upd-1", generation=3, model="digits", version="2.0.0", artifact=art))
    assert result.result == "failed" and retryable
    assert "not enough disk space for digits 2.0.0" in result.reason and "bytes free" in result.reason
    assert f"download {free + 1:,}" in result.reason
    assert server.requests == []
    assert on_110.model_version == "1.1.0"


def test_leftovers_beside_the_slots_are_removed_after_a_commit(tmp_path, keys_dir, bundles):
    agent = make_agent(tmp_path / "dev", keys_dir, device_id="disk-2")
    try:
        agent.install(bundles["1.0.0"])
        slots = agent.state_dir / "slots"
        stale = [slots / "a" / "bundle.ewb.part", slots / "b" / "old-0.9.ewb", slots / "digits-0.1.0.ewb",
                 agent.state_dir / "downloads" / ("f" * 64 + ".ewb.part")]
        for p in stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"junk" * 100)
        assert agent.install(bundles["1.1.0"]).result == "ok"
        assert not [p for p in stale if p.exists()]
        assert (slots / "a" / "bundle.ewb").exists() and (slots / "b" / "bundle.ewb").exists()
        assert (slots / "state.json").exists()
    finally:
        agent.stop()
