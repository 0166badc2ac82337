"""`edgewise keys` and `edgewise bundle` as a user runs them."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgewise.cli.main import app

runner = CliRunner()


@pytest.fixture()
def model_file(tmp_path, digits_models):
    path = tmp_path / "digits.onnx"
    path.write_bytes(digits_models["logreg"])
    return path


@pytest.fixture()
def keypair(tmp_path):
    r = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path / "signing.key"), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_create_then_verify_succeeds(tmp_path, model_file, keypair):
    out = tmp_path / "digits-1.0.0.ewb"
    r = runner.invoke(app, ["bundle", "create", str(model_file), "--name", "digits", "--version", "1.0.0",
                            "--key", keypair["private_key"], "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bundle", "verify", str(out), "--trust", keypair["public_key"], "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True


def test_inspect_prints_a_table_and_json(tmp_path, model_file, keypair):
    out = tmp_path / "b.ewb"
    runner.invoke(app, ["bundle", "create", str(model_file), "--name", "digits", "--version", "2.0.0",
                        "--key", keypair["private_key"], "--out", str(out)])
    r = runner.invoke(app, ["bundle", "inspect", str(out)])
    assert r.exit_code == 0 and "digits" in r.stdout and "float32" in r.stdout
    r = runner.invoke(app, ["bundle", "inspect", str(out), "--json"])
    assert json.loads(r.stdout)["manifest"]["version"] == "2.0.0"


def test_verify_with_wrong_key_exits_1_naming_the_key(tmp_path, model_file, keypair):
    out = tmp_path / "b.ewb"
    runner.invoke(app, ["bundle", "create", str(model_file), "--name", "d", "--version", "1.0.0",
                        "--key", keypair["private_key"], "--out", str(out)])
    runner.invoke(app, ["keys", "generate", "--out", str(tmp_path / "other.key")])
    r = runner.invoke(app, ["bundle", "verify", str(out), "--trust", str(tmp_path / "other.pub"), "--json"])
    assert r.exit_code == 1
    assert keypair["key_id"] in json.loads(r.stdout)["error"]


def test_create_with_bad_version_is_a_clear_error(tmp_path, model_file, keypair):
    r = runner.invoke(app, ["bundle", "create", str(model_file), "--name", "d", "--version", "latest",
                            "--key", keypair["private_key"], "--out", str(tmp_path / "b.ewb")])
    assert r.exit_code == 1 and "semantic version" in r.stderr


def test_the_installed_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "edgewise.cli.main", "version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip()
