"""The model registry: verified bundles on disk, one immutable row per name+version+variant.

A version may be stored as several variants (fp32, int8, ...; the manifest's ``variant.name``,
"default" for a bundle built without one); ``control.variants`` picks one per device.

Nothing enters the registry that does not verify against the server's trusted keys,
so a device is never told to fetch a bundle the control plane could not vouch for
(the device verifies again itself: the signature, not the server, is what is trusted).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..fsutil import fsync_dir, fsync_file
from ..bundle import BundleError, semver_key, verify_bundle
from ..security import TrustedKeys
from .errors import BundleRejectedError, ModelNotFoundError, UploadTooLargeError, VersionConflictError
from .models import ModelVersion
from .timeutil import utcnow

log = logging.getLogger(__name__)

INCOMING = ".incoming"
DEFAULT_VARIANT = "default"


def bundle_url(name: str, version: str, variant: str | None = None) -> str:
    """Where devices fetch a version (``?variant=`` for a variant other than "default"), relative to the base URL."""
    url = f"/api/v1/models/{name}/{version}/bundle"
    return url if variant in (None, DEFAULT_VARIANT) else f"{url}?variant={variant}"


def variant_name(manifest: dict[str, Any] | None) -> str:
    """The variant a manifest declares ("default" when it declares none)."""
    return str(((manifest or {}).get("variant") or {}).get("name") or DEFAULT_VARIANT)


@dataclass(frozen=True)
class StoreResult:
    version: ModelVersion
    created: bool  # False: an identical upload was already stored (idempotent re-upload)


class Registry:
    """Stores and finds bundles under ``bundles_dir``; metadata lives in the database."""

    def __init__(self, bundles_dir: Path, trusted: TrustedKeys, *, max_upload_bytes: int = 512 * 2**20) -> None:
        self.bundles_dir = Path(bundles_dir)
        self.trusted = trusted
        self.max_upload_bytes = max_upload_bytes
        self.tuf: Any = None  # control.tuf_service.TufService: every stored bundle becomes a signed TUF target
        self.incoming_dir.mkdir(parents=True, exist_ok=True)

    @property
    def incoming_dir(self) -> Path:
        # Same filesystem as the bundles, so the final move is an atomic rename.
        return self.bundles_dir / INCOMING

    # -- receiving -------------------------------------------------------------------------------

    async def spool(self, chunks: AsyncIterator[bytes]) -> Path:
        """Write an upload stream to a temporary file, refusing it beyond the size limit."""
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".ewb", dir=self.incoming_dir)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLargeError(
                            f"upload exceeds the {self.max_upload_bytes // 2**20} MB limit; "
                            "raise max_upload_mb in the server settings if this bundle is legitimate"
                        )
                    f.write(chunk)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def store(self, session: Session, upload: Path) -> StoreResult:
        """Verify ``upload`` and move it into the registry; the temporary file is consumed.

        The same name+version with the same bytes is accepted again (idempotent);
        with different bytes it is a :class:`VersionConflictError` (versions are immutable,
        devices and audit trails rely on a version meaning one thing).
        """
        upload = Path(upload)
        try:
            if len(self.trusted) == 0:
                raise BundleRejectedError(
                    "the server trusts no signing keys, so it accepts no bundles; "
                    "start it with --trust PATH/TO/signing.pub (or EDGEWISE_TRUST)"
                )
            try:
                verified = verify_bundle(upload, self.trusted)
            except BundleError as exc:
                msg = str(exc).replace(upload.name, "uploaded bundle")
                raise BundleRejectedError(f"bundle rejected ({type(exc).__name__}): {msg}") from None
            name, version = verified.manifest.name, verified.manifest.version
            variant = verified.manifest.variant.name if verified.manifest.variant is not None else DEFAULT_VARIANT
            existing = self.find(session, name, version, variant)
            if existing is not None:
                return StoreResult(self._same_or_conflict(existing, verified.sha256), created=False)

            target = self._target_path(session, name, version if variant == DEFAULT_VARIANT else f"{version}-{variant}",
                                       verified.sha256)
            row = ModelVersion(
                name=name,
                version=version,
                variant=variant,
                sha256=verified.sha256,
                size=verified.size,
                key_id=verified.key_id,
                manifest=verified.manifest.model_dump(mode="json"),
                path=str(target.relative_to(self.bundles_dir)),
                uploaded_at=utcnow(),
            )
            session.add(row)
            try:
                session.flush()  # the unique constraint decides a race between two uploads
            except IntegrityError:
                session.rollback()
                existing = self.find(session, name, version, variant)
                if existing is None:
                    raise
                return StoreResult(self._same_or_conflict(existing, verified.sha256), created=False)
            fsync_file(upload)
            os.replace(upload, target)
            try:
                session.commit()
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            fsync_dir(self.bundles_dir)
            log.info("stored bundle %s %s variant %s (%d bytes, key %s)", name, version, variant, row.size, row.key_id)
            self._publish_target(row)
            return StoreResult(row, created=True)
        finally:
            upload.unlink(missing_ok=True)

    def _publish_target(self, row: ModelVersion) -> None:
        """Sign the bundle into the TUF targets (a failure is repaired at the next start or deploy)."""
        if self.tuf is None:
            return
        try:
            self.tuf.register_bundle(row)
        except Exception as exc:  # the bundle is stored; deploy() and the next start register it again
            log.error("stored %s %s but could not publish it as a TUF target: %s", row.name, row.version, exc)

    @staticmethod
    def _same_or_conflict(existing: ModelVersion, sha256: str) -> ModelVersion:
        if existing.sha256 == sha256:
            return existing
        what = "" if existing.variant == DEFAULT_VARIANT else f" variant {existing.variant}"
        raise VersionConflictError(
            f"{existing.name} {existing.version}{what} is already stored with different content "
            f"(sha256 {existing.sha256[:16]}…, uploaded {sha256[:16]}…); versions are immutable: "
            "bump the version (or give the bundle another variant name) and upload again"
        )

    def _target_path(self, session: Session, name: str, version: str, sha256: str) -> Path:
        target = self.bundles_dir / f"{name}-{version}.ewb"
        # "a" + "1.0.0-1.0.0" and "a-1.0.0" + "1.0.0" share a file name; never overwrite another row's file.
        taken = session.scalar(select(ModelVersion.id).where(ModelVersion.path == target.name))
        if taken is not None or target.exists():
            target = self.bundles_dir / f"{name}-{version}-{sha256[:12]}.ewb"
        return target

    # -- finding ---------------------------------------------------------------------------------

    @staticmethod
    def find(session: Session, name: str, version: str, variant: str | None = None) -> ModelVersion | None:
        """One stored variant; ``variant=None`` means the "default" variant, else the first uploaded one
        (callers that do not know about variants keep getting one row; ``control.variants`` chooses per device)."""
        q = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
        if variant is not None:
            return session.scalar(q.where(ModelVersion.variant == variant))
        rows = session.scalars(q.order_by(ModelVersion.id)).all()
        return next((r for r in rows if r.variant == DEFAULT_VARIANT), rows[0] if rows else None)

    @staticmethod
    def get(session: Session, name: str, version: str, variant: str | None = None) -> ModelVersion:
        row = Registry.find(session, name, version, variant)
        if row is None:
            if variant is not None and Registry.find(session, name, version) is not None:
                known_variants = [r.variant for r in Registry.variants(session, name, version)]
                raise ModelNotFoundError(
                    f"model {name} {version} has no variant {variant!r}; its variants: {', '.join(known_variants)}"
                )
            known = Registry.versions(session, name)
            hint = (
                f"known versions: {', '.join(dict.fromkeys(v.version for v in known))}"
                if known
                else "upload it first: POST /api/v1/models"
            )
            raise ModelNotFoundError(f"model {name} {version} not found; {hint}")
        return row

    @staticmethod
    def variants(session: Session, name: str, version: str) -> list[ModelVersion]:
        """Every stored variant of one version, oldest upload first (empty when the version is unknown)."""
        return list(session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                                    .order_by(ModelVersion.id)).all())

    @staticmethod
    def versions(session: Session, name: str) -> list[ModelVersion]:
        """All versions of one model (one row per variant), oldest first by semantic-version precedence."""
        rows = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).all()
        return _semver_sorted(rows)

    @staticmethod
    def all_versions(session: Session) -> list[ModelVersion]:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.name)).all()
        return sorted(_semver_sorted(rows), key=lambda r: r.name)

    def path(self, session: Session, name: str, version: str, variant: str | None = None) -> Path:
        """The stored file of a version (variant), for download."""
        row = self.get(session, name, version, variant)
        p = self.bundles_dir / row.path
        if not p.is_file():
            raise ModelNotFoundError(
                f"model {name} {version} is registered but its file {p} is missing from the data directory; "
                "restore it from a backup or re-upload the bundle"
            )
        return p


def _semver_sorted(rows: Iterable[ModelVersion]) -> list[ModelVersion]:
    return sorted(rows, key=lambda r: (semver_key(r.version), r.id or 0))


