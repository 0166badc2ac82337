"""Shared by lab and agent: preprocessing, reference statistics, drift."""

from .preprocessing import (
    Cast,
    Check,
    Clip,
    ExpSmooth,
    Impute,
    MinMax,
    MovingMedian,
    PreprocessingError,
    PreprocessingSpec,
    Resample,
    Reshape,
    Resize,
    Scale,
    Standardize,
    Transpose,
    Window,
)

__all__ = [
    "Cast", "Check", "Clip", "ExpSmooth", "Impute", "MinMax", "MovingMedian", "PreprocessingError", "PreprocessingSpec",
    "Resample", "Reshape", "Resize", "Scale", "Standardize", "Transpose", "Window",
]
