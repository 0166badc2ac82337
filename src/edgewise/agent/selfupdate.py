"""The agent's own software as an update: signed releases installed beside the running one.

Layout under the releases root (default ``state_dir/releases``)::

    current.json            which env runs: {"current", "previous", "trial", "failed", "history"}
    envs/<version>/site/    the release's wheel, unpacked (read-only): the edgewise package + dist-info
    envs/<version>/release.ewr   the signed release it came from (checked at every start)
    staging/                half-installed envs; deleted on the next install or launch
    lock                    flock: one writer of current.json at a time (launcher, agent, CLI)

An env holds only the pure-Python ``edgewise`` package and runs on the base
interpreter with the base environment's dependencies (numpy, onnxruntime,
cryptography...): those come with the OS image, which has its own signed update
path; a release that needs other dependencies is refused at install.

``current.json`` is the only thing that says which env runs. It is replaced
atomically (:func:`edgewise.fsutil.atomic_write`), and an env is only moved
into ``envs/`` complete, so after a power cut at any step the device runs the
old env or the new one on trial, never half of one. ``current = null`` means the
agent shipped in the OS image (the factory env).

Trial rules (applied by :mod:`edgewise.agent.launcher`): a new env is on trial
for up to ``max_starts`` starts, each counted *before* it starts; it is
committed when its agent reports READY and stays up for the grace period. A
start that fails (exit, no READY in time) counts; an integrity failure rolls
back at once (tampered code does not heal); when the starts are used up the
launcher switches back to the previous env and records why. A rolled-back
version is remembered in ``failed`` and not installed again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from ..fsutil import atomic_write, fsync_dir

log = logging.getLogger("edgewise.agent.selfupdate")

STATE_FILE = "current.json"
ENVS = "envs"
STAGING = "staging"
SITE = "site"
RELEASE_FILE = "release.ewr"
HISTORY_KEEP = 20
DEFAULT_MAX_STARTS = 3
REPORTED_EVENTS = ("committed", "rolled_back", "fell_back")

EXIT_INTEGRITY = 3  # the agent refused to run modified code (sysexits has no better fit; 3 is ours)
EXIT_RESTART = 75  # the agent installed a release and asks its launcher to start it (EX_TEMPFAIL)

# Test-only fault injection, as in the model updater: EDGEWISE_FAULT_KILL_AT=<step> kills the process with
# SIGKILL at that step of a release install, as a power cut would.
FAULT_STEPS = ("release-stage", "release-switch")


def _fault_point(step: str) -> None:
    if os.environ.get("EDGEWISE_FAULT_KILL_AT") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class SelfUpdateError(RuntimeError):
    """A release that cannot be installed here (version, dependencies, disk); the message says why and what to do."""


@dataclass(frozen=True)
class Trial:
    version: str
    starts: int = 0
    max_starts: int = DEFAULT_MAX_STARTS
    installed_at: float = 0.0
    last_failure: str | None = None


@dataclass(frozen=True)
class ReleaseState:
    """The content of ``current.json``."""

    current: str | None = None  # None: the agent in the OS image
    previous: str | None = None
    trial: Trial | None = None
    failed: dict[str, str] = field(default_factory=dict)  # version -> why it was rolled back
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, obj: Any) -> "ReleaseState":
        if not isinstance(obj, dict):
            return cls()
        t = obj.get("trial")
        trial = None
        if isinstance(t, dict) and isinstance(t.get("version"), str):
            trial = Trial(t["version"], int(t.get("starts", 0)), int(t.get("max_starts", DEFAULT_MAX_STARTS)),
                          float(t.get("installed_at", 0.0)), t.get("last_failure"))
        return cls(
            current=obj.get("current") if isinstance(obj.get("current"), str) else None,
            previous=obj.get("previous") if isinstance(obj.get("previous"), str) else None,
            trial=trial,
            failed={str(k): str(v) for k, v in (obj.get("failed") or {}).items()},
            history=list(obj.get("history") or [])[-HISTORY_KEEP:],
        )

    def to_bytes(self) -> bytes:
        return json.dumps({"format": 1, **asdict(self)}, indent=1, sort_keys=True).encode() + b"\n"

    def noting(self, event: str, **detail: Any) -> "ReleaseState":
        entry = {"event": event, "at": round(time.time(), 3), **detail}
        return replace(self, history=[*self.history, entry][-HISTORY_KEEP:])


@dataclass(frozen=True)
class Launch:
    """What the launcher should start: ``version`` None is the OS image's agent."""

    version: str | None
    trial: bool = False
    start: int = 0  # which trial start this is (1-based)


def _version_key(version: str) -> tuple:
    from ..bundle.manifest import semver_key

    return semver_key(version)


