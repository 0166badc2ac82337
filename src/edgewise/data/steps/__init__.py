"""The preprocessing steps, one per file, all behind one protocol (see ``base.py``).

Add a step: a new file with a ``StepBase`` subclass carrying a unique ``op`` literal and
``apply(x, tally)``; then list it in ``AnyStep`` below so bundles can name it.
"""

from typing import Annotated, Union

from pydantic import Field

from .base import PreprocessingError, Step, StepBase, Tally
from .cast import Cast
from .check import Check
from .clip import Clip
from .exp_smooth import ExpSmooth
from .impute import Impute
from .moving_median import MovingMedian
from .resample import Resample
from .reshape import Reshape, Transpose
from .resize import Resize
from .scale import MinMax, Scale, Standardize
from .window import Window

AnyStep = Annotated[
    Union[Cast, Scale, Clip, Check, Impute, Standardize, MinMax, MovingMedian, ExpSmooth, Resample, Window, Resize, Reshape, Transpose],
    Field(discriminator="op"),
]

# Steps after which the array no longer has the raw input's shape (the runtime then checks the model's input after them).
SHAPE_CHANGING = (Resample, Window, Resize, Reshape, Transpose)

__all__ = [
    "AnyStep", "Cast", "Check", "Clip", "ExpSmooth", "Impute", "MinMax", "MovingMedian", "PreprocessingError", "Resample",
    "Reshape", "Resize", "Scale", "SHAPE_CHANGING", "Standardize", "Step", "StepBase", "Tally", "Transpose", "Window",
]
