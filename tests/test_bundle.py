"""Bundles: built once, verified before anything in them is trusted."""

import json
import zipfile

import pytest

from edgewise.bundle import (
    BundleError,
    BundleFormatError,
    BundleMemberError,
    BundleSignatureError,
    build_bundle,
    read_manifest,
    semver_key,
    verify_bundle,
)
from edgewise.bundle import format as fmt
from edgewise.security import TrustedKeys, load_signer


def test_manifest_describes_model_io_hashes_and_requirements(bundles, trusted):
    vb = verify_bundle(bundles["1.0.0"], trusted)
    m = vb.manifest
    assert (m.name, m.version) == ("digits", "1.0.0")
    assert [(t.name, t.dtype, t.shape) for t in m.model.inputs] == [("x", "float32", [None, 64])]
    assert {t.name for t in m.model.outputs} == {"label", "probabilities"}
    assert m.model.opset["ai.onnx"] >= 13
    assert m.labels == [str(i) for i in range(10)]
    assert m.preprocessing.steps and m.requirements.min_ram_mb > 0
    assert set(m.members) == {"model.onnx", "golden.npz"} and len(m.members["model.onnx"].sha256) == 64
    assert m.golden is not None and m.golden.samples == 16
    assert m.created_at.tzinfo is not None


def test_bundle_is_a_plain_zip_any_tool_can_open(bundles):
    with zipfile.ZipFile(bundles["1.0.0"]) as zf:
        assert sorted(zf.namelist()) == ["golden.npz", "manifest.json", "model.onnx"]
        assert json.loads(zf.read("manifest.json"))["name"] == "digits"


def test_same_inputs_give_the_same_bytes(tmp_path, digits_models, signer):
    from datetime import datetime, timezone

    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for n in ("a", "b"):
        build_bundle(digits_models["logreg"], name="d", version="1.0.0", signer=signer, out=tmp_path / n, created_at=when)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_every_flipped_byte_anywhere_fails_verification(tmp_path, bundles, trusted):
    data = bundles["1.0.0"].read_bytes()
    target = tmp_path / "x.ewb"
    step = max(1, len(data) // 1500)
    positions = sorted(set(range(0, len(data), step)) | set(range(len(data) - 200, len(data))))
    for i in positions:
        bad = bytearray(data)
        bad[i] ^= 0x01
        target.write_bytes(bad)
        with pytest.raises(BundleError):
            verify_bundle(target, trusted)


def test_altered_model_bytes_name_the_member(tmp_path, bundles, trusted):
    data = bytearray(bundles["1.0.0"].read_bytes())
    with zipfile.ZipFile(bundles["1.0.0"]) as zf:
        info = zf.getinfo("model.onnx")
    offset = info.header_offset + 30 + len("model.onnx") + 100
    data[offset] ^= 0xFF
    (tmp_path / "x.ewb").write_bytes(data)
    with pytest.raises(BundleMemberError, match="model.onnx"):
        verify_bundle(tmp_path / "x.ewb", trusted)


def test_missing_member_is_named(tmp_path, bundles, trusted):
    src = zipfile.ZipFile(bundles["1.0.0"])
    out = tmp_path / "x.ewb"
    with zipfile.ZipFile(out, "w") as zf:
        for name in src.namelist():
            if name != "model.onnx":
                zf.writestr(name, src.read(name))
        zf.comment = src.comment
    with pytest.raises(BundleMemberError, match="'model.onnx' listed in the manifest is missing"):
        verify_bundle(out, trusted)


def test_unlisted_extra_member_is_named(tmp_path, bundles, trusted):
    out = tmp_path / "x.ewb"
    out.write_bytes(bundles["1.0.0"].read_bytes())
    comment = zipfile.ZipFile(out).comment
    with zipfile.ZipFile(out, "a") as zf:
        zf.writestr("payload.sh", b"rm -rf /")
        zf.comment = comment
    with pytest.raises(BundleMemberError, match="payload.sh"):
        verify_bundle(out, trusted)


def test_wrong_key_is_named(bundles, keys_dir):
    other = TrustedKeys.from_paths([keys_dir / "other.pub"])
    signer_id = load_signer(keys_dir / "signing.key").key_id
    with pytest.raises(BundleSignatureError, match=f"signed by key {signer_id}, which is not trusted"):
        verify_bundle(bundles["1.0.0"], other)


def test_unsigned_archive_is_refused(tmp_path, bundles, trusted):
    out = tmp_path / "x.ewb"
    src = zipfile.ZipFile(bundles["1.0.0"])
    with zipfile.ZipFile(out, "w") as zf:
        for n in src.namelist():
            zf.writestr(n, src.read(n))
    with pytest.raises(BundleSignatureError, match="no edgewise signature block"):
        verify_bundle(out, trusted)


def test_truncated_file_is_refused(tmp_path, bundles, trusted):
    out = tmp_path / "x.ewb"
    out.write_bytes(bundles["1.0.0"].read_bytes()[:40])
    with pytest.raises(BundleFormatError, match="too short"):
        verify_bundle(out, trusted)


def test_not_a_file_is_a_clear_error(tmp_path, trusted):
    with pytest.raises(BundleFormatError, match="cannot open"):
        verify_bundle(tmp_path / "missing.ewb", trusted)


def test_manifest_can_be_read_without_trust_for_inspection(bundles):
    manifest, sig = read_manifest(bundles["1.1.0"])
    assert manifest.version == "1.1.0" and sig is not None and len(sig.key_id) == 16


def test_signature_block_is_the_last_bytes_of_the_file(bundles):
    data = bundles["1.0.0"].read_bytes()
    assert data[-fmt.BLOCK_LEN :].startswith(fmt.MAGIC)


def test_non_semver_versions_are_refused(tmp_path, digits_models, signer):
    with pytest.raises(BundleError, match="semantic version"):
        build_bundle(digits_models["logreg"], name="d", version="v1", signer=signer, out=tmp_path / "x.ewb")


def test_a_file_that_is_not_onnx_cannot_be_bundled(tmp_path, signer):
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        build_bundle(b"not a model", name="d", version="1.0.0", signer=signer, out=tmp_path / "x.ewb")
    assert not (tmp_path / "x.ewb").exists()


def test_semver_precedence_orders_prereleases_first():
    versions = ["1.0.0", "1.0.0-rc.1", "1.0.0-alpha", "0.9.9", "1.10.0", "1.2.0"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]
