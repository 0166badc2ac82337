"""`edgewise release PIPELINE.yaml`: spec validation, gates, dry run, publish to a real control plane.

The model is the demo's logistic regression on scikit-learn digits and only the FP32 recipe is
built (one hardware class), so each pipeline run takes a few seconds.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from conftest import free_port
from edgewise.cli.main import app
from edgewise.cli.pipeline_cmd import EXIT_GATE, EXIT_INVALID, EXIT_PUBLISH, EXIT_ROLLOUT_START
from edgewise.lab import pipeline as pl


def pipeline_dict(keys_dir: Path, name: str, **sections: Any) -> dict[str, Any]:
    """A tiny pipeline: demo logreg, fp32 only, one hardware class, 8 golden samples from the held-out set."""
    spec: dict[str, Any] = {
        "model": {"name": name, "demo": "digits-logreg"},
        "dataset": {"name": "digits", "calibration_samples": 32, "eval_samples": 200},
        "hardware": {"classes": ["x86-gateway"]},
        "optimize": {"recipes": [], "max_accuracy_drop": 0.02},
        "gates": {"min_accuracy": 0.8, "max_latency_ms": 1000, "golden": {"from_holdout": 8}},
        "bundle": {"version": "1.2.0", "key": str(keys_dir / "signing.key"), "reference_samples": 64},
    }
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec


def write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["release", *args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def cp(tmp_path_factory, keys_dir):
    """A real control plane (HTTP API, registry, embedded broker) that trusts signing.pub."""
    from edgewise.control.server import ControlPlane
    from edgewise.control.settings import ServerSettings

    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("release-pipeline") / "control", port=free_port(),
        embedded_broker_port=free_port(), trust=[keys_dir / "signing.pub"],
    )
    plane = ControlPlane(settings)
    plane.start()
    yield plane
    plane.stop()


def _get(cp, path: str) -> httpx.Response:
    return httpx.get(cp.url + path, headers={"Authorization": f"Bearer {cp.admin_token}"}, timeout=30)


# ---------------------------------------------------------------------------------------------- spec


def test_spec_errors_name_every_bad_field(keys_dir):
    spec = pipeline_dict(keys_dir, "digits")
    spec["model"]["onx"] = "typo.onnx"
    spec["bundle"]["version"] = "1.2"
    spec["rollout"] = {"tag": "lab", "waves": [{"name": "canary"}]}
    with pytest.raises(pl.PipelineSpecError) as exc:
        pl.parse_spec(spec)
    msg = str(exc.value)
    assert "model.onx: unknown field" in msg
    assert "bundle.version" in msg
    assert "give exactly one of percent or devices" in msg


def test_a_bad_version_override_is_refused_naming_the_option(tmp_path, keys_dir):
    res = run_cli(str(write(tmp_path, pipeline_dict(keys_dir, "digits"))), "--dry-run", "--version", "v1.x")
    assert res.exit_code == EXIT_INVALID and "--version: version" in res.output


def test_spec_needs_exactly_one_model_source(keys_dir):
    spec = pipeline_dict(keys_dir, "digits")
    spec["model"]["onnx"] = "model.onnx"
    with pytest.raises(pl.PipelineSpecError, match="exactly one of model.onnx"):
        pl.parse_spec(spec)


def test_an_unknown_hardware_class_fails_before_any_training(tmp_path, keys_dir):
    res = run_cli(str(write(tmp_path, pipeline_dict(keys_dir, "digits", hardware={"classes": ["toaster"]}))), "--dry-run",
                  "--out", str(tmp_path / "out"))
    assert res.exit_code == EXIT_INVALID
    assert "hardware class 'toaster' has no lab profile" in res.output
    assert not (tmp_path / "out" / "model").exists()


def test_rollout_body_follows_the_rollouts_api_contract(keys_dir):
    spec = pl.parse_spec(pipeline_dict(keys_dir, "digits", rollout={
        "group": "lab-x86", "rate_limit_per_min": 30,
        "waves": [{"name": "canary", "percent": 10, "min_reporting": 1, "soak_s": 0, "error": "crashes > 0"},
                  {"name": "all", "percent": 100, "approval": True}],
    }))
    body = pl.rollout_body(spec)
    assert body == {
        "model": "digits", "version": "1.2.0", "group": "lab-x86", "rate_limit_per_min": 30, "start_paused": False,
        "waves": [{"name": "canary", "percent": 10, "min_reporting": 1, "soak_s": 0, "error": "crashes > 0"},
                  {"name": "all", "percent": 100, "approval": True}],
    }


# ---------------------------------------------------------------------------------------------- runs


def test_dry_run_signs_a_verifiable_variant_with_golden_inputs_and_publishes_nothing(tmp_path, keys_dir):
    from edgewise.bundle import verify_bundle
    from edgewise.security import TrustedKeys

    # a server that is not running: a dry run must not talk to it
    spec = pipeline_dict(keys_dir, "digits", control={"server": f"http://127.0.0.1:{free_port()}"},
                         hardware={"classes": ["gw-v2"], "profiles": {"gw-v2": "x86-gateway"}})
    res = run_cli(str(write(tmp_path, spec)), "--dry-run", "--version", "1.2.1", "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["outcome"], summary["stage"], summary["published"]) == ("ok", "bundle", False)
    (target,) = summary["targets"]
    assert (target["hardware_class"], target["profile"]) == ("gw-v2", "x86-gateway") and target["gates_passed"]
    assert {g["gate"] for g in target["gates"]} == {"accuracy_drop", "min_accuracy", "latency", "golden"}
    v = verify_bundle(Path(target["bundle"]), TrustedKeys.from_paths([keys_dir / "signing.pub"]))
    m = v.manifest
    # the control plane matches variant.profile against a device's hardware class; the lab profile stays in the figures
    assert (m.name, m.version, m.variant.name, m.variant.profile) == ("digits", "1.2.1", "gw-v2", "gw-v2")
    assert m.variant.figures["lab_profile"] == "x86-gateway" and m.variant.recipe == "fp32"
    assert m.golden is not None and m.golden.samples == 8
    assert json.loads((tmp_path / "out" / "release.json").read_text())["outcome"] == "ok"


def test_a_failed_gate_exits_3_and_publishes_nothing(tmp_path, keys_dir, cp):
    name = f"gate-{uuid.uuid4().hex[:6]}"
    spec = pipeline_dict(keys_dir, name, gates={"min_accuracy": 0.999})
    res = run_cli(str(write(tmp_path, spec)), "--server", cp.url, "--token", cp.admin_token, "--until", "publish",
                  "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == EXIT_GATE
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "gate_failed" and summary["published"] is False
    assert "min_accuracy" in summary["error"] and "nothing published" in summary["error"]
    assert not (tmp_path / "out" / "bundles").exists()
    assert _get(cp, f"/api/v1/models/{name}").status_code == 404


def test_publish_uploads_the_signed_variant_to_the_registry(tmp_path, keys_dir, cp, monkeypatch):
    name = f"pub-{uuid.uuid4().hex[:6]}"
    spec = pipeline_dict(keys_dir, name, control={"server": cp.url})
    monkeypatch.setenv("EDGEWISE_TOKEN", cp.admin_token)
    res = run_cli(str(write(tmp_path, spec)), "--until", "publish", "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["outcome"], summary["stage"], summary["published"]) == ("ok", "publish", True)
    assert summary["targets"][0]["published"]["status"] == "stored"
    stored = _get(cp, f"/api/v1/models/{name}/1.2.0")
    assert stored.status_code == 200
    manifest = stored.json()["manifest"]
    assert manifest["variant"]["name"] == "x86-gateway" and manifest["golden"]["samples"] == 8

    again = run_cli(str(write(tmp_path, spec)), "--until", "publish", "--out", str(tmp_path / "again"))
    assert again.exit_code == EXIT_PUBLISH and "already in the registry" in again.output and "bump" in again.output
    assert not (tmp_path / "again" / "model").exists()  # refused before any training


def test_an_upload_the_registry_refuses_exits_4(tmp_path, keys_dir, cp):
    name = f"refused-{uuid.uuid4().hex[:6]}"
    spec = pipeline_dict(keys_dir, name, bundle={"key": str(keys_dir / "other.key")})  # a key the server does not trust
    res = run_cli(str(write(tmp_path, spec)), "--server", cp.url, "--token", cp.admin_token, "--until", "publish",
                  "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == EXIT_PUBLISH
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "publish_failed" and "422" in summary["error"]
    assert _get(cp, f"/api/v1/models/{name}").status_code == 404


def test_publishing_without_a_token_is_refused_before_any_work(tmp_path, keys_dir, cp, monkeypatch):
    for env in pl.TOKEN_ENVS:
        monkeypatch.delenv(env, raising=False)
    res = run_cli(str(write(tmp_path, pipeline_dict(keys_dir, "digits"))), "--server", cp.url, "--until", "publish",
                  "--out", str(tmp_path / "out"))
    assert res.exit_code == EXIT_INVALID and "EDGEWISE_TOKEN" in res.output
    assert not (tmp_path / "out").exists()


def test_the_documented_pipeline_and_workflow_are_valid():
    docs = Path(__file__).resolve().parent.parent / "docs"
    text = (docs / "release-pipeline.md").read_text()
    block = text.split("`PIPELINE.yaml` (every section", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = pl.parse_spec(yaml.safe_load(block))
    assert spec.model.demo == "digits-logreg" and [w.name for w in spec.rollout.waves] == ["canary", "ten", "half", "all"]
    assert pl.rollout_body(spec)["group"] == "canary-sites"
    workflow = yaml.safe_load((docs / "examples" / "edgewise-release.github-workflow.yml").read_text())
    steps = " ".join(s.get("run", "") for s in workflow["jobs"]["release"]["steps"])
    assert "edgewise release PIPELINE.yaml --dry-run" in steps and "--json > release.json" in steps


def test_a_token_the_control_plane_refuses_exits_4_before_any_work(tmp_path, keys_dir, cp):
    res = run_cli(str(write(tmp_path, pipeline_dict(keys_dir, "digits"))), "--server", cp.url, "--token", "not-a-token",
                  "--until", "publish", "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == EXIT_PUBLISH
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "publish_failed" and "401" in summary["error"] and "EDGEWISE_TOKEN" in summary["error"]
    assert not (tmp_path / "out" / "model").exists()


def test_a_rollout_to_an_unknown_group_exits_7_before_any_work(tmp_path, keys_dir, cp):
    spec = pipeline_dict(keys_dir, f"nogroup-{uuid.uuid4().hex[:6]}",
                         rollout={"group": "no-such-group", "waves": [{"name": "all", "percent": 100}]})
    res = run_cli(str(write(tmp_path, spec)), "--server", cp.url, "--token", cp.admin_token, "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == EXIT_ROLLOUT_START
    summary = json.loads(res.stdout)
    assert summary["outcome"] == "rollout_start_failed" and "no-such-group" in summary["error"]
    assert not (tmp_path / "out" / "model").exists()


def test_an_onnx_file_with_npz_data_and_wrong_golden_labels_fails_the_golden_gate(tmp_path, keys_dir, digits_models, digits_data):
    """The common real-world shape: your ONNX file, your data (.npz, raw), your preprocessing (JSON), your golden inputs."""
    import numpy as np

    from edgewise.lab.demo_model import PREPROCESSING

    (tmp_path / "model.onnx").write_bytes(digits_models["mlp"])
    (tmp_path / "prep.json").write_text(PREPROCESSING.model_dump_json())
    d = digits_data
    np.savez(tmp_path / "data.npz", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    np.savez(tmp_path / "golden.npz", x=d.x_test[:6], y=(d.y_test[:6] + 1) % 10)  # every label wrong on purpose
    spec = pipeline_dict(keys_dir, "digits", model={"name": "digits", "onnx": "model.onnx", "preprocessing": "prep.json"},
                         dataset={"npz": "data.npz", "calibration_samples": 32, "eval_samples": 200},
                         gates={"golden": {"npz": "golden.npz"}})
    del spec["model"]["demo"]
    del spec["dataset"]["name"]
    res = run_cli(str(write(tmp_path, spec)), "--dry-run", "--out", str(tmp_path / "out"), "--json")
    assert res.exit_code == EXIT_GATE
    summary = json.loads(res.stdout)
    checks = {g["gate"]: g for g in summary["targets"][0]["gates"]}
    assert checks["accuracy_drop"]["passed"] and checks["min_accuracy"]["passed"]  # the model itself is fine
    golden = checks["golden"]
    assert not golden["passed"] and golden["value"] >= 5 and "vs their labels" in golden["detail"]
    assert "golden" in summary["error"] and not (tmp_path / "out" / "bundles").exists()
