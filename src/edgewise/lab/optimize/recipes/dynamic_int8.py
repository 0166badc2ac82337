"""Dynamic INT8: weights quantized offline, activations quantized at run time per batch.

``quantize_dynamic`` (weights int8). No calibration data needed. Convolutions become
``ConvInteger``, which ONNX Runtime's CPU provider runs slowly: on a small CNN we
measured it ~6x slower than FP32 (ORT 1.32, x86). It shines on MatMul-heavy models
(transformers, RNNs, MLPs). It is measured like every other candidate, never assumed.

Example:
    >>> from edgewise.lab.optimize.profiles import load_profile
    >>> DynamicInt8().params(load_profile("rpi4"))["weight_type"]
    'int8'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import CalibrationSet
from ..profiles import DeviceProfile
from .base import int8_types, quiet


class DynamicInt8:
    name = "int8-dynamic"
    precision = "int8"

    def params(self, profile: DeviceProfile) -> dict[str, Any]:
        t = int8_types(profile)
        return {"weight_type": "int8", "activations": "uint8, quantized at run time", "reduce_range": t["reduce_range"], "per_channel": False}

    def build(self, fp32_path: Path, calib: CalibrationSet | None, profile: DeviceProfile, out_path: Path) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        t = int8_types(profile)
        with quiet():
            quantize_dynamic(fp32_path, out_path, weight_type=QuantType.QInt8, reduce_range=t["reduce_range"], per_channel=False)
        return out_path
