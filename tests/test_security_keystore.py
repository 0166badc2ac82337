"""The keystore behaviour suite, run against both backends (0600 files and a real SoftHSM2 token through PKCS#11)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.security.keystore import FileKeystore, KeyNotFound, KeystoreError, NotExtractable, open_keystore


@pytest.fixture(params=["file", "pkcs11"])
def store(request, tmp_path):
    """(keystore, url) for each backend; PKCS#11 keys get unique labels because the token lives for the whole session."""
    if request.param == "file":
        url = f"file:{tmp_path / 'keys'}"
    else:
        url = request.getfixturevalue("softhsm")["url"]
    return open_keystore(url), url


def _label(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_an_ec_p256_signature_made_in_the_keystore_verifies_with_cryptography_outside_it(store):
    ks, _ = store
    label = _label("identity")
    ks.create_key(label, "ec-p256")
    sig = ks.sign(label, b"device enrollment CSR bytes")
    pub = ks.public_key(label)
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    pub.verify(sig, b"device enrollment CSR bytes", ec.ECDSA(hashes.SHA256()))  # DER, as X.509/TLS expect
    with pytest.raises(InvalidSignature):
        pub.verify(sig, b"other bytes", ec.ECDSA(hashes.SHA256()))


def test_an_ed25519_signature_made_in_the_keystore_verifies_outside_it(store):
    ks, _ = store
    label = _label("signing")
    ks.create_key(label, "ed25519")
    sig = ks.sign(label, b"metadata")
    pub = ks.public_key(label)
    assert isinstance(pub, Ed25519PublicKey)
    pub.verify(sig, b"metadata")


def test_wrap_and_unwrap_round_trip_a_data_key(store):
    ks, _ = store
    label = _label("storage")
    ks.create_key(label, "aes-256")
    data_key = os.urandom(32)
    wrapped = ks.wrap(label, data_key, b"model;device=d1;slot=a")
    assert data_key not in wrapped
    assert ks.unwrap(label, wrapped, b"model;device=d1;slot=a") == data_key


def test_unwrap_with_other_associated_data_is_refused_with_a_clear_error(store):
    ks, _ = store
    label = _label("storage")
    ks.create_key(label, "aes-256")
    wrapped = ks.wrap(label, os.urandom(32), b"slot=a")
    with pytest.raises(KeystoreError, match="cannot unwrap .*wrong key, or the wrapped key or its context was altered"):
        ks.unwrap(label, wrapped, b"slot=b")


@pytest.mark.parametrize("where", [0, 15, -1])  # nonce, ciphertext, tag
def test_an_altered_wrapped_key_is_refused(store, where):
    ks, _ = store
    label = _label("storage")
    ks.create_key(label, "aes-256")
    wrapped = bytearray(ks.wrap(label, os.urandom(32), b"ctx"))
    wrapped[where] ^= 0x01
    with pytest.raises(KeystoreError, match="cannot unwrap"):
        ks.unwrap(label, bytes(wrapped), b"ctx")


def test_a_wrapped_key_does_not_unwrap_with_another_storage_key(store):
    ks, _ = store
    a, b = _label("storage"), _label("storage")
    ks.create_key(a, "aes-256")
    ks.create_key(b, "aes-256")
    with pytest.raises(KeystoreError, match="cannot unwrap"):
        ks.unwrap(b, ks.wrap(a, os.urandom(32), b"ctx"), b"ctx")


def test_creating_an_existing_label_is_refused_and_keeps_the_key(store):
    ks, _ = store
    label = _label("identity")
    ks.create_key(label, "ec-p256")
    before = ks.public_key(label).public_numbers()
    with pytest.raises(KeystoreError, match="already exists"):
        ks.create_key(label, "ec-p256")
    assert ks.public_key(label).public_numbers() == before


def test_an_unknown_label_is_a_key_not_found_error_naming_it(store):
    ks, _ = store
    assert not ks.has_key("no-such-key")
    with pytest.raises(KeyNotFound, match="no-such-key"):
        ks.sign("no-such-key", b"x")


def test_keys_survive_reopening_the_keystore_in_another_process(store):
    ks, url = store
    label = _label("identity")
    ks.create_key(label, "ec-p256")
    storage = _label("storage")
    ks.create_key(storage, "aes-256")
    wrapped = ks.wrap(storage, b"k" * 32, b"ctx")
    code = (
        "import sys\nfrom edgewise.security.keystore import open_keystore\n"
        "ks = open_keystore(sys.argv[1])\n"
        "assert ks.unwrap(sys.argv[3], bytes.fromhex(sys.argv[4]), b'ctx') == b'k' * 32\n"
        "sys.stdout.write(ks.sign(sys.argv[2], b'from another process').hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, url, label, storage, wrapped.hex()],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    ks.public_key(label).verify(bytes.fromhex(out.stdout), b"from another process", ec.ECDSA(hashes.SHA256()))


def test_file_keystore_files_are_0600_in_a_0700_folder(tmp_path):
    ks = FileKeystore(tmp_path / "keys")
    for label, kind in (("identity", "ec-p256"), ("signing", "ed25519"), ("storage", "aes-256")):
        ks.create_key(label, kind)
        assert stat.S_IMODE((tmp_path / "keys" / f"{label}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


# -- what only a token does: the keys cannot be read out --------------------------------------------


@pytest.mark.parametrize("kind", ["ec-p256", "ed25519", "aes-256"])
def test_a_token_key_is_sensitive_and_never_extractable_by_the_tokens_own_attributes(softhsm, kind):
    ks = open_keystore(softhsm["url"])
    label = _label(kind)
    ks.create_key(label, kind)
    assert ks.protection(label) == {
        "token": True, "private": True, "sensitive": True, "extractable": False,
        "always_sensitive": True, "never_extractable": True,
    }
    with pytest.raises(NotExtractable, match="sensitive and not extractable"):
        ks.private_key(label)


def test_the_token_refuses_to_reveal_or_wrap_out_the_private_and_the_storage_key(softhsm):
    """Straight to the token, bypassing our keystore: CKA_VALUE reads and C_WrapKey are both refused."""
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as pe

    ks = open_keystore(softhsm["url"])
    ident, storage = _label("identity"), _label("storage")
    ks.create_key(ident, "ec-p256")
    ks.create_key(storage, "aes-256")
    from edgewise.security.pkcs11 import _load_lib

    token = _load_lib(softhsm["module"]).get_token(token_label=softhsm["token"])
    with token.open(rw=True) as session:  # the process is logged in already (PKCS#11 logins are per application)
        priv = session.get_key(ObjectClass.PRIVATE_KEY, label=ident)
        secret = session.get_key(ObjectClass.SECRET_KEY, label=storage)
        for key in (priv, secret):
            with pytest.raises(pe.AttributeSensitive):
                key[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, label=_label("wrapper"), store=False,
                                       template={Attribute.WRAP: True, Attribute.ENCRYPT: True})
        for key in (priv, secret):
            with pytest.raises((pe.KeyUnextractable, pe.KeyNotWrappable, pe.MechanismInvalid)):
                wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_a_pin_in_the_url_is_refused(softhsm):
    with pytest.raises(KeystoreError, match="PIN in the URL is refused"):
        open_keystore(f"pkcs11:module={softhsm['module']};token=edgewise;pin-value=1234")


def test_a_missing_module_names_the_path_and_how_to_install_it():
    with pytest.raises(KeystoreError, match=r"/nonexistent/libsofthsm2.so does not exist; install it"):
        open_keystore("pkcs11:module=/nonexistent/libsofthsm2.so;token=edgewise;pin-env=EDGEWISE_PKCS11_PIN")


def test_a_missing_token_lists_the_tokens_there_are(softhsm):
    with pytest.raises(KeystoreError, match=r"no token labelled 'nope' \(tokens: \['edgewise'\]\)"):
        open_keystore(f"pkcs11:module={softhsm['module']};token=nope;pin-env=EDGEWISE_PKCS11_PIN")


def test_an_unset_pin_variable_is_named(softhsm):
    with pytest.raises(KeystoreError, match=r"\$EDGEWISE_NO_SUCH_PIN is not set"):
        open_keystore(f"pkcs11:module={softhsm['module']};token=edgewise;pin-env=EDGEWISE_NO_SUCH_PIN")


def test_a_pin_file_works_and_a_missing_one_is_named(softhsm, tmp_path):
    pin = tmp_path / "pin"
    pin.write_text(softhsm["pin"] + "\n")
    assert open_keystore(f"pkcs11:module={softhsm['module']};token=edgewise;pin-file={pin}").has_key("none") is False
    with pytest.raises(KeystoreError, match="cannot read the PIN file"):
        open_keystore(f"pkcs11:module={softhsm['module']};token=edgewise;pin-file={tmp_path / 'missing'}")
