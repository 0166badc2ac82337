class BundleError(ValueError):
    """A bundle that must not be loaded. The message names what failed."""


class BundleFormatError(BundleError):
    """Not a readable bundle: truncated, not an archive, no signature block."""


class BundleManifestError(BundleError):
    """manifest.json is missing or does not follow the schema."""


class BundleMemberError(BundleError):
    """A member is missing, unlisted, or does not match its hash."""


class BundleSignatureError(BundleError):
    """Unsigned, signed by an untrusted key, or altered after signing."""
