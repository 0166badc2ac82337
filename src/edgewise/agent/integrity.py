"""Run only trusted code: at start, check the installed agent files against the signed release they came from.

An env installed by :mod:`edgewise.agent.selfupdate` keeps its signed release
(``envs/<v>/release.ewr``) beside the unpacked package (``envs/<v>/site/``). At
every start the agent verifies that release's signature with the device's trust
store, then compares every file under ``site/`` with the manifest: a modified,
missing or extra file (an added ``.py``, a planted ``__pycache__/*.pyc``, a
``.pth``, a symlink) fails the check and the agent refuses to run.

What this does *not* protect against: code that runs before the check (the
interpreter, its site-packages, this module when an attacker can edit it) and an
attacker with root on the running device, who can patch the checker itself. That
is why it is one link of a chain that starts in the boot ROM (see
docs/security-agent-updates.md).

Modes (``integrity_check`` in the agent config):

- ``auto`` (default): check when the agent runs from an installed env; from a
  source checkout or the OS image's site-packages there is no release to check
  against, and the agent says so in its log;
- ``require``: like auto, but refuse to run when there is no release to check;
- ``off``: skip (a developer patching an env on purpose).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..security.keys import TrustedKeys

IntegrityMode = Literal["auto", "require", "off"]
MAX_LISTED = 10


class IntegrityError(RuntimeError):
    """The installed agent code does not match its signed release; ``problems`` lists each file."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class IntegrityReport:
    env: Path | None  # None: not running from an installed env
    version: str | None = None
    key_id: str | None = None
    files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def running_env() -> Path | None:
    """The env this process's ``edgewise`` package was loaded from, or None (source checkout, OS image)."""
    import edgewise

    site = Path(edgewise.__file__).resolve().parent.parent
    from .selfupdate import RELEASE_FILE, SITE

    if site.name == SITE and (site.parent / RELEASE_FILE).is_file():
        return site.parent
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_env(env: Path, trusted: TrustedKeys) -> IntegrityReport:
    """Verify ``env/release.ewr`` and compare every file under ``env/site`` with its manifest."""
    from ..bundle.errors import BundleError
    from ..bundle.release import verify_release
    from .selfupdate import RELEASE_FILE, SITE

    env = Path(env)
    try:
        release = verify_release(env / RELEASE_FILE, trusted)
    except (BundleError, OSError) as exc:
        return IntegrityReport(env=env, problems=[f"release manifest: {exc}"])
    expected = release.manifest.files
    site = env / SITE
    seen: set[str] = set()
    problems: list[str] = []
    for dirpath, dirs, names in os.walk(site, followlinks=False):
        rel_dir = os.path.relpath(dirpath, site)
        for d in list(dirs):
            if os.path.islink(os.path.join(dirpath, d)):
                problems.append(f"extra: {os.path.normpath(os.path.join(rel_dir, d))} (symlink)")
                dirs.remove(d)
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.normpath(os.path.join(rel_dir, n)).replace(os.sep, "/")
            want = expected.get(rel)
            if want is None:
                problems.append(f"extra: {rel}")
            elif os.path.islink(full) or not os.path.isfile(full):
                problems.append(f"modified: {rel} (not a regular file)")
            elif os.path.getsize(full) != want.size or _sha256(full) != want.sha256:
                problems.append(f"modified: {rel}")
            seen.add(rel)
    problems.extend(f"missing: {rel}" for rel in sorted(set(expected) - seen))
    return IntegrityReport(env=env, version=release.version, key_id=release.key_id, files=len(expected), problems=sorted(problems))


def check_running(trusted: TrustedKeys, mode: IntegrityMode = "auto") -> IntegrityReport | None:
    """The start-time check; raises :class:`IntegrityError` when the code must not run, None when skipped."""
    if mode == "off":
        return None
    env = running_env()
    if env is None:
        if mode == "require":
            raise IntegrityError(
                "integrity_check = require, but this agent does not run from an installed release env "
                "(source checkout or OS image); install a signed release or set integrity_check = auto",
                ["no release manifest beside the running package"],
            )
        return None
    report = check_env(env, trusted)
    if not report.ok:
        listed = "; ".join(report.problems[:MAX_LISTED]) + (f"; and {len(report.problems) - MAX_LISTED} more" if len(report.problems) > MAX_LISTED else "")
        raise IntegrityError(
            f"the agent code in {env} does not match its signed release ({listed}); refusing to run it. "
            "Reinstall the release (or let the launcher fall back to the previous env) and find out who changed it",
            report.problems,
        )
    return report