class AgentReleases:
    """The envs of one device and the pointer saying which one runs."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ENVS).mkdir(exist_ok=True)
        self._state_path = self.root / STATE_FILE

    # -- paths ------------------------------------------------------------------------------------

    def env_dir(self, version: str) -> Path:
        return self.root / ENVS / version

    def site_dir(self, version: str | None) -> Path | None:
        """Where the env's ``edgewise`` package is (None: the OS image's, already on sys.path)."""
        return None if version is None else self.env_dir(version) / SITE

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> ReleaseState:
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return ReleaseState()
        try:
            return ReleaseState.from_json(json.loads(raw))
        except (ValueError, TypeError) as exc:  # atomic writes make this a disk error, not ours
            log.error("%s is unreadable (%s); running the OS image's agent", self._state_path, exc)
            return ReleaseState()

    def _write(self, state: ReleaseState) -> None:
        atomic_write(self._state_path, state.to_bytes())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _usable(self, version: str | None) -> bool:
        return version is None or (self.env_dir(version) / RELEASE_FILE).is_file() and (self.env_dir(version) / SITE).is_dir()

    # -- installing -------------------------------------------------------------------------------

    def install(self, path: Path | str, trusted: Any, *, running_version: str, max_starts: int = DEFAULT_MAX_STARTS,
                force: bool = False) -> "Any":
        """Verify the release at ``path``, unpack it into ``envs/<version>`` and put it on trial.

        Refused (with nothing written to ``envs/`` or ``current.json``): a bad signature or
        manifest, a version not above the running and the committed one, a version rolled back
        before (``force`` allows it again), dependencies the base environment does not have.
        Returns the :class:`~edgewise.bundle.release.VerifiedRelease`.
        """
        from ..bundle.release import read_wheel, verify_release

        release = verify_release(path, trusted)  # raises ReleaseError naming what failed
        version = release.version
        with self._locked():
            st = self.state()
            # Lower than what runs is refused; equal only to move from the OS image's agent into its first env.
            if _version_key(version) < _version_key(running_version) or (st.current and _version_key(version) <= _version_key(st.current)):
                floor = max([v for v in (running_version, st.current) if v], key=_version_key)
                raise SelfUpdateError(
                    f"release {version} is not newer than the agent on this device ({floor}); "
                    "a lower version is refused (a downgrade is a new release with a higher version, or an OS image update)"
                )
            if st.trial is not None and st.trial.version == version:
                raise SelfUpdateError(f"release {version} is already installed and on trial; restart the agent to try it")
            if version in st.failed and not force:
                raise SelfUpdateError(f"release {version} was rolled back on this device ({st.failed[version]}); publish a fixed release")
            check_dependencies(release.manifest)
            self._clean_staging()
            stage = self.root / STAGING / f"{version}.{secrets.token_hex(4)}"
            (stage / SITE).mkdir(parents=True)
            try:
                _unpack(read_wheel(release), release.manifest.files, stage / SITE)
                shutil.copyfile(release.path, stage / RELEASE_FILE)
                _fsync_tree(stage)
                _make_read_only(stage)
                _fault_point("release-switch")
                dest = self.env_dir(version)
                if dest.exists():  # an earlier attempt of the same version that never ran: replace it
                    if version in (st.current, st.previous):
                        raise SelfUpdateError(f"envs/{version} is in use")
                    _remove_tree(dest)
                os.rename(stage, dest)
                fsync_dir(dest.parent)
            except BaseException:
                _remove_tree(stage)
                raise
            st = replace(st, trial=Trial(version, 0, max_starts, round(time.time(), 3)))
            st = st.noting("installed", version=version, sha256=release.sha256, key_id=release.key_id)
            self._write(st)  # the only step that changes what runs next
            self._gc(st)
        log.info("agent release %s installed in %s; on trial at the next start", version, self.env_dir(version))
        return release

    def _clean_staging(self) -> None:
        staging = self.root / STAGING
        if staging.exists():
            for p in staging.iterdir():
                _remove_tree(p)

    def _gc(self, st: ReleaseState) -> None:
        keep = {v for v in (st.current, st.previous, st.trial.version if st.trial else None) if v}
        for env in (self.root / ENVS).iterdir():
            if env.name not in keep:
                _remove_tree(env)

    # -- launching (called by the launcher) ---------------------------------------------------------

    def begin_start(self) -> Launch:
        """Pick the env to start now, counting a trial start *before* it happens (a crash mid-start counts)."""
        with self._locked():
            self._clean_staging()
            st = self.state()
            if st.trial is not None:
                t = st.trial
                if not self._usable(t.version):
                    st = self._rolled_back(st, f"envs/{t.version} is missing or incomplete")
                elif t.starts >= t.max_starts:
                    why = t.last_failure or "it did not report healthy"
                    st = self._rolled_back(st, f"{t.starts} failed start(s) on trial; last: {why}")
                else:
                    t = replace(t, starts=t.starts + 1)
                    self._write(replace(st, trial=t))
                    return Launch(t.version, trial=True, start=t.starts)
            if not self._usable(st.current):
                reason = f"envs/{st.current} is missing or incomplete"
                st = self._fell_back(st, reason)
            return Launch(st.current)

    def commit_trial(self, version: str) -> bool:
        """The trial env reported healthy: make it current (the old current becomes previous)."""
        with self._locked():
            st = self.state()
            if st.trial is None or st.trial.version != version:
                return False
            starts = st.trial.starts
            st = replace(st, previous=st.current, current=version, trial=None)
            self._write(st.noting("committed", version=version, starts=starts))
        log.info("agent release %s committed", version)
        return True

    def fail_trial(self, version: str, reason: str, *, immediate: bool = False) -> bool:
        """Record a failed trial start; roll back when ``immediate`` or the starts are used up. True if rolled back."""
        with self._locked():
            st = self.state()
            if st.trial is None or st.trial.version != version:
                return False
            st = replace(st, trial=replace(st.trial, last_failure=reason))
            if immediate or st.trial.starts >= st.trial.max_starts:
                self._rolled_back(st, reason)
                return True
            self._write(st.noting("trial_failed", version=version, start=st.trial.starts, reason=reason))
            return False

    def fall_back(self, version: str | None, reason: str) -> bool:
        """The committed env cannot run (e.g. failed its integrity check): switch to the previous env."""
        with self._locked():
            st = self.state()
            if st.current != version or version is None:
                return False
            self._fell_back(st, reason)
            return True

    def take_unreported(self) -> list[dict[str, Any]]:
        """History entries (committed, rolled_back, fell_back) no agent has reported yet; marks them reported.

        The launcher cannot send anything; the agent that runs next reports what it decided.
        """
        with self._locked():
            st = self.state()
            out = [h for h in st.history if h.get("event") in REPORTED_EVENTS and not h.get("reported")]
            if out:
                self._write(replace(st, history=[{**h, "reported": True} if h.get("event") in REPORTED_EVENTS else h for h in st.history]))
        return out

    def _rolled_back(self, st: ReleaseState, reason: str) -> ReleaseState:
        assert st.trial is not None
        v = st.trial.version
        log.error("agent release %s rolled back to %s: %s", v, st.current or "the OS image's agent", reason)
        st = replace(st, trial=None, failed={**st.failed, v: reason})
        st = st.noting("rolled_back", version=v, to=st.current, reason=reason)
        self._write(st)
        return st

    def _fell_back(self, st: ReleaseState, reason: str) -> ReleaseState:
        bad = st.current
        to = st.previous if self._usable(st.previous) else None
        log.critical("agent release %s cannot run (%s); falling back to %s", bad, reason, to or "the OS image's agent")
        st = replace(st, current=to, previous=None, failed={**st.failed, **({bad: reason} if bad else {})})
        st = st.noting("fell_back", version=bad, to=to, reason=reason)
        self._write(st)
        return st


def check_dependencies(manifest: Any) -> None:
    """Refuse a release whose requirements the base environment does not meet (envs share its packages)."""
    import sys
    from importlib import metadata

    from ..bundle.release import requirement_names

    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging ships with pip; without it we check names only
        Requirement = SpecifierSet = None  # type: ignore[assignment,misc]
    py = ".".join(map(str, sys.version_info[:3]))
    if manifest.requires_python and SpecifierSet is not None and py not in SpecifierSet(manifest.requires_python):
        raise SelfUpdateError(f"release {manifest.version} needs Python {manifest.requires_python}; this device has {py} (update the OS image first)")
    problems = []
    for line in manifest.requires:
        if Requirement is not None:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = req.name
        else:
            name = requirement_names([line])[0]
            req = None
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{line} (not installed)")
            continue
        if req is not None and req.specifier and have not in req.specifier:
            problems.append(f"{line} (have {have})")
    if problems:
        raise SelfUpdateError(
            f"release {manifest.version} needs dependencies this device's base environment does not provide: "
            f"{'; '.join(problems)}. Releases share the OS image's packages; ship new dependencies with an OS image update first"
        )


def _unpack(wheel: bytes, files: dict[str, Any], dest: Path) -> None:
    """Write exactly the manifest's files from the wheel, each checked against its sha256 while written."""
    import hashlib
    import io

    dest_resolved = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        for i, (name, expected) in enumerate(sorted(files.items())):
            if i == len(files) // 2:
                _fault_point("release-stage")
            data = zf.read(name)
            if hashlib.sha256(data).hexdigest() != expected.sha256:
                raise SelfUpdateError(f"wheel member {name} does not match the release manifest; fetch the release again")
            target = dest / name
            if not target.resolve().is_relative_to(dest_resolved):
                raise SelfUpdateError(f"wheel member {name} would be written outside the env")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _make_read_only(root: Path) -> None:
    """Files 0444, folders 0555: the agent's own user cannot write bytecode or edit code by accident."""
    for dirpath, dirs, names in os.walk(root, topdown=False):
        for n in names:
            os.chmod(os.path.join(dirpath, n), 0o444)
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o555)
    os.chmod(root, 0o755)  # the env folder itself stays writable for removal; its site/ does not


def _remove_tree(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return

    def writable(func: Any, p: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    for dirpath, dirs, _names in os.walk(path):
        os.chmod(dirpath, stat.S_IRWXU)
    shutil.rmtree(path, onerror=writable)
