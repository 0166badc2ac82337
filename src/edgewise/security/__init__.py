"""Keys, signing and trust. Everything that decides trust lives in this package."""

from .keys import FileSigner, KeyFileError, Signer, TrustedKeys, generate_keypair, key_id, load_public_key, load_signer

__all__ = ["FileSigner", "KeyFileError", "Signer", "TrustedKeys", "generate_keypair", "key_id", "load_public_key", "load_signer"]
