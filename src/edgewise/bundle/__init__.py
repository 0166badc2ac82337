"""The unit that travels: a signed archive of model, manifest and preprocessing."""

from .build import build_bundle, describe_model
from .errors import BundleError, BundleFormatError, BundleManifestError, BundleMemberError, BundleSignatureError
from .manifest import FORMAT, GOLDEN_MEMBER, Golden, Manifest, RuntimeSettings, TensorSpec, Variant, check_semver, semver_key
from .verify import SignatureInfo, VerifiedBundle, read_manifest, sha256_file, verify_bundle

__all__ = [
    "FORMAT",
    "GOLDEN_MEMBER",
    "Golden",
    "BundleError",
    "BundleFormatError",
    "BundleManifestError",
    "BundleMemberError",
    "BundleSignatureError",
    "Manifest",
    "RuntimeSettings",
    "Variant",
    "SignatureInfo",
    "TensorSpec",
    "VerifiedBundle",
    "build_bundle",
    "check_semver",
    "describe_model",
    "read_manifest",
    "semver_key",
    "sha256_file",
    "verify_bundle",
]
