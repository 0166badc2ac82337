"""The control plane's TUF repository: created on first start, a target per uploaded bundle, kept fresh.

Layout under ``<data_dir>/tuf/``:

- ``metadata/``  published metadata (``{n}.root.json``, ``timestamp.json``, ``{n}.snapshot.json``, ``{n}.targets.json``)
- ``targets/``   published bundles under consistent names (hard links to the registry's files)
- ``keys/``      online keys (targets, snapshot, timestamp), ed25519 PEM files mode 0600, folder 0700
- ``root-keys-OFFLINE/``  the root private keys written by the automatic first-start init: move this folder
  off the server (it is needed only to rotate keys: ``edgewise tuf rotate --root-keys DIR``)

The refresher thread re-signs timestamp and snapshot (and targets) when half their lifetime has
passed, so devices never see expired metadata while the control plane runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..bundle.verify import sha256_file
from ..security.tuf_repo import Expiry, TufRepoError, TufRepository, target_name, utcnow
from .models import AgentRelease, ModelVersion

log = logging.getLogger(__name__)

SESSION_KEY = "edgewise.tuf"  # TufService on every database session's ``info`` (reached by deploy())
OFFLINE_DIR = "root-keys-OFFLINE"


def _unchanged(path: Path, sha256: str, what: str) -> Path:
    """``path`` if it still has the sha256 verified at upload. TUF signs what is on disk, so a stored file changed
    since upload (disk corruption, someone with access to the data dir) must be refused here, never re-signed."""
    if sha256_file(path) != sha256:
        raise TufRepoError(f"stored {what} ({path}) no longer has the sha256 verified at upload; it was changed on "
                           "disk: delete it and upload the signed file again")
    return path


def bundle_target(mv: ModelVersion, *, rollback: bool = False) -> str:
    """The TUF target name of a registry row (``<model>/<version>[/<variant>].ewb``)."""
    variant = ((mv.manifest or {}).get("variant") or {}).get("name")
    return target_name(mv.name, mv.version, variant, rollback=rollback)


def bundle_custom(mv: ModelVersion, *, rollback: bool = False) -> dict[str, Any]:
    """The signed ``custom`` data of a bundle target: what the agent checks besides length and hashes."""
    manifest = mv.manifest or {}
    variant = manifest.get("variant") or {}
    custom: dict[str, Any] = {
        "model": mv.name,
        "version": mv.version,
        "variant": variant.get("name"),
        "hardware_class": variant.get("profile"),
        "key_id": mv.key_id,
    }
    if rollback:
        custom["rollback"] = True
    return custom


AGENT_TARGET_DIR = "agent"


def release_target(version: str) -> str:
    """The TUF target name of an agent release: ``agent/edgewise-agent-<version>.ewr``."""
    target_name("edgewise-agent", version)  # the same character rules as bundle targets (raises TufRepoError)
    return f"{AGENT_TARGET_DIR}/edgewise-agent-{version}.ewr"


def release_custom(version: str) -> dict[str, Any]:
    """The signed ``custom`` data of an agent release target: what the agent checks besides length and hashes."""
    return {"kind": "agent-release", "version": version}


class TufService:
    """Owns the repository for the control plane: targets for bundles, the background refresher."""

    def __init__(
        self,
        repo: TufRepository,
        bundles_dir: Path,
        *,
        refresh_interval_s: float = 600.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.repo = repo
        self.bundles_dir = Path(bundles_dir)
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        self.repo.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh_error: str | None = None
        self.lease: Any = None  # issue 9 SCALE: a control.lease.Lease; the refresher re-signs only while it is held

    @classmethod
    def open(
        cls,
        data_dir: Path,
        bundles_dir: Path,
        *,
        root_keys: int = 1,
        threshold: int = 1,
        expiry: Expiry | None = None,
        online_keys: str | None = None,
        refresh_interval_s: float = 600.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> "TufService":
        """The repository at ``data_dir/tuf``; created on first start with root keys in ``root-keys-OFFLINE``."""
        from ..security.tuf_repo import open_repository

        path = Path(data_dir) / "tuf"
        repo = open_repository(path, online_keys=online_keys, expiry=expiry, clock=clock)
        if not repo.initialized:
            offline = path / OFFLINE_DIR
            repo.init(offline, root_keys=root_keys, threshold=threshold)
            log.warning(
                "created the TUF repository %s. Its ROOT KEYS are in %s: move that folder OFFLINE now (USB stick, safe); "
                "it is needed only to rotate keys. Devices must be provisioned with %s",
                path, offline, repo.metadata_dir / "1.root.json",
            )
        return cls(repo, bundles_dir, refresh_interval_s=refresh_interval_s, clock=clock)

    # -- targets -----------------------------------------------------------------------------------

    def register(self, rows: Iterable[ModelVersion], *, rollback: bool = False) -> list[str]:
        """Publish registry rows as targets (one new targets version for all); return their names."""
        entries = []
        names = []
        for mv in rows:
            name = bundle_target(mv, rollback=rollback)
            path = _unchanged(self.bundles_dir / mv.path, mv.sha256, f"bundle {mv.name} {mv.version}")
            entries.append((name, path, bundle_custom(mv, rollback=rollback)))
            names.append(name)
        self.repo.add_targets(entries)
        return names

    def register_bundle(self, mv: ModelVersion, *, rollback: bool = False) -> str:
        return self.register([mv], rollback=rollback)[0]

    def backfill(self, session: Session) -> int:
        """Targets for bundles stored before the repository existed (or whose registration was interrupted)."""
        listed = self.repo.load("targets").signed.targets
        missing = [mv for mv in session.scalars(select(ModelVersion)) if bundle_target(mv) not in listed]
        missing = [mv for mv in missing if (self.bundles_dir / mv.path).is_file()]
        for mv in missing:
            try:
                self.register([mv])
            except (TufRepoError, OSError) as exc:  # one bad stored file must not stop the control plane
                log.error("bundle %s %s is not a TUF target: %s", mv.name, mv.version, exc)
        releases = [r for r in session.scalars(select(AgentRelease)) if r.target not in listed]
        for row in releases:
            try:
                self.register_release(row)
            except (TufRepoError, OSError) as exc:  # one bad stored file must not stop the control plane
                log.error("agent release %s is not a TUF target: %s", row.version, exc)
        return len(missing) + len(releases)

    def register_release(self, row: AgentRelease) -> str:
        """Publish a stored agent release as the target ``agent/edgewise-agent-<version>.ewr``; return its name.

        Signs only bytes whose sha256 is the one verified at upload: a stored file changed since then is
        refused here, never re-signed (the TUF target must keep naming what the release key signed)."""
        listed = self.repo.target_info(row.target)
        if listed is not None and listed.hashes.get("sha256") == row.sha256 and listed.length == row.size:
            return row.target
        path = _unchanged(self.bundles_dir / row.path, row.sha256, f"agent release {row.version}")
        self.repo.add_targets([(row.target, path, release_custom(row.version))])
        return row.target

    def current_root_json(self) -> bytes:
        """The newest root metadata: what enrollment hands a new device (no rotations to walk through)."""
        return (self.repo.metadata_dir / "root.json").read_bytes()

    def root_json(self) -> bytes:
        """Version 1 of the root metadata: what devices are provisioned with."""
        return self.repo.root_bytes(1)

    # -- freshness ---------------------------------------------------------------------------------

    def refresh_once(self, now: datetime | None = None) -> list[str]:
        try:
            renewed = self.repo.refresh(now or self.clock())
        except (TufRepoError, OSError) as exc:
            self.last_refresh_error = str(exc)
            log.error("cannot refresh TUF metadata: %s", exc)
            return []
        self.last_refresh_error = None
        if renewed:
            log.info("re-signed TUF metadata: %s", ", ".join(renewed))
        return renewed

    def start(self) -> None:
        """Run the refresher in a daemon thread (every ``refresh_interval_s``; renews at half-life)."""
        if self._thread is not None:
            return
        self.refresh_once()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tuf-refresh", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_interval_s):
            if self.lease is None or self.lease.held():  # else another process re-signs (docs/scale-out.md)
                self.refresh_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def tuf_of(session: Session) -> TufService | None:
    return session.info.get(SESSION_KEY)


__all__ = ["SESSION_KEY", "TufService", "bundle_custom", "bundle_target", "release_custom", "release_target", "tuf_of"]
