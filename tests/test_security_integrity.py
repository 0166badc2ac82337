"""The start-time integrity check, in process: an installed env against its signed release, file by file."""

from __future__ import annotations

import os
import shutil

import pytest

from edgewise import __version__
from edgewise.agent.integrity import IntegrityError, check_env, check_running, running_env
from edgewise.agent.selfupdate import AgentReleases
from edgewise.security import TrustedKeys


@pytest.fixture()
def env(tmp_path, releases, keys_dir):  # noqa: F811
    trusted = TrustedKeys.from_paths([keys_dir / "signing.pub"])
    r = AgentReleases(tmp_path / "releases")
    r.install(releases["current"], trusted, running_version=__version__)
    e = r.env_dir(__version__)
    for d, dirs, _ in os.walk(e):
        os.chmod(d, 0o755)
    return e, trusted


def test_untouched_env_passes_every_file(env):
    e, trusted = env
    report = check_env(e, trusted)
    assert report.ok and report.version == __version__ and report.files > 100


@pytest.mark.parametrize("change, problem", [
    ("modify", "modified: edgewise/agent/updater.py"),
    ("delete", "missing: edgewise/agent/updater.py"),
    ("add-py", "extra: edgewise/agent/backdoor.py"),
    ("add-pyc", "extra: edgewise/agent/__pycache__/updater.cpython-311.pyc"),
    ("add-pth", "extra: zz-autorun.pth"),
    ("symlink", "modified: edgewise/agent/updater.py (not a regular file)"),
])
def test_modified_missing_or_extra_file_is_named(env, change, problem):
    e, trusted = env
    site = e / "site"
    target = site / "edgewise" / "agent" / "updater.py"
    os.chmod(target, 0o644)
    if change == "modify":
        target.write_bytes(target.read_bytes().replace(b"def ", b"def  ", 1))
    elif change == "delete":
        target.unlink()
    elif change == "add-py":
        (target.parent / "backdoor.py").write_text("import os\n")
    elif change == "add-pyc":
        (target.parent / "__pycache__").mkdir()
        (target.parent / "__pycache__" / "updater.cpython-311.pyc").write_bytes(b"\0" * 16)
    elif change == "add-pth":
        (site / "zz-autorun.pth").write_text("import os\n")
    else:
        shutil.copy(target, e / "elsewhere.py")
        target.unlink()
        target.symlink_to(e / "elsewhere.py")
    report = check_env(e, trusted)
    assert problem in report.problems


def test_release_manifest_signed_by_an_untrusted_key_fails_the_check(env, keys_dir):
    e, _ = env
    report = check_env(e, TrustedKeys.from_paths([keys_dir / "other.pub"]))
    assert not report.ok and "not trusted" in report.problems[0]


def test_source_checkout_is_not_checked_in_auto_mode_and_refused_in_require_mode(trusted):
    assert running_env() is None  # the tests run from the checkout
    assert check_running(trusted, "auto") is None
    assert check_running(trusted, "off") is None
    with pytest.raises(IntegrityError, match="integrity_check = require"):
        check_running(trusted, "require")
