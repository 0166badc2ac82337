"""Control-plane errors as types, each carrying the HTTP status it maps to.

The plain functions (registry, deployments, devices) raise these; the app turns
them into ``{"detail": message, "error": type name}`` responses, so the message
written here is exactly what an operator reads.
"""

from __future__ import annotations


class ControlError(Exception):
    """Base: a request the control plane refuses, with a message that says what to do."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(ControlError):
    status_code = 404


class DeviceNotFoundError(NotFoundError):
    pass


class ModelNotFoundError(NotFoundError):
    pass


class ConflictError(ControlError):
    status_code = 409


class VersionConflictError(ConflictError):
    """Same name and version, different bytes: versions are immutable once uploaded."""


class InvalidRequestError(ControlError):
    status_code = 422


class BundleRejectedError(InvalidRequestError):
    """The uploaded bundle did not verify (corrupt, untrusted signer, bad manifest)."""


class UploadTooLargeError(ControlError):
    status_code = 413


class UnavailableError(ControlError):
    """A service the request needs (the MQTT bus) is down; the request may succeed later."""

    status_code = 503
