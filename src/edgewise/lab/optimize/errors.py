"""What can go wrong in ``edgewise optimize``: one type per cause, each message says what to do next."""

from __future__ import annotations


class OptimizeError(Exception):
    """Base class of every error the optimizer raises on purpose."""


class ProfileError(OptimizeError, ValueError):
    """A device profile that cannot be found or does not validate (the message names the field)."""


class DataError(OptimizeError, ValueError):
    """Calibration or evaluation data that does not fit the model (wrong key, shape, dtype or labels)."""


class MetricError(OptimizeError, ValueError):
    """A metric that cannot be computed for this model and data (e.g. accuracy without labels)."""


class TargetOutOfReachError(OptimizeError):
    """The profile describes hardware ONNX Runtime cannot run on; the message says what would fit."""


class RecipeSkipped(OptimizeError):
    """A recipe that does not apply to this model or profile; the reason is recorded in the report."""
