"""Preprocessing as data: a pipeline spec stored in the bundle, run by this one implementation.

The lab uses it when it evaluates and calibrates; the agent uses it when it serves.
Statistics (means, scales, bounds) are fitted in the lab and frozen into the spec.
This is the seam later steps (imputation, filters, windowing) plug into: one
class per step, each with ``apply(x) -> x``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class PreprocessingError(ValueError):
    """Input that a pipeline step cannot repair."""


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cast(_Step):
    """Cast to the model's input dtype."""

    op: Literal["cast"] = "cast"
    dtype: str = "float32"

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)


class Scale(_Step):
    """``(x - offset) * factor``; scalars or one value per feature (last axis)."""

    op: Literal["scale"] = "scale"
    offset: float | list[float] = 0.0
    factor: float | list[float] = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        off = np.asarray(self.offset, dtype=x.dtype if x.dtype.kind == "f" else np.float32)
        fac = np.asarray(self.factor, dtype=off.dtype)
        if off.ndim and x.shape[-1:] != off.shape:
            raise PreprocessingError(f"scale: input has {x.shape[-1:]} features, the spec has {off.shape[0]}")
        return (x - off) * fac


class Clip(_Step):
    """Clip to bounds fitted on training data (outliers from a faulty sensor)."""

    op: Literal["clip"] = "clip"
    low: float | list[float] | None = None
    high: float | list[float] | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.low, self.high)


Step = Annotated[Union[Cast, Scale, Clip], Field(discriminator="op")]


class PreprocessingSpec(BaseModel):
    """Ordered steps; empty means the model takes raw input."""

    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(default_factory=list)

    def apply(self, x: np.ndarray) -> np.ndarray:
        for step in self.steps:
            x = step.apply(x)
        return x

    def __bool__(self) -> bool:
        return bool(self.steps)
