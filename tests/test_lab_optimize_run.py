"""End to end: `optimize` on real models with real ONNX Runtime; the choice checked against the report's own figures.

No wall-clock speedup is asserted: which variant wins depends on the machine (that is
the point of measuring); benchmarks hold the figures.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_lab_optimize_models import cnn, invoke_optimize, mlp  # noqa: F401 - session fixtures

from edgewise.lab.optimize import load_npz, load_profile, optimize
from edgewise.lab.optimize.data import CalibrationSet, ModelIO, bind_inputs
from edgewise.lab.optimize.optimizer import TIE_TOLERANCE
from edgewise.lab.optimize.recipes import DEFAULT_RECIPES, get_recipe


@pytest.fixture(scope="module")
def local_profile(tmp_path_factory):
    f = tmp_path_factory.mktemp("profile") / "local.yaml"
    f.write_text("name: local\narch: x86_64\nthreads: 2\nram_budget_mb: 2048\nisa: [avx2]\nbatch_size: 4\n")
    return load_profile(f)


@pytest.fixture(scope="module")
def full_run(cnn, local_profile, tmp_path_factory):  # noqa: F811
    """All default recipes on the CNN, eval with labels (accuracy), 1-point budget."""
    seen = []
    out = tmp_path_factory.mktemp("full")
    res = optimize(
        cnn.model, load_npz(cnn.calib)[0], cnn.eval, local_profile, max_accuracy_drop=0.01, out_dir=out,
        progress=lambda msg, done, total: seen.append((msg, done, total)),
    )
    return res, out, seen


def test_chosen_is_the_fastest_within_budget_per_the_report(full_run):
    res, out, _ = full_run
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and res.ok
    cands = {c["name"]: c for c in report["candidates"]}
    within = {n: c for n, c in cands.items() if c["status"] == "ok" and c["within_budget"]}
    chosen = cands[report["chosen"]]
    assert chosen["within_budget"] and chosen["drop"] <= 0.01
    fastest = min(c["latency_ms"]["batch_1"]["median_ms"] for c in within.values())
    chosen_ms = chosen["latency_ms"]["batch_1"]["median_ms"]
    assert chosen_ms <= fastest * (1 + TIE_TOLERANCE) + 1e-12
    assert chosen_ms <= cands["fp32"]["latency_ms"]["batch_1"]["median_ms"]  # never slower than FP32
    assert res.chosen is not None and res.chosen.name == report["chosen"] and res.baseline.name == "fp32"
    assert report["runtime"] == res.chosen.runtime.to_runtime()
    assert set(report["runtime"]) >= {"intra_op_threads", "inter_op_threads", "graph_optimization_level", "execution_provider"}
    assert report["runtime"]["intra_op_threads"] <= 2


def test_report_lists_every_candidate_with_its_figures(full_run):
    res, out, progress = full_run
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == DEFAULT_RECIPES
    assert report["metric"]["name"] == "accuracy" and "0.01 = 1 point" in report["metric"]["units"]
    for c in report["candidates"]:
        if c["status"] != "ok":  # allowed (e.g. FP16 on a provider without kernels) but must say why
            assert c["reason"]
            continue
        assert c["size_bytes"] > 0 and (out / c["file"]).is_file()
        b1, b4 = c["latency_ms"]["batch_1"], c["latency_ms"]["batch_profile"]
        assert 0 < b1["median_ms"] <= b1["p95_ms"] and b1["runs"] >= 30 and b4["batch"] == 4
        assert 0.0 <= c["metric_value"] <= 1.0 and c["drop"] is not None
        assert c["peak_rss_mb"] > c["model_rss_mb"] > 0
        assert c["runtime"]["execution_provider"] == "CPUExecutionProvider"
        ort.InferenceSession(str(out / c["file"]), providers=["CPUExecutionProvider"])
    md = (out / "report.md").read_text()
    for c in report["candidates"]:
        assert f"| {c['name']} |" in md or f"| **{c['name']}** ✓ |" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert progress and progress[-1][1] == progress[-1][2]  # the bar ends full


def test_report_says_which_machine_measured(full_run):
    res, out, _ = full_run
    report = json.loads((out / "report.json").read_text())
    machine = report["machine"]
    assert machine["hostname"] == socket.gethostname() and machine["cpu_model"] and machine["isa"]
    assert report["measurement"]["machine"].startswith(socket.gethostname())
    assert report["measurement"]["measured_on_target"] == res.measured_on_target
    md = (out / "report.md").read_text()
    assert socket.gethostname() in md and "Measured by" in md


def test_mixed_precision_keeps_sensitive_nodes_in_fp32(cnn, local_profile, tmp_path):  # noqa: F811
    # Full INT8's worst-case error vs FP32, measured directly; a budget well below it makes full INT8 fail.
    sess = ort.InferenceSession(str(cnn.model), providers=["CPUExecutionProvider"])
    io = ModelIO.from_session(sess)
    calib = CalibrationSet(bind_inputs(load_npz(cnn.calib)[0], io), cache_dir=tmp_path / "c")
    q = get_recipe("int8-qdq-minmax").build(cnn.model, calib, local_profile, tmp_path / "q.onnx")
    x = load_npz(cnn.eval)[0]["image"]
    full_err = float(np.max(np.abs(
        ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0] - sess.run(None, {"image": x})[0]
    )))
    budget = full_err * 0.3
    res = optimize(
        cnn.model, cnn.calib, {"image": x}, local_profile, max_accuracy_drop=budget, out_dir=tmp_path / "out",
        metric="max_abs_err", recipes=["int8-qdq-minmax"],
    )
    by_name = {c.name: c for c in res.candidates}
    full, mixed = by_name["int8-qdq-minmax"], by_name["int8-qdq-minmax-mixed"]
    assert full.drop > budget and not full.within_budget
    assert mixed.fp32_nodes and mixed.drop <= budget and mixed.precision == "mixed"
    assert res.mixed_precision["fp32_nodes"] == mixed.fp32_nodes and res.mixed_precision["ranking"]
    g = onnx.load(str(mixed.path)).graph
    weights = {t.name: t.data_type for t in g.initializer}
    for node in (n for n in g.node if n.name in mixed.fp32_nodes and n.op_type in ("Conv", "Gemm")):
        assert weights[node.input[1]] == onnx.TensorProto.FLOAT
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mixed_precision"]["fp32_nodes"] == mixed.fp32_nodes
    assert "Nodes kept in FP32" in (tmp_path / "out" / "report.md").read_text()
    assert res.ok and res.chosen.drop <= budget


def test_cli_impossible_budget_exits_non_zero_naming_the_closest(mlp, tmp_path):  # noqa: F811
    r = invoke_optimize([
        str(mlp.model), "--calibration", str(mlp.calib), "--eval", str(mlp.eval), "--target", "x86-gateway",
        "--max-accuracy-drop", "-1", "--recipe", "int8-dynamic", "--out", str(tmp_path / "o"), "--json", "--no-measure-here",
    ])
    assert r.exit_code == 4, r.output
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["chosen"] is None and report["closest"] in ("fp32", "int8-dynamic")
    assert "no variant meets the budget" in r.stderr and f"closest: {report['closest']}" in r.stderr
    assert report["measured_on_target"] is False and "PROXY" in report["measurement"]["statement"]
    assert report["metric"]["name"] == "accuracy"
    assert (tmp_path / "o" / "report.json").is_file()  # the evidence is written even when nothing fits


def test_cli_table_output(mlp, tmp_path):  # noqa: F811
    r = invoke_optimize([
        str(mlp.model), "-c", str(mlp.calib), "-e", str(mlp.eval), "-t", "rpi5", "--recipe", "int8-qdq-minmax",
        "--max-accuracy-drop", "0.05", "--out", str(tmp_path / "o"),
    ])
    assert r.exit_code == 0, r.output
    assert "edgewise optimize → rpi5" in r.stdout and "PROXY" in r.stdout and "chosen:" in r.stdout
    assert "int8-qdq-minmax" in r.stdout and "fp32" in r.stdout


def test_cli_bad_data_is_a_clear_error(mlp, tmp_path):  # noqa: F811
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((3, 64), np.float32))
    r = invoke_optimize([
        str(mlp.model), "-c", str(tmp_path / "bad.npz"), "-e", str(mlp.eval), "-t", "rpi4", "--out", str(tmp_path / "o"),
    ])
    assert r.exit_code == 1 and "calibration: keys ['pixels'] do not match the model's inputs ['x']" in r.stderr
