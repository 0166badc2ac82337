"""FP32 with ONNX Runtime's portable graph optimizations saved into the file.

Only ``ORT_ENABLE_BASIC`` rewrites are baked in (constant folding, redundant node
removal, Conv+BatchNorm/Add/Mul fusion): they use standard ONNX ops and run on any
provider. The hardware-specific levels (``EXTENDED``/``ALL``: contrib fused ops,
NCHWc layouts) are applied at session creation on the device, where the runtime
tuning chooses the level. This is the baseline every variant is compared with.

Example:
    >>> FP32().name, FP32().precision
    ('fp32', 'fp32')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import CalibrationSet
from ..profiles import DeviceProfile


class FP32:
    name = "fp32"
    precision = "fp32"

    def params(self, profile: DeviceProfile) -> dict[str, Any]:
        return {"offline_graph_optimization": "ORT_ENABLE_BASIC"}

    def build(self, fp32_path: Path, calib: CalibrationSet | None, profile: DeviceProfile, out_path: Path) -> Path:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out_path)
        so.log_severity_level = 3
        ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
        return out_path
