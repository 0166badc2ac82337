"""Static INT8, QDQ format, MinMax calibration: the usual best INT8 recipe on ONNX Runtime's CPU provider.

QuantizeLinear/DequantizeLinear pairs around each quantizable op; the runtime fuses
them into integer kernels (QLinearConv, MatMulIntegerToFloat ...). Ranges are the
min and max seen on up to 512 calibration samples. ``per_channel=True`` quantizes
weights per output channel (better accuracy, slightly slower on CPU).

Example:
    >>> QDQMinMax().name, QDQMinMax(per_channel=True).name
    ('int8-qdq-minmax', 'int8-qdq-minmax-pc')
"""

from __future__ import annotations

from ._static import StaticInt8


class QDQMinMax(StaticInt8):
    family = "int8-qdq-minmax"
    method = "MinMax"
    max_calibration_samples = 512
    quant_format = "QDQ"
