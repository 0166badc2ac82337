"""The model registry as plain functions: only verified bundles get in, versions are immutable."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from edgewise.bundle import build_bundle
from edgewise.control.db import init_db
from edgewise.control.errors import BundleRejectedError, ModelNotFoundError, UploadTooLargeError, VersionConflictError
from edgewise.control.registry import Registry
from edgewise.security import TrustedKeys, load_signer


@pytest.fixture()
def db(tmp_path, db_url):
    d = init_db(db_url)
    yield d
    d.dispose()


@pytest.fixture()
def registry(tmp_path, trusted):
    return Registry(tmp_path / "bundles", trusted)


def _upload(src, tmp_path):
    """A copy standing in for a spooled upload (the registry consumes it)."""
    dst = tmp_path / f"upload-{src.name}"
    shutil.copyfile(src, dst)
    return dst


def _stored_files(registry):
    return sorted(p.name for p in registry.bundles_dir.glob("*.ewb"))


def test_a_verified_bundle_is_stored_under_its_name_and_version(db, registry, bundles, tmp_path):
    with db.session() as s:
        result = registry.store(s, _upload(bundles["1.0.0"], tmp_path))
        assert result.created
        assert (result.version.name, result.version.version) == ("digits", "1.0.0")
        assert registry.path(s, "digits", "1.0.0").read_bytes() == bundles["1.0.0"].read_bytes()
    assert _stored_files(registry) == ["digits-1.0.0.ewb"]


def test_versions_are_listed_in_semver_order(db, registry, bundles, tmp_path):
    with db.session() as s:
        for v in ("1.1.0", "1.0.0"):
            registry.store(s, _upload(bundles[v], tmp_path))
        assert [mv.version for mv in Registry.versions(s, "digits")] == ["1.0.0", "1.1.0"]


def test_identical_reupload_is_accepted_without_a_second_copy(db, registry, bundles, tmp_path):
    with db.session() as s:
        registry.store(s, _upload(bundles["1.0.0"], tmp_path))
        again = registry.store(s, _upload(bundles["1.0.0"], tmp_path))
    assert not again.created
    assert _stored_files(registry) == ["digits-1.0.0.ewb"]


def test_same_version_with_different_bytes_is_a_conflict(db, registry, bundles, digits_models, signer, tmp_path):
    other = tmp_path / "other.ewb"
    build_bundle(digits_models["mlp"], name="digits", version="1.0.0", signer=signer, out=other)
    with db.session() as s:
        registry.store(s, _upload(bundles["1.0.0"], tmp_path))
        with pytest.raises(VersionConflictError, match="digits 1.0.0 is already stored with different content"):
            registry.store(s, _upload(other, tmp_path))
        assert registry.path(s, "digits", "1.0.0").read_bytes() == bundles["1.0.0"].read_bytes()


def test_bundle_signed_by_an_unknown_key_is_rejected_naming_the_key(db, registry, digits_models, keys_dir, tmp_path):
    stranger = load_signer(keys_dir / "other.key")
    path = tmp_path / "stranger.ewb"
    build_bundle(digits_models["logreg"], name="digits", version="9.0.0", signer=stranger, out=path)
    with db.session() as s, pytest.raises(BundleRejectedError, match=f"signed by key {stranger.key_id}.*not trusted"):
        registry.store(s, _upload(path, tmp_path))
    assert _stored_files(registry) == []
    assert list(registry.incoming_dir.iterdir()) == []


def test_corrupt_bundle_is_rejected_and_leaves_nothing_behind(db, registry, bundles, tmp_path):
    data = bytearray(bundles["1.0.0"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "corrupt.ewb"
    path.write_bytes(bytes(data))
    with db.session() as s, pytest.raises(BundleRejectedError, match="bundle rejected"):
        registry.store(s, _upload(path, tmp_path))
    with db.session() as s:
        assert Registry.all_versions(s) == []
    assert _stored_files(registry) == [] and list(registry.incoming_dir.iterdir()) == []


def test_server_without_trusted_keys_refuses_uploads_and_says_how_to_fix_it(db, bundles, tmp_path):
    registry = Registry(tmp_path / "bundles", TrustedKeys())
    with db.session() as s, pytest.raises(BundleRejectedError, match="--trust"):
        registry.store(s, _upload(bundles["1.0.0"], tmp_path))


def test_unknown_version_is_not_found_and_lists_the_known_ones(db, registry, bundles, tmp_path):
    with db.session() as s:
        registry.store(s, _upload(bundles["1.0.0"], tmp_path))
        with pytest.raises(ModelNotFoundError, match="digits 2.0.0 not found; known versions: 1.0.0"):
            Registry.get(s, "digits", "2.0.0")


def test_spooling_an_upload_beyond_the_limit_is_refused_and_cleaned_up(tmp_path, trusted):
    registry = Registry(tmp_path / "bundles", trusted, max_upload_bytes=1000)

    async def chunks():
        for _ in range(5):
            yield b"x" * 300

    with pytest.raises(UploadTooLargeError, match="limit"):
        asyncio.run(registry.spool(chunks()))
    assert list(registry.incoming_dir.iterdir()) == []
