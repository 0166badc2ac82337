"""File-backed Ed25519 keys."""

import os
import stat

import pytest

from edgewise.security import KeyFileError, TrustedKeys, generate_keypair, load_public_key, load_signer


def test_generated_private_key_is_readable_by_owner_only(tmp_path):
    generate_keypair(tmp_path / "k.key")
    mode = stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode)
    assert mode == 0o600


def test_key_id_is_stable_between_private_and_public_halves(tmp_path):
    kid = generate_keypair(tmp_path / "k.key")
    assert load_signer(tmp_path / "k.key").key_id == kid
    assert kid in TrustedKeys([load_public_key(tmp_path / "k.pub")])


def test_generate_refuses_to_overwrite_without_force(tmp_path):
    generate_keypair(tmp_path / "k.key")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "k.key")


def test_garbage_key_file_is_a_clear_error(tmp_path):
    (tmp_path / "k.key").write_text("hello")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_signer(tmp_path / "k.key")


def test_trust_accepts_a_directory_of_public_keys(tmp_path):
    a = generate_keypair(tmp_path / "a.key")
    b = generate_keypair(tmp_path / "b.key")
    (tmp_path / "a.key").unlink()
    (tmp_path / "b.key").unlink()
    assert TrustedKeys.from_paths([tmp_path]).ids == sorted([a, b])
