"""Preprocessing as data: a pipeline spec stored in the bundle, run by this one implementation.

The lab uses it when it evaluates and calibrates; the agent uses it when it serves (``LoadedModel``
calls :meth:`PreprocessingSpec.run`). Statistics (medians, quantiles, means, stds) are fitted in
the lab (``edgewise.data.fit``) and frozen into the spec. The steps live one per file in
``edgewise.data.steps``; each repairs the input as configured and counts the repair, or raises
:class:`PreprocessingError` naming the feature and the problem. A spec written for the first
pipeline (cast, scale, clip) reads and runs as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .steps import (
    SHAPE_CHANGING,
    AnyStep,
    Cast,
    Check,
    Clip,
    ExpSmooth,
    Impute,
    MinMax,
    MovingMedian,
    PreprocessingError,
    Resample,
    Reshape,
    Resize,
    Scale,
    Standardize,
    Tally,
    Transpose,
    Window,
)
from .steps.base import all_finite, first_bad_feature

Step = AnyStep

__all__ = [
    "Cast", "Check", "Clip", "ExpSmooth", "Impute", "MinMax", "MovingMedian", "PreprocessingError", "PreprocessingSpec",
    "Resample", "Reshape", "Resize", "Scale", "Standardize", "Step", "Tally", "Transpose", "Window",
]


class PreprocessingSpec(BaseModel):
    """Ordered steps; empty means the model takes raw input.

    ``features`` names the features along the last axis (errors and repair counts then say
    ``'temp'`` rather than ``3``). ``require_finite``: NaN or inf still present after the last
    step is rejected, naming the feature, instead of reaching the model.
    """

    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(default_factory=list)
    features: list[str] | None = None
    require_finite: bool = True

    def run(self, x: Any) -> tuple[np.ndarray, dict[str, int]]:
        """``(preprocessed array, repairs)``; repairs maps ``"<op>/<feature>"`` to how many values were repaired.

        Raises :class:`PreprocessingError` for input it cannot repair, never anything else.
        """
        tally = Tally(self.features)
        return self._run(x, tally), tally.counts

    def apply(self, x: Any, repairs: dict[str, int] | None = None) -> np.ndarray:
        """The preprocessed array; repair counts are added to ``repairs`` when given."""
        tally = Tally(self.features)
        out = self._run(x, tally)
        if repairs is not None:
            for k, v in tally.counts.items():
                repairs[k] = repairs.get(k, 0) + v
        return out

    def _run(self, x: Any, tally: Tally) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise PreprocessingError(f"input is not a rectangular numeric array ({exc})") from None
        step = None
        try:
            for step in self.steps:
                x = step.apply(x, tally)
        except PreprocessingError:
            raise
        # Never a crash on input: numpy's own complaints (also overflow warnings, where warnings are errors) name the step.
        except (ValueError, TypeError, IndexError, ArithmeticError, MemoryError, Warning) as exc:
            op = step.op if step is not None else "input"
            raise PreprocessingError(f"{op}: cannot process input of shape {list(np.shape(x))} and dtype {getattr(x, 'dtype', '?')}: {exc}") from None
        if self.require_finite and x.dtype.kind == "f" and self.steps and not all_finite(x):
            i = first_bad_feature(~np.isfinite(x), -1) if x.ndim else 0
            raise PreprocessingError(
                f"{tally.feature(i)} is NaN or infinite after preprocessing; send finite values or add an impute/clip step to the spec"
            )
        return x

    @property
    def checks_raw_input(self) -> bool:
        """True when the spec itself validates the raw input (a ``check`` step) or changes its shape:
        the runtime then checks the model's input spec after preprocessing rather than before."""
        return any(isinstance(s, (Check, *SHAPE_CHANGING)) for s in self.steps)

    @property
    def fitted(self) -> bool:
        """True when every step has the statistics it needs (see ``edgewise.data.fit``)."""
        return all(s.fitted for s in self.steps)

    def unfitted(self) -> list[str]:
        """``"<index>:<op>"`` of each step still missing its statistics."""
        return [f"{i}:{s.op}" for i, s in enumerate(self.steps) if not s.fitted]

    def __bool__(self) -> bool:
        return bool(self.steps)
