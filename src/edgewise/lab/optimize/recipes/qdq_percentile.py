"""Static INT8, QDQ format, Percentile calibration (99.999th percentile of |activation|).

Clips the rare outliers MinMax would stretch the range for. Like Entropy, the
histogram pass runs on a 64-sample subsample of the calibration set.

Example:
    >>> from edgewise.lab.optimize.profiles import load_profile
    >>> QDQPercentile().params(load_profile("rpi4"))["scheme"]
    'S8S8'
"""

from __future__ import annotations

from typing import Any

from ._static import StaticInt8


class QDQPercentile(StaticInt8):
    family = "int8-qdq-percentile"
    method = "Percentile"
    max_calibration_samples = 64
    quant_format = "QDQ"

    def extra_options(self) -> dict[str, Any]:
        return {"CalibPercentile": 99.999}
