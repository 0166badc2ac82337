"""Fetch, verify, stage, try, commit: the only way a model gets onto the device.

Trust decisions live here and in ``edgewise.bundle.verify``, nowhere else. How
bytes arrive is a :class:`Fetcher`'s business (HTTP today; a mirror, a peer or a
USB stick are the same to the updater) because the signature, not the server,
is what is trusted. Every failure leaves the running model serving and comes
back as an :class:`~edgewise.protocol.UpdateResult` whose ``reason`` says what
went wrong and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol
from urllib.parse import urljoin, urlsplit

from ..bundle import BundleError, VerifiedBundle, semver_key, verify_bundle
from ..protocol import ArtifactRef, DesiredState, UpdateResult
from ..security import KeyFileError, TrustedKeys
from .golden import check_golden
from .runtime import LoadedModel, ModelLoadError
from .slots import SlotError, SlotRecord, Slots, TrialRecord

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

    from .tuf_client import TufClient

log = logging.getLogger("edgewise.agent.updater")

CHUNK = 64 * 1024
DISK_MARGIN = 16 * 2**20
USER_AGENT = "edgewise-agent"

# Test-only fault injection (see docs/agent.md, "Fault tests"): with EDGEWISE_FAULT_KILL_AT set to one of
# FAULT_STEPS, the process kills itself with SIGKILL at that step of an update, as a power cut would.
# Read once at import; when unset each fault point is one global lookup and a falsy test.
FAULT_STEPS = ("download", "verify", "stage", "trial", "commit")
_KILL_AT = os.environ.get("EDGEWISE_FAULT_KILL_AT") or None


def _fault_point(step: str) -> None:
    if _KILL_AT == step:
        import signal

        log.critical("EDGEWISE_FAULT_KILL_AT=%s: killing the agent (test fault injection)", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class FetchError(RuntimeError):
    """The artifact could not be fetched (network, server, wrong bytes). Retrying later may help."""


class WrongBytesError(FetchError):
    """The source served other bytes than the signed metadata names (hash, length or range): it is broken or hostile.

    A peer fetcher bans the source for a while; a network failure is a plain :class:`FetchError`."""


class TufUpdateError(RuntimeError):
    """TUF refused (or could not check) an update; ``kind`` names the class of failure (rollback, freeze,
    mix-and-match, signature, endless-data, unreachable, ...), the message what to do. See ``agent.tuf_client``."""

    def __init__(self, kind: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


class Fetcher(Protocol):
    """Anything that can put an artifact's exact bytes at ``dest``: HTTP, a mirror, a peer, a USB stick."""

    def fetch(self, artifact: ArtifactRef, dest: Path) -> Path:
        """Write the artifact to ``dest`` (checking size and sha256) and return ``dest``; raise FetchError."""
        ...


def _sha256_of(path: Path) -> tuple[int, "hashlib._Hash"]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h


