"""Encryption at rest: one test per attack on the chunked model format and on sealed outbox rows."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.security.encryption import (
    EncryptionError,
    RowSealer,
    iter_chunks,
    load_or_replace_data_key,
    open_sealed,
    parse_header,
    seal_bytes,
    seal_file,
)
from edgewise.security.keystore import FileKeystore, open_keystore

CTX = "edgewise-model/1;device=dev-enc;slot=a"
CHUNK = 64
PLAIN = bytes(range(256)) * 3 + b"tail"  # 772 bytes = 12 full chunks + 4 bytes: 13 chunks


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    store = FileKeystore(tmp_path_factory.mktemp("enc") / "keys")
    store.create_key("storage", "aes-256")
    return store


@pytest.fixture(scope="module")
def sealed(ks) -> bytes:
    return seal_bytes(PLAIN, keystore=ks, key_label="storage", context=CTX, chunk_size=CHUNK)


def _open(data: bytes, ks) -> bytes:
    return open_sealed(data, keystore=ks, context=CTX)


def test_sealed_data_opens_to_the_plaintext_and_does_not_contain_it(ks, sealed):
    assert _open(sealed, ks) == PLAIN
    assert PLAIN[100:132] not in sealed
    assert len(list(iter_chunks(sealed))) == 13


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK])
def test_every_size_round_trips_including_empty_and_exact_chunk_multiples(ks, size):
    data = os.urandom(size)
    assert _open(seal_bytes(data, keystore=ks, key_label="storage", context=CTX, chunk_size=CHUNK), ks) == data


def test_a_file_is_sealed_durably_with_mode_0600_and_opens_from_disk(ks, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(PLAIN)
    dest = tmp_path / "bundle.ewb"
    seal_file(src, dest, keystore=ks, key_label="storage", context=CTX, chunk_size=CHUNK)
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "bundle.ewb.part").exists()
    assert open_sealed(dest, keystore=ks, context=CTX) == PLAIN


def test_a_bit_flip_in_a_chunk_is_detected_naming_the_chunk(ks, sealed):
    start, _ = list(iter_chunks(sealed))[7]
    bad = bytearray(sealed)
    bad[start + 10] ^= 0x04
    with pytest.raises(EncryptionError, match=r"bit flip or tampering in chunk #7 \(0-based\) of 13"):
        _open(bytes(bad), ks)


def test_truncation_inside_a_chunk_is_detected(ks, sealed):
    start, _ = list(iter_chunks(sealed))[5]
    with pytest.raises(EncryptionError, match=r"truncated inside a chunk: .*chunks from #5"):
        _open(sealed[: start + 20], ks)


def test_truncation_at_a_chunk_boundary_is_detected(ks, sealed):
    start, _ = list(iter_chunks(sealed))[5]
    with pytest.raises(EncryptionError, match=r"truncated at a chunk boundary: .*chunks from #5"):
        _open(sealed[:start], ks)


def test_cutting_the_last_chunk_and_fixing_the_size_in_the_header_still_fails(ks, sealed):
    """Even with the length check defeated (a forged header), the header tag and the final-chunk flag catch it."""
    chunks = list(iter_chunks(sealed))
    hdr = parse_header(sealed)
    forged = bytearray(sealed[: chunks[-1][0]])
    forged[11:19] = (12 * CHUNK).to_bytes(8, "big")  # size field: 12 full chunks
    with pytest.raises(EncryptionError, match="header altered"):
        _open(bytes(forged), ks)
    assert hdr.chunks == 13


def test_reordered_chunks_are_detected_naming_both_positions(ks, sealed):
    c = list(iter_chunks(sealed))
    (a0, a1), (b0, b1) = c[3], c[4]
    swapped = sealed[:a0] + sealed[b0:b1] + sealed[a0:a1] + sealed[b1:]
    with pytest.raises(EncryptionError, match="chunks reordered: chunk #3 holds chunk #4's data"):
        _open(swapped, ks)


def test_a_chunk_spliced_from_another_file_sealed_with_the_same_key_is_detected(ks, sealed):
    other = seal_bytes(PLAIN, keystore=ks, key_label="storage", context=CTX, chunk_size=CHUNK)
    s0, s1 = list(iter_chunks(sealed))[2]
    spliced = sealed[:s0] + other[s0:s1] + sealed[s1:]
    with pytest.raises(EncryptionError, match="chunk #2"):
        _open(spliced, ks)


def test_an_altered_header_is_detected(ks, sealed):
    bad = bytearray(sealed)
    bad[8] ^= 0x01  # chunk size field
    with pytest.raises(EncryptionError, match="header altered"):
        _open(bytes(bad), ks)


def test_appended_bytes_are_detected(ks, sealed):
    with pytest.raises(EncryptionError, match="unexpected bytes after the last chunk"):
        _open(sealed + b"\0", ks)


def test_a_wrong_storage_key_is_reported_as_a_wrong_key(sealed, tmp_path):
    other = FileKeystore(tmp_path / "other")
    other.create_key("storage", "aes-256")
    with pytest.raises(EncryptionError, match="wrong key: the storage key 'storage' .* cannot unwrap"):
        open_sealed(sealed, keystore=other, context=CTX)


def test_a_file_moved_to_another_slot_or_device_is_refused_even_with_the_right_key(ks, sealed):
    with pytest.raises(EncryptionError, match="sealed for .*slot=a.*, not .*slot=b.*moved from another device, slot or purpose"):
        open_sealed(sealed, keystore=ks, context=CTX.replace("slot=a", "slot=b"))


def test_a_forged_context_in_the_header_does_not_unwrap(ks, sealed):
    """Rewriting the header's context to match the reader's makes the key unwrap (bound to the context) fail."""
    hdr = parse_header(sealed)
    new_ctx = CTX.replace("slot=a", "slot=b").encode()
    old = len(CTX).to_bytes(2, "big") + CTX.encode()
    assert sealed.count(old) == 1 and len(new_ctx) == len(CTX)
    forged = sealed.replace(old, len(new_ctx).to_bytes(2, "big") + new_ctx)
    with pytest.raises(EncryptionError, match="wrong key"):
        open_sealed(forged, keystore=ks, context=CTX.replace("slot=a", "slot=b"))
    assert hdr.context == CTX


def test_not_a_sealed_file_is_named_as_such(ks):
    with pytest.raises(EncryptionError, match="not an edgewise encrypted file"):
        _open(b"PK\x03\x04 a plain zip", ks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_flipped_byte_anywhere_is_detected(ks, sealed, data):
    pos = data.draw(st.integers(0, len(sealed) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    bad = bytearray(sealed)
    bad[pos] ^= mask
    with pytest.raises(EncryptionError):
        _open(bytes(bad), ks)


def test_sealing_and_opening_work_with_a_storage_key_in_a_pkcs11_token(softhsm):
    token = open_keystore(softhsm["url"])
    if not token.has_key("enc-test-storage"):
        token.create_key("enc-test-storage", "aes-256")
    data = os.urandom(3 * CHUNK + 5)
    sealed = seal_bytes(data, keystore=token, key_label="enc-test-storage", context=CTX, chunk_size=CHUNK)
    assert open_sealed(sealed, keystore=token, context=CTX) == data
    bad = bytearray(sealed)
    bad[-3] ^= 1
    with pytest.raises(EncryptionError, match="chunk #3"):
        open_sealed(bytes(bad), keystore=token, context=CTX)


# -- outbox rows ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(ks, tmp_path_factory):
    key, _ = load_or_replace_data_key(ks, "storage", tmp_path_factory.mktemp("rows") / "outbox.key", "outbox;device=dev-1")
    return key


def test_a_sealed_row_opens_for_its_device_and_seq_and_hides_the_payload(rows):
    sealer = RowSealer(rows, "dev-1")
    payload = b'\x85\xa4type\xa9telemetry secret reading 42.125'
    row = sealer.seal(7, payload)
    assert payload not in row and row[:1] == b"\xc1"
    assert sealer.open(7, row) == payload


def test_rows_swapped_between_sequence_numbers_are_detected(rows):
    sealer = RowSealer(rows, "dev-1")
    r7, r8 = sealer.seal(7, b"seven"), sealer.seal(8, b"eight")
    with pytest.raises(EncryptionError, match="outbox row seq 8 of device 'dev-1' failed authentication: .*swapped"):
        sealer.open(8, r7)
    with pytest.raises(EncryptionError, match="seq 7"):
        sealer.open(7, r8)


def test_a_row_moved_to_another_devices_outbox_is_detected(rows):
    row = RowSealer(rows, "dev-1").seal(7, b"dev-1's reading")
    with pytest.raises(EncryptionError, match="device 'dev-2'"):
        RowSealer(rows, "dev-2").open(7, row)


def test_a_row_sealed_with_another_key_is_detected(rows):
    row = RowSealer(rows, "dev-1").seal(7, b"x")
    with pytest.raises(EncryptionError, match="sealed with another key"):
        RowSealer(os.urandom(32), "dev-1").open(7, row)


def test_a_bit_flip_in_a_row_is_detected(rows):
    row = bytearray(RowSealer(rows, "dev-1").seal(7, b"reading"))
    row[20] ^= 0x80
    with pytest.raises(EncryptionError, match="altered"):
        RowSealer(rows, "dev-1").open(7, bytes(row))


def test_the_outbox_data_key_is_stored_wrapped_0600_and_replaced_when_the_storage_key_changes(tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    ks.create_key("storage", "aes-256")
    path = tmp_path / "outbox.key"
    key, moved = load_or_replace_data_key(ks, "storage", path, "outbox;device=d")
    assert moved is None and key not in path.read_bytes() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_replace_data_key(ks, "storage", path, "outbox;device=d") == (key, None)
    (tmp_path / "keys" / "storage.key").unlink()
    ks.create_key("storage", "aes-256")  # a new storage key: the old data key no longer unwraps
    new, moved = load_or_replace_data_key(ks, "storage", path, "outbox;device=d")
    assert new != key and moved is not None and moved.name.startswith("outbox.key.unreadable-")


# -- large data: the huge-page plaintext buffer and the copy ONNX Runtime gets ------------------------


def test_a_large_sealed_file_decrypts_into_memory_with_the_digest_of_its_prefix(ks, tmp_path):
    from edgewise.security.encryption import open_sealed_digest

    data = os.urandom(9 << 20)  # above the size that goes into an anonymous (huge-page) map
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    seal_file(src, tmp_path / "big.ewb", keystore=ks, key_label="storage", context=CTX)
    plain, digest = open_sealed_digest(tmp_path / "big.ewb", keystore=ks, context=CTX, digest_tail=64)
    import hashlib

    assert plain == data
    assert digest.result().digest() == hashlib.sha256(data[:-64]).digest()


def test_copy_to_bytes_returns_an_independent_bytes_object_equal_to_the_source():
    import mmap

    from edgewise.security.encryption import copy_to_bytes

    data = os.urandom((6 << 20) + 3)
    buf = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[:] = data
    view = memoryview(buf)[5 : len(data) - 7]
    out = copy_to_bytes(view)
    assert type(out) is bytes and out == data[5:-7] and hash(out) == hash(data[5:-7])
    view[:4] = b"\0\0\0\0"  # the source changes afterwards; the copy does not
    assert out[:4] == data[5:9]
    view.release()
    buf.close()
    assert copy_to_bytes(b"small") == b"small" and copy_to_bytes(bytearray(data)) == data
