"""The recipe protocol: one way to turn the FP32 model into a variant.

A recipe has a ``name`` (what the report and ``--recipe`` call it), a ``precision``
(``fp32``, ``fp16``, ``int8`` or ``mixed``), ``params(profile)`` (what it will do on
that target, for the report) and ``build(fp32_path, calib, profile, out_path) -> Path``.
It raises :class:`~edgewise.lab.optimize.errors.RecipeSkipped` when it does not apply.
Every member lives in its own module; ``recipes.RECIPES`` maps names to instances.

Example (a one-node model, quantized with dynamic INT8):
    >>> import tempfile, numpy as np, onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    >>> d = tempfile.mkdtemp(); src = f"{d}/m.onnx"
    >>> onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    >>> from edgewise.lab.optimize.recipes import get_recipe
    >>> from edgewise.lab.optimize.profiles import load_profile
    >>> out = get_recipe("int8-dynamic").build(Path(src), None, load_profile("rpi4"), Path(f"{d}/q.onnx"))
    >>> sorted({n.op_type for n in onnx.load(str(out)).graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"})
    ['DynamicQuantizeLinear', 'MatMulInteger']
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from ..data import CalibrationSet
from ..profiles import DeviceProfile


@runtime_checkable
class Recipe(Protocol):
    name: str
    precision: str

    def params(self, profile: DeviceProfile) -> dict[str, Any]: ...

    def build(self, fp32_path: Path, calib: CalibrationSet | None, profile: DeviceProfile, out_path: Path) -> Path: ...


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantization tools print and log progress; keep stdout clean for ``--json``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def int8_types(profile: DeviceProfile) -> dict[str, Any]:
    """activation/weight QuantType and reduce_range for ``profile`` (see ``DeviceProfile.int8_scheme``)."""
    from onnxruntime.quantization import QuantType

    scheme, reduce_range, why = profile.int8_scheme()
    act = QuantType.QUInt8 if scheme == "U8S8" else QuantType.QInt8
    return {"activation_type": act, "weight_type": QuantType.QInt8, "reduce_range": reduce_range, "scheme": scheme, "why": why}