class HttpFetcher:
    """Downloads over HTTP(S) with resume: bytes go to ``dest.part``; a later call continues with a Range request.

    It trusts nothing the server says about the artifact: the size and sha256
    come from the desired state, and more bytes than announced are refused
    (a hostile or broken server cannot fill the disk).
    """

    def __init__(
        self, base_url: str | None = None, *, timeout: float = 30.0, chunk_size: int = CHUNK, token_file: Path | None = None
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.token_file = token_file  # the device's API token (issued at enrollment), sent as a bearer token

    def headers(self) -> dict[str, str]:
        """Request headers: user agent, and the device token when the device has one (read per request: rotation)."""
        headers = {"User-Agent": USER_AGENT}
        if self.token_file is not None:
            try:
                token = Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError:
                token = ""
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    def resolve(self, url: str) -> str:
        """Absolute URL for ``url``; relative URLs are joined to the server URL."""
        if urlsplit(url).scheme:
            return url
        if not self.base_url:
            raise FetchError(f"artifact URL {url!r} is relative but the agent has no server URL; start it with --server")
        return urljoin(self.base_url.rstrip("/") + "/", url)

    def fetch(self, artifact: ArtifactRef, dest: Path) -> Path:
        url = self.resolve(artifact.url)
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https", "file"):
            raise FetchError(f"artifact URL {url!r}: scheme {scheme!r} is not supported (use http, https or file)")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            size, h = _sha256_of(dest)
            if size == artifact.size and h.hexdigest() == artifact.sha256:
                return dest
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        have, h = (0, hashlib.sha256())
        if part.exists():
            have, h = _sha256_of(part)
            if have > artifact.size or scheme == "file":
                part.unlink()
                have, h = 0, hashlib.sha256()
        if have < artifact.size:
            have, h = self._download(url, artifact, part, have, h)
        elif not part.exists():
            part.touch()  # zero-byte artifact
        if have != artifact.size:
            raise FetchError(f"{url}: download stopped at {have} of {artifact.size} bytes; it resumes on the next attempt")
        digest = h.hexdigest()
        if digest != artifact.sha256:
            part.unlink(missing_ok=True)
            raise WrongBytesError(
                f"{url}: sha256 {digest[:16]}… does not match the desired state's {artifact.sha256[:16]}…; "
                "the server or a mirror serves other bytes than the control plane registered"
            )
        os.replace(part, dest)
        return dest

    def _download(self, url: str, artifact: ArtifactRef, part: Path, have: int, h: "hashlib._Hash") -> tuple[int, "hashlib._Hash"]:
        import http.client
        import urllib.error
        import urllib.request  # lazy: only a device that updates pays for it

        headers = self.headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # our partial file is stale: start over
                part.unlink(missing_ok=True)
                return self._download(url, artifact, part, 0, hashlib.sha256())
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise FetchError(f"cannot download {url}: {reason}") from None
        with resp:
            status = getattr(resp, "status", None) or 200
            if have and status == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {have}-"):
                    part.unlink(missing_ok=True)
                    raise WrongBytesError(f"{url}: asked for bytes from {have}, server answered {content_range!r}; restarting next attempt")
                mode = "ab"
            else:
                if status not in (200, 206):
                    raise FetchError(f"{url}: unexpected HTTP status {status}")
                have, h, mode = 0, hashlib.sha256(), "wb"  # server ignored the Range: take it from the top
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) > artifact.size:
                raise WrongBytesError(
                    f"{url}: server announces {have + int(length)} bytes, the desired state {artifact.size}; refusing"
                )
            try:
                with open(part, mode) as f:
                    while True:
                        chunk = resp.read(self.chunk_size)
                        if not chunk:
                            break
                        if have + len(chunk) > artifact.size:
                            f.close()
                            part.unlink(missing_ok=True)
                            raise WrongBytesError(f"{url}: server sent more than the {artifact.size} bytes the desired state announced; refusing")
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        if _KILL_AT:
                            f.flush()
                            _fault_point("download")  # a partial .part file is on disk
                    f.flush()
                    os.fsync(f.fileno())
            except FetchError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise FetchError(f"{url}: download interrupted at {have} of {artifact.size} bytes ({type(exc).__name__}); it resumes on the next attempt") from None
        return have, h


