"""Keys, signing and trust. Everything that decides trust lives in this package."""

from .keys import FileSigner, KeyFileError, Signer, TrustedKeys, generate_keypair, key_id, load_public_key, load_signer
from .encryption import EncryptionError, RowSealer, open_sealed, seal_bytes, seal_file
from .keystore import FileKeystore, Keystore, KeystoreError, KeyNotFound, NotExtractable, open_keystore

__all__ = ["FileSigner", "KeyFileError", "Signer", "TrustedKeys", "generate_keypair", "key_id", "load_public_key", "load_signer",
           "EncryptionError", "RowSealer", "open_sealed", "seal_bytes", "seal_file",
           "FileKeystore", "Keystore", "KeystoreError", "KeyNotFound", "NotExtractable", "open_keystore"]
