"""FP16 weights and activations, FP32 inputs and outputs (``keep_io_types``).

Uses ``onnxruntime.transformers.float16.convert_float_to_float16``. Worth it where
the provider computes in FP16 (CUDA/TensorRT, ARMv8.2 ``asimdhp`` CPUs). On an x86
CPU provider it is still built and measured: the figures, not a rule of thumb, say
whether it helps; if ONNX Runtime cannot run it, the failure is the recorded reason.

Example:
    >>> from edgewise.lab.optimize.profiles import load_profile
    >>> FP16().params(load_profile("rpi5"))["provider_fp16"]
    'CPU has FP16 arithmetic (asimdhp)'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import CalibrationSet
from ..errors import RecipeSkipped
from ..profiles import FP16_FLAGS, DeviceProfile
from .base import quiet

GPU_FP16_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")


class FP16:
    name = "fp16"
    precision = "fp16"

    def params(self, profile: DeviceProfile) -> dict[str, Any]:
        flags = [f for f in FP16_FLAGS if f in profile.isa]
        gpu = [p for p in profile.execution_providers if p in GPU_FP16_PROVIDERS]
        if gpu:
            why = f"provider computes in FP16 ({', '.join(gpu)})"
        elif flags:
            why = f"CPU has FP16 arithmetic ({', '.join(flags)})"
        else:
            why = "no FP16 arithmetic listed for this target: measured anyway, honest figures decide"
        return {"keep_io_types": True, "provider_fp16": why}

    def build(self, fp32_path: Path, calib: CalibrationSet | None, profile: DeviceProfile, out_path: Path) -> Path:
        import onnx

        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as exc:  # pragma: no cover - present in the onnxruntime wheels we pin
            raise RecipeSkipped(f"onnxruntime.transformers.float16 is not available: {exc}") from None
        model = onnx.load(str(fp32_path))
        if not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
            raise RecipeSkipped("the model has no FP32 weights to convert")
        with quiet():
            converted = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(converted, str(out_path))
        return out_path