class Updater:
    """Moves the device from the model it runs to the one it is asked to run, or leaves it where it is.

    ``activate`` swaps the live model (one reference rebind in the agent);
    ``current`` returns the live one. Calls are serialized: an install and a
    desired-state update never interleave.
    """

    def __init__(
        self,
        slots: Slots,
        trust_dir: Path,
        *,
        downloads: Path,
        activate: Callable[[LoadedModel], None],
        current: Callable[[], LoadedModel | None],
        fetcher: Fetcher | None = None,
        threads: int | None = None,
        trial_starts: int = 1,
        disk_margin: int = DISK_MARGIN,
        tuf: "TufClient | None" = None,
        require_tuf: bool = False,
    ) -> None:
        self.slots = slots
        # TUF gates updates from a desired state: with a client, only a target the signed TUF metadata lists
        # (length, sha256, and ``rollback`` in its signed custom data) is installed; ``require_tuf`` without a
        # client (a device with no trusted root.json) refuses every such update instead of trusting signatures alone.
        self.tuf = tuf
        self.require_tuf = require_tuf or tuf is not None
        self.trial_starts = max(1, int(trial_starts))
        self.disk_margin = disk_margin
        self.startup_result: UpdateResult | None = None  # what load_committed did to a trial, for the agent to report
        self.trust_dir = Path(trust_dir)
        self.downloads = Path(downloads)
        self.fetcher = fetcher
        self.threads = threads
        self._activate = activate
        self._current = current
        self._lock = threading.Lock()

    def trusted(self) -> TrustedKeys:
        """The keys in the trust directory (or key file), read fresh so a key dropped in takes effect without a restart."""
        if not self.trust_dir.exists():
            return TrustedKeys()
        try:
            return TrustedKeys.from_paths([self.trust_dir])
        except KeyFileError as exc:
            log.error("trust directory %s holds an unusable key: %s", self.trust_dir, exc)
            return TrustedKeys()

    # -- startup --------------------------------------------------------------------------------

    def load_committed(self) -> tuple[LoadedModel | None, str | None]:
        """Load the committed slot, verifying it again; fall back to the previous slot if that fails.

        Returns the model (or None) and a problem description when the committed
        slot did not load (for an event), or None when all went well. A slot on
        trial is tried first (see :meth:`_resume_trial`); what happened to it is left
        in :attr:`startup_result`.
        """
        self.startup_result = None
        with self._lock:
            trial = self.slots.trial()
            if trial is not None:
                model, self.startup_result = self._resume_trial(trial)
                if model is not None:
                    return model, None
            model, problem = self._load_committed()
            if model is not None:
                self._forget_committed_download()
            return model, problem

    def _forget_committed_download(self) -> None:
        """A full download of the bundle already committed is dead weight (left by a power cut after the commit)."""
        rec = self.slots.record()
        if rec is None:
            return
        for name in (f"{rec.sha256}.ewb", f"{rec.sha256}.ewb.part"):
            p = self.downloads / name
            try:
                if p.exists():
                    p.unlink()
                    log.info("removed leftover download %s of the committed bundle", p)
            except OSError as exc:
                log.warning("cannot remove leftover download %s: %s", p, exc)

    def _resume_trial(self, trial: TrialRecord) -> tuple[LoadedModel | None, UpdateResult | None]:
        """One more agent start for the model on trial: commit it, keep trying it, or roll it back.

        Each start is written down before the model is loaded, so a start that never completes (the
        agent crashed or lost power while trying the model) still counts. A trial gets ``trial_starts``
        starts; when they are used up without as many successes, the committed model comes back.
        """
        what = f"{trial.model} {trial.version}"
        if trial.passed < self.trial_starts and trial.starts >= self.trial_starts:
            self.slots.abandon_trial()
            reason = (
                f"{what} crashed during trial: {trial.starts} of {self.trial_starts} start(s) used, "
                f"{trial.passed} completed; rolled back to the committed model"
            )
            log.error("%s", reason)
            return None, _result(trial.generation, trial.model, trial.version, "rolled_back", reason)
        if trial.passed < self.trial_starts:
            self.slots.trial_started()  # written before loading: a crash from here on counts against the trial
        try:
            model = self._load_slot(trial.as_record(), golden=True)
        except (BundleError, ModelLoadError, OSError) as exc:
            self.slots.abandon_trial()
            reason = f"{what} failed its trial on start and was not committed: {exc}"
            log.error("%s", reason)
            return None, _result(trial.generation, trial.model, trial.version, "rolled_back", reason)
        passed = trial if trial.passed >= self.trial_starts else self.slots.trial_passed()
        assert passed is not None
        if passed.passed < self.trial_starts:
            log.info("%s on trial: start %d of %d passed", what, passed.passed, self.trial_starts)
            return model, None
        self.slots.commit_trial()
        self._cleanup()
        log.info("%s passed its trial on %d start(s); committed", what, passed.passed)
        return model, _result(trial.generation, trial.model, trial.version, "ok", f"committed after passing its trial on {passed.passed} start(s)")

    def _load_committed(self) -> tuple[LoadedModel | None, str | None]:
        rec = self.slots.record()
        if rec is None:
            return None, None
        try:
            return self._load_slot(rec), None
        except (BundleError, ModelLoadError, OSError) as exc:
            problem = f"committed slot {rec.slot} ({rec.model} {rec.version}) does not load: {exc}"
        log.error("%s", problem)
        prev = self.slots.previous()
        if prev is None:
            return None, problem + "; no previous slot to fall back to: install a bundle"
        try:
            model = self._load_slot(prev)
        except (BundleError, ModelLoadError, OSError) as exc:
            return None, problem + f"; previous slot {prev.slot} does not load either: {exc}"
        self.slots.rollback()
        return model, problem + f"; rolled back to slot {prev.slot} ({prev.model} {prev.version})"

    def _load_slot(self, rec: SlotRecord, *, golden: bool = False) -> LoadedModel:
        vb = verify_bundle(self.slots.bundle(rec.slot), self.trusted())
        if vb.sha256 != rec.sha256:
            raise ModelLoadError(f"slot {rec.slot} changed since it was committed (sha256 {vb.sha256[:16]}…, recorded {rec.sha256[:16]}…)")
        if (vb.manifest.name, vb.manifest.version) != (rec.model, rec.version):
            raise ModelLoadError(f"slot {rec.slot} holds {vb.manifest.name} {vb.manifest.version}, recorded {rec.model} {rec.version}")
        model = LoadedModel.from_bundle(vb, threads=self.threads)
        model.smoke_test()
        if golden:
            check_golden(model, vb)
        return model

    def _cleanup(self) -> None:
        """After a commit: remove everything but the two slot bundles (stale .part files, old downloads)."""
        for p in self.slots.cleanup(self.downloads):
            log.info("removed leftover %s", p)

    def _rollback_refusal(self, name: str | None, version: str | None, allowed: bool) -> str | None:
        """Why installing ``name`` ``version`` would be a refused downgrade, or None."""
        if not name or not version:
            return None
        highest = self.slots.highest_committed(name)
        if highest is None:
            return None
        try:
            lower = semver_key(version) < semver_key(highest)
        except ValueError:
            return None  # not a semantic version: the manifest check refuses it anyway
        if not lower:
            return None
        if allowed:
            log.warning("installing %s %s below the highest committed %s: the desired state allows this rollback", name, version, highest)
            return None
        return (
            f"refusing {name} {version}: it is lower than {name} {highest}, the highest version this device has "
            "committed (rollback protection); deploy it with rollback: true to downgrade on purpose"
        )

    def _disk_refusal(self, artifact: ArtifactRef, dest: Path, what: str) -> str | None:
        """Why the artifact would not fit on the disk (download + staged copy + margin), or None."""
        part = dest.with_name(dest.name + ".part")
        try:
            have = part.stat().st_size if part.exists() else 0
        except OSError:
            have = 0
        have = have if have <= artifact.size else 0
        try:
            old = self.slots.bundle(self.slots.inactive())
            reclaim = old.stat().st_size if old.exists() else 0  # staging replaces the inactive slot's bundle
        except OSError:
            reclaim = 0
        download = artifact.size - have
        staging = max(0, artifact.size - reclaim)
        needed = download + staging + self.disk_margin
        root = self.slots.root
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return None
        if needed <= free:
            return None
        return (
            f"not enough disk space for {what}: needs {needed:,} bytes (download {download:,} + staged copy {staging:,} "
            f"+ margin {self.disk_margin:,}), {free:,} bytes free on {root}; free some space"
        )

    # -- updates --------------------------------------------------------------------------------

    def apply(self, desired: DesiredState) -> UpdateResult:
        """Converge to ``desired``: fetch, verify, stage, load, smoke test, commit, swap."""
        return self.attempt(desired)[0]

    def attempt(self, desired: DesiredState) -> tuple[UpdateResult, bool]:
        """Like :meth:`apply`, also telling whether a retry could succeed (network trouble) or not (bad bundle)."""
        with self._lock:
            return self._attempt(desired)

    def _attempt(self, desired: DesiredState) -> tuple[UpdateResult, bool]:
        gen, want_model, want_version = desired.generation, desired.model, desired.version
        current = self._current()
        if current is not None and (current.name, current.version) == (want_model, want_version):
            return _result(gen, want_model, want_version, "ok", "already running"), False
        if not want_model or not want_version or (desired.artifact is None and not self.require_tuf):
            return _result(gen, want_model, want_version, "failed", "desired state names no model, version and artifact; nothing to fetch"), False
        if self.fetcher is None:
            return _result(gen, want_model, want_version, "failed", "the agent has no server URL to fetch from; start it with --server"), False
        tuf_info = None
        if self.require_tuf:
            try:
                tuf_info, artifact = self._tuf_artifact(desired)
            except TufUpdateError as exc:
                return _result(gen, want_model, want_version, "failed", f"TUF refused the update ({exc.kind}): {exc}"), exc.retryable
            # Only the signed target may allow a downgrade; the desired state's own flag is unsigned.
            allow_rollback = (tuf_info.custom or {}).get("rollback") is True
        else:
            assert desired.artifact is not None
            artifact, allow_rollback = desired.artifact, desired.rollback
        refusal = self._rollback_refusal(want_model, want_version, allow_rollback)
        if refusal:
            return _result(gen, want_model, want_version, "failed", refusal), False
        dest = self.downloads / f"{artifact.sha256}.ewb"
        self._forget_other_downloads(keep=dest)
        refusal = self._disk_refusal(artifact, dest, f"{want_model} {want_version}")
        if refusal:
            return _result(gen, want_model, want_version, "failed", refusal), True  # space may be freed later
        try:
            path = self.fetcher.fetch(artifact, dest)
            if tuf_info is not None:
                from .tuf_client import verify_target_file

                verify_target_file(tuf_info, path)
        except TufUpdateError as exc:
            dest.unlink(missing_ok=True)
            return _result(gen, want_model, want_version, "failed", f"TUF refused the download ({exc.kind}): {exc}"), True
        except FetchError as exc:
            what = f" of TUF target {tuf_info.path}" if tuf_info is not None else ""
            return _result(gen, want_model, want_version, "failed", f"download{what} failed: {exc}"), True
        except OSError as exc:
            return _result(gen, want_model, want_version, "failed", f"download failed: cannot write {dest}: {exc.strerror or exc}"), True
        try:
            return self._install_file(path, expect=(want_model, want_version), generation=gen, allow_rollback=allow_rollback), False
        finally:
            dest.unlink(missing_ok=True)

    def _tuf_artifact(self, desired: DesiredState) -> tuple["TargetFile", ArtifactRef]:
        """The signed TUF info of the target the desired state names, and what to download (size and sha256 from TUF).

        The bytes may come from the desired state's URL (a mirror or peer) or the
        control plane's TUF target URL: either way they must match the signed length
        and sha256, never the desired state's unsigned ones.
        """
        if self.tuf is None:
            raise TufUpdateError(
                "no-root", f"this device has no trusted TUF root ({self.trust_dir / 'root.json'}), so it installs no update; "
                "install the control plane's root.json there (edgewise agent --tuf-root FILE) or, for setups without TUF, "
                'set update_trust = "signature-only"', retryable=False,
            )
        if not desired.target:
            raise TufUpdateError(
                "no-target", "the desired state names no TUF target (a control plane older than TUF?); upgrade the control "
                'plane, or set update_trust = "signature-only" on this device', retryable=False,
            )
        info = self.tuf.target_info(desired.target)
        custom = info.custom or {}
        if (custom.get("model"), custom.get("version")) != (desired.model, desired.version):
            raise TufUpdateError(
                "target-mismatch", f"signed TUF target {desired.target} is {custom.get('model')} {custom.get('version')}, "
                f"the desired state asks for {desired.model} {desired.version}; refusing", retryable=False,
            )
        url = desired.artifact.url if desired.artifact is not None else self.tuf.target_url(info)
        return info, ArtifactRef(url=url, sha256=info.hashes["sha256"], size=info.length)

    def _forget_other_downloads(self, keep: Path) -> None:
        """Partial downloads of artifacts no longer wanted would only fill the disk."""
        if not self.downloads.is_dir():
            return
        for p in self.downloads.iterdir():
            if p.name not in (keep.name, keep.name + ".part"):
                p.unlink(missing_ok=True)

    def install(self, bundle_path: Path | str, *, generation: int | None = None, rollback: bool = False) -> UpdateResult:
        """Install a local bundle file through the same verify/stage/commit path (seed a device offline).

        A version lower than the highest committed one is refused unless ``rollback`` is true.
        """
        path = Path(bundle_path)
        with self._lock:
            if not path.is_file():
                return _result(generation, None, None, "failed", f"{path} is not a file")
            return self._install_file(path, expect=None, generation=generation, allow_rollback=rollback)

    def _install_file(self, path: Path, *, expect: tuple[str, str] | None, generation: int | None, allow_rollback: bool = False) -> UpdateResult:
        want_model, want_version = expect or (None, None)
        try:
            vb = verify_bundle(path, self.trusted())
        except BundleError as exc:
            return _result(generation, want_model, want_version, "failed", f"verification failed: {exc}")
        if _KILL_AT:
            _fault_point("verify")  # downloaded and verified, nothing staged yet
        name, version = vb.manifest.name, vb.manifest.version
        if expect is not None and (name, version) != expect:
            return _result(
                generation, want_model, want_version, "failed",
                f"bundle holds {name} {version} but the desired state asks for {want_model} {want_version}; refusing",
            )
        refusal = self._rollback_refusal(name, version, allow_rollback)
        if refusal:
            return _result(generation, want_model or name, want_version or version, "failed", refusal)
        current = self._current()
        if current is not None and current.sha256 == vb.sha256:
            return _result(generation, name, version, "ok", "already running")
        try:
            staged = self.slots.bundle(self.slots.stage(vb.path))
        except SlotError as exc:
            self._restore_committed_if_orphaned()
            return _result(generation, name, version, "failed", str(exc))
        if _KILL_AT:
            _fault_point("stage")  # staged in the inactive slot, not on trial yet
        # From here on the new model sits in the inactive slot; any failure abandons it there.
        try:
            self.slots.begin_trial(staged, vb.manifest, vb.sha256, generation)  # start 1, written before loading
            staged_vb: VerifiedBundle = verify_bundle(staged, self.trusted())
            if staged_vb.sha256 != vb.sha256:
                raise ModelLoadError("the staged copy differs from the verified file (disk error?)")
            model = LoadedModel.from_bundle(staged_vb, threads=self.threads)
            model.smoke_test()
            golden = check_golden(model, staged_vb)
        except (BundleError, ModelLoadError, OSError, SlotError) as exc:
            log.error("abandoning %s %s: %s", name, version, exc)
            self._abandon_trial()
            return _result(generation, name, version, "rolled_back", f"{name} {version} failed its trial and was not committed: {exc}")
        if golden:
            log.info("%s %s: %s", name, version, golden)
        if _KILL_AT:
            _fault_point("trial")  # on trial (start 1 recorded), loaded and checked, not passed yet
        try:
            trial = self.slots.trial_passed()
            if trial is not None and trial.passed >= self.trial_starts:
                self.slots.commit_trial()
                if _KILL_AT:
                    _fault_point("commit")  # committed in state.json, not yet live nor cleaned up
                self._cleanup()
        except OSError as exc:
            self._abandon_trial()
            return _result(generation, name, version, "rolled_back", f"cannot commit the slot: {exc.strerror or exc}")
        self._activate(model)
        log.info("now running %s %s (signed by key %s)", name, version, vb.key_id)
        if self.slots.trial() is not None:
            left = self.trial_starts - 1
            return _result(generation, name, version, "ok", f"on trial: committed after {left} more successful agent start(s)")
        return _result(generation, name, version, "ok")

    def _abandon_trial(self) -> None:
        try:
            self.slots.abandon_trial()
        except OSError as exc:  # the trial record is rolled back on the next start anyway
            log.error("cannot clear the trial record: %s", exc)
        self._restore_committed_if_orphaned()

    def _restore_committed_if_orphaned(self) -> None:
        """If the live model was a trial whose slot a later update just overwrote, go back to the committed one."""
        current = self._current()
        rec = self.slots.record()
        trial = self.slots.trial()
        if current is None or rec is None or current.sha256 in (rec.sha256, trial.sha256 if trial else None):
            return
        model, problem = self._load_committed()
        if model is not None:
            self._activate(model)
        if problem:
            log.error("%s", problem)


def _result(generation: int | None, model: str | None, version: str | None, kind: str, reason: str | None = None) -> UpdateResult:
    return UpdateResult(generation=generation, model=model, version=version, result=kind, reason=reason, at=time.time())  # type: ignore[arg-type]
