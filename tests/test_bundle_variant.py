"""A variant bundle carries the figures and tuned settings of the optimize run that made it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgewise.bundle import BundleError, read_manifest
from edgewise.bundle.variant import variant_from_report
from edgewise.cli.main import app


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    from edgewise.lab.optimize import load_npz, optimize
    from test_lab_optimize_models import digits_mlp

    mlp = digits_mlp()
    out = tmp_path_factory.mktemp("opt")
    result = optimize(mlp.model, load_npz(mlp.calib)[0], mlp.eval, "x86-gateway", out_dir=out,
                      recipes=["fp32", "int8-qdq-minmax"], max_accuracy_drop=0.05)
    return result, out


def test_variant_figures_and_runtime_come_from_the_matching_candidate(optimized):
    result, out = optimized
    int8 = next(c for c in result.candidates if c.name == "int8-qdq-minmax")
    variant, runtime = variant_from_report(out, int8.path)
    assert variant.name == "int8-qdq-minmax" and variant.profile == "x86-gateway"
    assert variant.figures["size_bytes"] == int8.size_bytes
    assert variant.figures["metric"] == "accuracy" and variant.base_model_sha256
    assert runtime is not None and runtime.intra_op_threads >= 1


def test_a_model_that_is_not_in_the_report_is_refused_naming_the_variants(optimized, tmp_path):
    _, out = optimized
    stranger = tmp_path / "other.onnx"
    stranger.write_bytes(b"not one of them")
    with pytest.raises(BundleError, match="int8-qdq-minmax"):
        variant_from_report(out, stranger)


def test_bundle_create_with_variant_of_writes_variant_and_runtime_into_the_manifest(optimized, tmp_path):
    result, out = optimized
    runner = CliRunner()
    runner.invoke(app, ["keys", "generate", "--out", str(tmp_path / "k.key")])
    chosen = result.chosen
    r = runner.invoke(app, ["bundle", "create", str(chosen.path), "--name", "digits", "--version", "3.0.0",
                            "--key", str(tmp_path / "k.key"), "--variant-of", str(out),
                            "--out", str(tmp_path / "v.ewb"), "--json"])
    assert r.exit_code == 0, r.output
    manifest, _ = read_manifest(tmp_path / "v.ewb")
    assert manifest.variant.name == chosen.name and manifest.variant.figures["chosen"] is True
    assert manifest.runtime.graph_optimization_level.startswith("ORT_")
    assert json.loads(r.stdout)["manifest"]["variant"]["profile"] == "x86-gateway"
