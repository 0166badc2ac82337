"""Signed agent releases (``.ewr``) stored by the control plane, published as TUF targets, deployed by version.

Like bundles: nothing is stored that does not verify against the server's trusted keys
(``bundle.release.verify_release``), a version always means the same bytes, and every stored
release is a signed TUF target ``agent/edgewise-agent-<version>.ewr`` with
``custom = {"kind": "agent-release", "version": ...}``, which is what a device checks before
it installs one (the device verifies the release signature again itself).

Files live in ``<bundles_dir>/agent-releases/``; uploads are spooled through the registry's
``.incoming`` folder (same filesystem, so the final move is an atomic rename).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..bundle import BundleError, semver_key
from ..bundle.release import ReleaseError, verify_release
from ..fsutil import fsync_dir, fsync_file
from ..protocol import ArtifactRef
from ..protocol.messages import AgentReleaseRef
from ..security.tuf_repo import TufRepoError
from .errors import BundleRejectedError, NotFoundError, VersionConflictError
from .models import AgentRelease
from .registry import Registry
from .timeutil import utcnow
from .tuf_service import release_target, tuf_of

log = logging.getLogger(__name__)

RELEASES_DIR = "agent-releases"


class AgentReleaseNotFoundError(NotFoundError):
    """No stored agent release has that version."""


def release_url(version: str) -> str:
    """Where devices fetch a release, relative to the control plane's base URL."""
    return f"/api/v1/agent-releases/{version}/artifact"


@dataclass(frozen=True)
class ReleaseStoreResult:
    release: AgentRelease
    created: bool  # False: the identical release was already stored (idempotent re-upload)


def store_release(session: Session, registry: Registry, upload: Path) -> ReleaseStoreResult:
    """Verify the signed release ``upload`` with the server's trusted keys, store it, publish its TUF target.

    The temporary file is consumed. The same version with the same bytes is accepted again;
    with other bytes it is a :class:`VersionConflictError` (devices rely on a version meaning one thing).
    """
    upload = Path(upload)
    try:
        if len(registry.trusted) == 0:
            raise BundleRejectedError(
                "the server trusts no signing keys, so it accepts no agent releases; "
                "start it with --trust PATH/TO/signing.pub (or EDGEWISE_TRUST)"
            )
        try:
            verified = verify_release(upload, registry.trusted)
        except (ReleaseError, BundleError) as exc:
            msg = str(exc).replace(upload.name, "uploaded release")
            raise BundleRejectedError(
                f"agent release rejected ({type(exc).__name__}): {msg}; build it with `edgewise agent-release build --key` "
                "using a key this server trusts (--trust)"
            ) from None
        version = verified.version
        try:
            target = release_target(version)
        except TufRepoError as exc:
            raise BundleRejectedError(f"agent release version {version!r}: {exc}") from None
        existing = find_release(session, version)
        if existing is not None:
            return ReleaseStoreResult(_same_or_conflict(existing, verified.sha256), created=False)
        folder = registry.bundles_dir / RELEASES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"edgewise-agent-{version}.ewr"
        if dest.exists():  # left over from an interrupted store: never overwrite, keep both
            dest = folder / f"edgewise-agent-{version}-{verified.sha256[:12]}.ewr"
        manifest = verified.manifest.model_dump(mode="json", exclude={"files"})
        row = AgentRelease(
            version=version, sha256=verified.sha256, size=verified.size, key_id=verified.key_id,
            path=str(dest.relative_to(registry.bundles_dir)), target=target, manifest=manifest, uploaded_at=utcnow(),
        )
        session.add(row)
        try:
            session.flush()  # the unique constraint decides a race between two uploads
        except IntegrityError:
            session.rollback()
            existing = find_release(session, version)
            if existing is None:
                raise
            return ReleaseStoreResult(_same_or_conflict(existing, verified.sha256), created=False)
        fsync_file(upload)
        os.replace(upload, dest)
        try:
            session.commit()
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        fsync_dir(folder)
        log.info("stored agent release %s (%d bytes, key %s)", version, row.size, row.key_id)
        publish_target(session, row)
        return ReleaseStoreResult(row, created=True)
    finally:
        upload.unlink(missing_ok=True)


def publish_target(session: Session, row: AgentRelease) -> str | None:
    """Sign the release into the TUF targets; None without a TUF repository.

    A failure after a successful store is logged, not raised: deploy() and the next start register it again."""
    tuf = tuf_of(session)
    if tuf is None:
        return None
    try:
        return tuf.register_release(row)
    except (TufRepoError, OSError) as exc:
        log.error("stored agent release %s but could not publish it as a TUF target: %s", row.version, exc)
        return None


def _same_or_conflict(existing: AgentRelease, sha256: str) -> AgentRelease:
    if existing.sha256 == sha256:
        return existing
    raise VersionConflictError(
        f"agent release {existing.version} is already stored with different content (sha256 {existing.sha256[:16]}…, "
        f"uploaded {sha256[:16]}…); versions are immutable: bump the version and build the release again"
    )


def find_release(session: Session, version: str) -> AgentRelease | None:
    return session.scalar(select(AgentRelease).where(AgentRelease.version == version))


def get_release(session: Session, version: str) -> AgentRelease:
    """The stored release ``version``; :class:`AgentReleaseNotFoundError` naming the known versions otherwise."""
    row = find_release(session, version)
    if row is None:
        known = [r.version for r in list_releases(session)]
        hint = f"known versions: {', '.join(known)}" if known else "upload one first: POST /api/v1/agent-releases"
        raise AgentReleaseNotFoundError(f"agent release {version} not found; {hint}")
    return row


def list_releases(session: Session) -> list[AgentRelease]:
    """Every stored release, oldest first by semantic-version precedence."""
    return sorted(session.scalars(select(AgentRelease)).all(), key=lambda r: semver_key(r.version))


def release_path(registry: Registry, row: AgentRelease) -> Path:
    """The stored file of a release, for download."""
    p = registry.bundles_dir / row.path
    if not p.is_file():
        raise AgentReleaseNotFoundError(
            f"agent release {row.version} is registered but its file {p} is missing from the data directory; "
            "restore it from a backup or upload the release again"
        )
    return p


def release_ref(session: Session, version: str) -> AgentReleaseRef:
    """What a desired state carries to make a device run agent ``version``: URL, sha256, size and TUF target.

    The target is (re)published here when missing (an upload whose TUF step failed), so a
    deployment never names a target devices cannot find; without TUF ``target`` is None."""
    row = get_release(session, version)
    target = None
    tuf = tuf_of(session)
    if tuf is not None:
        try:
            target = tuf.register_release(row)
        except (TufRepoError, OSError) as exc:
            raise BundleRejectedError(f"agent release {version} cannot be deployed: {exc}") from None
    artifact = ArtifactRef(url=release_url(row.version), sha256=row.sha256, size=row.size)
    return AgentReleaseRef(version=row.version, artifact=artifact, target=target)


__all__ = [
    "AgentReleaseNotFoundError", "RELEASES_DIR", "ReleaseStoreResult", "find_release", "get_release", "list_releases",
    "publish_target", "release_path", "release_ref", "release_url", "store_release",
]
