"""`compress` (prune -> distill -> export -> optimize) from Python and from the command line."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgewise.cli import compress_cmd  # noqa: E402
from edgewise.lab.compress import CompressError, compress, resolve_model  # noqa: E402
from edgewise.lab.datasets import load_digits_images  # noqa: E402
from edgewise.lab.torch_models import DigitsCNN, train  # noqa: E402

# The commands as `edgewise` registers them (cli/main.py); a local app keeps these tests independent of it.
app = typer.Typer()
app.command("compress")(compress_cmd.compress)
app.command("prune")(compress_cmd.prune)
app.command("distill")(compress_cmd.distill)
runner = CliRunner()
FAST = ["--train-epochs", "2", "--epochs", "1", "--latency-runs", "6"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_digits():
    return load_digits_images().subset(400, 150)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, small_digits):
    return small_digits.save_npz(tmp_path_factory.mktemp("data") / "digits32.npz")


@pytest.fixture(scope="module")
def trained(small_digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    train(model, small_digits, epochs=3, lr=3e-3)
    return model.eval()


def test_compress_without_optimize_reports_every_stage(tmp_path, trained, small_digits):
    report = compress(trained, small_digits, out_dir=tmp_path, name="digits-cnn", ratio=0.5, epochs=2,
                      optimize=False, latency_runs=6)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in doc["stages"]] == ["original", "pruned", "distilled"]
    for s in doc["stages"]:
        assert set(s) >= {"params", "macs", "size_bytes", "latency_ms", "accuracy", "onnx"}
        assert s["latency_ms"] > 0 and 0 <= s["accuracy"] <= 1
    orig, pruned, distilled = report.stages
    assert pruned.params < 0.5 * orig.params and pruned.macs < 0.5 * orig.macs and pruned.size_bytes < orig.size_bytes
    assert distilled.params == pruned.params and distilled.accuracy >= pruned.accuracy
    assert doc["prune"]["channels_after"]["features.0"] == 8 and doc["optimize"] is None
    assert doc["final_onnx"].endswith("distilled.onnx") and (tmp_path / "compressed.pth").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| original |" in md and "| distilled |" in md
    # The saved torch model reloads into a fresh factory with the pruned shapes.
    import torch_pruning as tp

    reloaded = DigitsCNN()
    tp.load_state_dict(reloaded, torch.load(tmp_path / "compressed.pth", weights_only=False))
    assert reloaded.features[0].out_channels == 8


def test_compress_with_fine_tuning_and_a_mac_target(tmp_path, trained, small_digits):
    report = compress(trained, small_digits, out_dir=tmp_path, target_macs=0.5, steps=2, recover="finetune",
                      epochs=1, optimize=False, latency_runs=3)
    assert [s.stage for s in report.stages] == ["original", "pruned", "fine-tuned"]
    assert report.stage("pruned").macs <= 0.5 * report.stage("original").macs
    with pytest.raises(CompressError, match="recover"):
        compress(trained, small_digits, out_dir=tmp_path, recover="magic", optimize=False)
    with pytest.raises(CompressError, match="between 0 and 1"):
        compress(trained, small_digits, out_dir=tmp_path, ratio=1.2, optimize=False)


def test_the_full_chain_with_the_optimizer(tmp_path, trained, small_digits):
    opt = pytest.importorskip("edgewise.lab.optimize", reason="edgewise.lab.optimize has not landed")
    if "x86-gateway" not in opt.list_profiles():
        pytest.skip("no x86-gateway profile to optimize for")
    report = compress(trained, small_digits, out_dir=tmp_path, ratio=0.5, epochs=2, profile="x86-gateway",
                      recipes=["int8-qdq-minmax"], max_accuracy_drop=0.05, latency_runs=6)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["optimize"] is not None and doc["settings"]["profile"] == "x86-gateway"
    stages = [s.stage for s in report.stages]
    assert stages[:3] == ["original", "pruned", "distilled"]
    if doc["optimize"]["ok"]:
        assert stages[-1] == "optimized"
        final = report.stage("optimized")
        assert doc["final_onnx"] == final.onnx and final.params == report.stage("distilled").params
        assert final.accuracy >= report.stage("distilled").accuracy - 0.06
    else:  # nothing within budget: the FP32 model stays the final one, and the report says why
        assert stages[-1] == "distilled" and any("optimize chose nothing" in n for n in report.notes)


def test_optimize_without_a_profile_says_which_exist(tmp_path, trained, small_digits):
    pytest.importorskip("edgewise.lab.optimize", reason="edgewise.lab.optimize has not landed")
    with pytest.raises(CompressError, match="--profile .*x86-gateway"):
        compress(trained, small_digits, out_dir=tmp_path, epochs=0, latency_runs=1)


# --------------------------------------------------------------------------- command line


def test_cli_compress_json_parses_and_writes_the_report(tmp_path, small_npz):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", "--model", "digits-cnn", "--data", str(small_npz), *FAST, "--skip-optimize",
                            "--out-dir", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "compress" and [s["stage"] for s in doc["stages"]] == ["original", "pruned", "distilled"]
    assert json.loads((out / "report.json").read_text())["stages"] == doc["stages"]
    # Without --json: a table on stdout.
    r = runner.invoke(app, ["compress", "--data", str(small_npz), *FAST, "--skip-optimize", "--out-dir", str(out),
                            "--recover", "finetune"])
    assert r.exit_code == 0, r.output
    assert "fine-tuned" in r.stdout and "report.md" in r.stdout


def test_cli_prune_compares_with_unstructured_zeros(tmp_path, small_npz):
    r = runner.invoke(app, ["prune", "--model", "digits-cnn", "--data", str(small_npz), *FAST, "--ratio", "0.5",
                            "--unstructured", "0.5", "--out-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    by = {s["stage"]: s for s in doc["stages"]}
    assert list(by) == ["original", "pruned", "fine-tuned", "sparse-50%"]
    assert by["fine-tuned"]["params"] < by["original"]["params"]
    assert by["sparse-50%"]["params"] == by["original"]["params"] and by["sparse-50%"]["size_bytes"] == by["original"]["size_bytes"]
    assert doc["unstructured"]["sparsity"]["total"] == pytest.approx(0.5, abs=0.01)
    assert doc["unstructured"]["zlib_bytes"] < doc["unstructured"]["zlib_bytes_original"]


def test_cli_distill_reports_student_with_and_without_teacher(tmp_path, small_npz):
    r = runner.invoke(app, ["distill", "--model", "digits-cnn", "--data", str(small_npz), "--train-epochs", "2",
                            "--epochs", "1", "--student-width", "0.25", "--latency-runs", "3", "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["stage"] for s in doc["stages"]] == ["teacher", "student", "student-distilled"]
    assert doc["stages"][1]["params"] == doc["stages"][2]["params"] < doc["stages"][0]["params"] / 4
    assert doc["distill"]["student_plain"]["accuracy"] == pytest.approx(doc["stages"][1]["accuracy"], abs=0.01)


def test_cli_takes_a_users_module_and_data(tmp_path, monkeypatch, small_npz):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(width=1.0):
            c = max(1, int(8 * width))
            return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                 nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(2 * c, 10))

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = runner.invoke(app, ["prune", "--module", "my_models:tiny", "--data", str(small_npz), *FAST,
                            "-o", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["name"] == "tiny" and doc["stages"][-1]["params"] < doc["stages"][0]["params"]
    r = runner.invoke(app, ["distill", "--module", "my_models:tiny", "--data", str(small_npz), "--train-epochs", "1",
                            "--epochs", "1", "--latency-runs", "3", "-o", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prune", "--module", "my_models:not_a_model", "--data", str(small_npz)])
    assert r.exit_code == 1 and "not a torch nn.Module" in r.output


@pytest.mark.parametrize("args, message", [
    (["compress", "--ratio", "1.5"], "--ratio must be between 0 and 1"),
    (["compress", "--ratio", "0"], "--ratio must be between 0 and 1"),
    (["prune", "--unstructured", "1"], "--unstructured must be between 0 and 1"),
    (["prune", "--importance", "taylor"], "--importance must be l1 or l2"),
    (["compress", "--recover", "magic"], "--recover must be"),
    (["distill", "--alpha", "2"], "--alpha must be between 0 and 1"),
    (["prune", "--model", "resnet-9000"], "unknown model 'resnet-9000'"),
    (["prune", "--module", "nocolon"], "pkg.module:factory"),
    (["prune", "--module", "no_such_module_xyz:f", "--data", "{npz}"], "cannot import 'no_such_module_xyz'"),
    (["prune", "--module", "json:loads"], "--module needs --data"),
    (["prune", "--model", "digits-cnn", "--module", "a:b"], "one of --model"),
    (["prune", "--model", "digits-mlp", "--data", "{npz}", "--train-epochs", "1"], "cannot take inputs of shape (1, 32, 32)"),
    (["prune", "--data", "{wrong}"], "lacks x_train, y_train, x_test, y_test"),
    (["prune", "--data", "{missing}"], "no such file"),
])
def test_cli_bad_input_gives_a_clear_error(tmp_path, small_npz, args, message):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 1, 32, 32), np.float32), labels=np.zeros(4, np.int64))
    subst = {"{npz}": str(small_npz), "{wrong}": str(wrong), "{missing}": str(tmp_path / "missing.npz")}
    r = runner.invoke(app, [subst.get(a, a) for a in args] + ["-o", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert message in r.output


def test_resolve_model_loads_weights_instead_of_training(tmp_path, trained, small_npz):
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    res = resolve_model("digits-cnn", data=small_npz, weights=tmp_path / "w.pt")
    assert res.training is None
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), trained.state_dict().values(), strict=True))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(CompressError, match="cannot load weights"):
        resolve_model("digits-cnn", data=small_npz, weights=tmp_path / "bad.pt")
