"""Static INT8, QOperator format (QLinearConv, QLinearMatMul ... written into the graph), MinMax calibration.

The pre-1.11 representation. ORT recommends QDQ for CPU, but older runtimes and
some providers run QOperator graphs better; it is cheap to build once the MinMax
ranges are cached, so it is measured rather than dismissed.

Example:
    >>> QOperatorMinMax().name, QOperatorMinMax().quant_format
    ('int8-qop-minmax', 'QOperator')
"""

from __future__ import annotations

from ._static import StaticInt8


class QOperatorMinMax(StaticInt8):
    family = "int8-qop-minmax"
    method = "MinMax"
    max_calibration_samples = 512
    quant_format = "QOperator"
