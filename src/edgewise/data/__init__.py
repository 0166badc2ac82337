"""Shared by lab and agent: preprocessing, reference statistics, drift."""

from .preprocessing import Cast, Clip, PreprocessingError, PreprocessingSpec, Scale

__all__ = ["Cast", "Clip", "PreprocessingError", "PreprocessingSpec", "Scale"]
