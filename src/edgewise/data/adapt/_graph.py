"""What adaptations share: the result type, its byte form, applying it to a model, and running a model
with some of its intermediate tensors exposed as outputs.

``onnx`` and ``onnxruntime`` are imported inside the functions: an agent that never adapts never loads
``onnx`` (a few MB of resident memory on a small board).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

FORMAT = 1
_META = "__adaptation__"


class AdaptationError(ValueError):
    """An adaptation cannot be computed or applied; the message says which tensor or input and what to do."""


@dataclass(frozen=True)
class Adaptation:
    """New values for some initializers of a base model, and how they were obtained.

    ``initializers`` maps initializer name -> array with the base initializer's shape and dtype.
    ``samples`` is how many unlabeled inputs the statistics came from; ``detail`` holds
    method-specific figures (per-layer shift of the statistics, regularisation used).
    """

    method: str
    initializers: dict[str, np.ndarray]
    samples: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """An ``.npz`` (no pickles): the arrays plus one JSON member with method, samples and detail."""
        meta = json.dumps({"format": FORMAT, "method": self.method, "samples": int(self.samples), "detail": self.detail}, default=float)
        buf = io.BytesIO()
        np.savez(buf, **{_META: np.frombuffer(meta.encode(), dtype=np.uint8)}, **{f"init/{k}": v for k, v in self.initializers.items()})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> "Adaptation":
        try:
            with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz[_META]).decode())
                inits = {k[len("init/"):]: npz[k] for k in npz.files if k.startswith("init/")}
        except Exception as exc:  # ValueError/KeyError/OSError/zipfile errors: all mean "not an adaptation"
            raise AdaptationError(f"not an adaptation file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != FORMAT:
            raise AdaptationError(f"adaptation format {meta.get('format')!r} is not supported (this agent reads {FORMAT})")
        return cls(str(meta["method"]), inits, int(meta["samples"]), dict(meta.get("detail") or {}))


def load_model(model: "bytes | onnx.ModelProto") -> "onnx.ModelProto":
    import onnx

    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise AdaptationError(f"the model is not a readable ONNX file: {exc}") from None
    return model


def initializer_map(model: "onnx.ModelProto") -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def initializer_array(model: "onnx.ModelProto", name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise AdaptationError(f"the model has no initializer {name!r}")


def apply_adaptation(model: "bytes | onnx.ModelProto", adaptation: Adaptation) -> bytes:
    """The base model's bytes with the adaptation's initializers written in; refuses any name, shape or dtype
    that is not already in the base model (an adaptation changes numbers, never the graph)."""
    from onnx import numpy_helper

    proto = load_model(model)
    inits = initializer_map(proto)
    for name, value in adaptation.initializers.items():
        base = inits.get(name)
        if base is None:
            raise AdaptationError(f"adaptation ({adaptation.method}) names initializer {name!r}, which the model does not have; "
                                  "it was made for another model: adapt again")
        old = numpy_helper.to_array(base)
        if old.shape != value.shape or old.dtype != value.dtype:
            raise AdaptationError(f"adaptation ({adaptation.method}): initializer {name!r} is {value.dtype}{list(value.shape)}, "
                                  f"the model's is {old.dtype}{list(old.shape)}; it was made for another model: adapt again")
        if not np.isfinite(value).all():
            raise AdaptationError(f"adaptation ({adaptation.method}): initializer {name!r} holds NaN or inf; refusing it")
        base.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return proto.SerializeToString()


def expose(model: "onnx.ModelProto", names: Sequence[str], overridable: Sequence[str] = ()) -> "onnx.ModelProto":
    """A copy of ``model`` whose graph also outputs the tensors ``names`` and takes the initializers
    ``overridable`` as (optional) inputs, so one session can run with different values for them."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    inputs = {i.name for i in m.graph.input}
    inits = initializer_map(m)
    for n in overridable:
        if n not in inputs:
            t = inits[n]
            m.graph.input.append(helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
    if m.ir_version < 4:
        m.ir_version = 4
    return m


def session(model: "onnx.ModelProto") -> "ort.InferenceSession":
    """A one-thread CPU session without graph rewrites (so exposed tensors are the ones the graph names)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise AdaptationError(f"ONNX Runtime cannot load the model prepared for adaptation: {exc}") from None


def as_window(window: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The window as one feed (samples along axis 0): a mapping name -> array, or a sequence of feeds to concatenate."""
    if isinstance(window, Mapping):
        feeds = [window]
    else:
        feeds = list(window)
    if not feeds:
        raise AdaptationError("the adaptation window is empty; collect some inputs first")
    out: dict[str, np.ndarray] = {}
    for name in input_names:
        parts = []
        for f in feeds:
            if name not in f:
                raise AdaptationError(f"a sample of the window lacks input {name!r}; the model takes {list(input_names)}")
            parts.append(np.asarray(f[name]))
        try:
            out[name] = np.concatenate(parts, axis=0)
        except ValueError as exc:
            raise AdaptationError(f"input {name!r}: the window's samples do not stack ({exc})") from None
    counts = {len(v) for v in out.values()}
    if len(counts) != 1 or 0 in counts:
        raise AdaptationError(f"the window's inputs have different or zero sample counts {sorted(counts)}")
    return out


def batches(feed: Mapping[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(feed.values())))
    for i in range(0, n, max(1, size)):
        yield {k: v[i : i + size] for k, v in feed.items()}


def graph_inputs(model: "onnx.ModelProto") -> list[str]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_window(feed: Mapping[str, np.ndarray]) -> None:
    for name, x in feed.items():
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise AdaptationError(f"input {name!r}: the window holds {bad} NaN/inf values; adapt on repaired (preprocessed) inputs only")
