"""Quantization and conversion recipes, one per module, all behind the :class:`Recipe` protocol.

``RECIPES`` maps each name to an instance; ``DEFAULT_RECIPES`` is the candidate set
``edgewise optimize`` tries when ``--recipe`` is not given (FP32 is always added).

Example:
    >>> DEFAULT_RECIPES[:3]
    ['fp32', 'fp16', 'int8-dynamic']
    >>> get_recipe("int8-qdq-entropy-pc").per_channel
    True
"""

from __future__ import annotations

from .base import Recipe, int8_types, quiet
from ._static import StaticInt8
from .dynamic_int8 import DynamicInt8
from .fp16 import FP16
from .fp32 import FP32
from .qdq_entropy import QDQEntropy
from .qdq_minmax import QDQMinMax
from .qdq_percentile import QDQPercentile
from .qoperator import QOperatorMinMax

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        FP32(),
        FP16(),
        DynamicInt8(),
        QDQMinMax(),
        QDQMinMax(per_channel=True),
        QDQEntropy(),
        QDQEntropy(per_channel=True),
        QDQPercentile(),
        QDQPercentile(per_channel=True),
        QOperatorMinMax(),
        QOperatorMinMax(per_channel=True),
    )
}

# Per-tensor and per-channel MinMax (the cheap, usual winners), the two histogram methods per-channel
# (they exist to rescue accuracy), QOperator per-tensor, dynamic INT8 and FP16: 8 candidates.
DEFAULT_RECIPES = [
    "fp32", "fp16", "int8-dynamic", "int8-qdq-minmax", "int8-qdq-minmax-pc",
    "int8-qdq-entropy-pc", "int8-qdq-percentile-pc", "int8-qop-minmax",
]


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        from ..errors import OptimizeError

        raise OptimizeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


__all__ = [
    "DEFAULT_RECIPES", "RECIPES", "Recipe", "StaticInt8", "get_recipe", "int8_types", "quiet",
    "DynamicInt8", "FP16", "FP32", "QDQEntropy", "QDQMinMax", "QDQPercentile", "QOperatorMinMax",
]
