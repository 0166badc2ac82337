"""Shared body of the static INT8 recipes (``quantize_static`` with a calibration data reader).

Static recipes differ in calibration method, per-channel weights and format; each
public member is its own small module (``qdq_minmax``, ``qdq_entropy``, ...).
Calibration ranges are cached per method and sample count in the calibration set's
folder, so the per-tensor, per-channel and QOperator variants calibrate once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from ..data import CalibrationSet
from ..errors import RecipeSkipped
from ..profiles import DeviceProfile
from .base import int8_types, quiet


class StaticInt8:
    """``quantize_static``: activations calibrated offline, weights int8; QDQ or QOperator format."""

    precision = "int8"
    method = "MinMax"  # CalibrationMethod member name
    max_calibration_samples = 512
    quant_format = "QDQ"  # or "QOperator"
    family = "int8-qdq-minmax"

    def __init__(
        self, per_channel: bool = False, nodes_to_exclude: Sequence[str] = (), nodes_to_quantize: Sequence[str] = ()
    ) -> None:
        self.per_channel = per_channel
        self.nodes_to_exclude = list(nodes_to_exclude)
        self.nodes_to_quantize = list(nodes_to_quantize)

    @property
    def name(self) -> str:
        return self.family + ("-pc" if self.per_channel else "")

    def extra_options(self) -> dict[str, Any]:
        return {}

    def _quantizer_options(self) -> dict[str, Any]:
        opts = dict(self.extra_options())
        if self.per_channel:
            # ORT 1.32's int32-bias weight-scale adjustment compares a per-channel scale array with a
            # scalar and raises on Gemm nodes (MatMul+Add fused by graph optimization); skip it.
            opts.setdefault("QDQDisableWeightAdjustForInt32Bias", True)
        return opts

    def params(self, profile: DeviceProfile) -> dict[str, Any]:
        t = int8_types(profile)
        return {
            "format": self.quant_format,
            "calibration": self.method,
            "calibration_samples_max": self.max_calibration_samples,
            "per_channel": self.per_channel,
            "scheme": t["scheme"],
            "reduce_range": t["reduce_range"],
            "why_scheme": t["why"],
            **({"fp32_nodes": list(self.nodes_to_exclude)} if self.nodes_to_exclude else {}),
            **({"extra_options": self.extra_options()} if self.extra_options() else {}),
        }

    def build(self, fp32_path: Path, calib: CalibrationSet | None, profile: DeviceProfile, out_path: Path) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        if calib is None or len(calib) == 0:
            raise RecipeSkipped("static INT8 needs calibration data (--calibration)")
        t = int8_types(profile)
        n = min(len(calib), self.max_calibration_samples)
        tag = hashlib.sha256(str(Path(fp32_path).resolve()).encode()).hexdigest()[:8]
        cache = calib.cache_path(f"{self.method.lower()}-{n}-{tag}")
        reader = None if cache is not None and cache.is_file() else calib.reader(max_samples=n)
        with quiet():
            quantize_static(
                fp32_path,
                out_path,
                calibration_data_reader=reader,
                quant_format=QuantFormat.QDQ if self.quant_format == "QDQ" else QuantFormat.QOperator,
                per_channel=self.per_channel,
                reduce_range=t["reduce_range"],
                activation_type=t["activation_type"],
                weight_type=t["weight_type"],
                nodes_to_exclude=list(self.nodes_to_exclude) or None,
                nodes_to_quantize=list(self.nodes_to_quantize) or None,
                calibrate_method=getattr(CalibrationMethod, self.method),
                extra_options=self._quantizer_options() or None,
                calibration_cache_path=cache,
            )
        return out_path

    def with_fp32_nodes(self, nodes: Sequence[str]) -> StaticInt8:
        """The same recipe, keeping ``nodes`` in FP32 (accuracy-aware mixed precision)."""
        return type(self)(per_channel=self.per_channel, nodes_to_exclude=nodes)
