"""Static INT8, QDQ format, Entropy (KL-divergence) calibration.

Ranges minimise the KL divergence between the FP32 and quantized activation
histograms, which clips long tails. The histogram calibrator is slow (Python loops
over every tensor and threshold), so it runs on a reproducible 64-sample subsample
of the calibration set: enough for stable histograms on small models, and it keeps
a small CNN's whole optimize run well under two minutes on two cores.

Example:
    >>> from edgewise.lab.optimize.profiles import load_profile
    >>> QDQEntropy(per_channel=True).params(load_profile("x86-gateway"))["calibration_samples_max"]
    64
"""

from __future__ import annotations

from ._static import StaticInt8


class QDQEntropy(StaticInt8):
    family = "int8-qdq-entropy"
    method = "Entropy"
    max_calibration_samples = 64
    quant_format = "QDQ"
