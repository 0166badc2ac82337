"""Feature CORAL for models without BatchNorm, folded into one linear layer's weights.

CORAL aligns second-order statistics: the device's inputs to a linear layer are whitened with
their own covariance and re-coloured with the source covariance,
``x' = (x - mu_t) C_t^-1/2 C_s^1/2 + mu_s``. That map is affine, so it folds exactly into the
layer that consumes ``x`` (``W' = M W``, ``b' = b + (mu_s - mu_t M) W``): the adapted model is the
base graph with two new initializers, like AdaBN's.

Which layer (``where``) — a choice the issue leaves open:

- ``"input"`` (default): the first ``Gemm``/``MatMul``, i.e. the model's (preprocessed) input
  for an MLP. Any per-feature affine shift (gain, offset, contrast) is undone *exactly*, and
  noise is partly whitened away. Best for tabular/feature models (digits' 64 pixels).
- ``"features"``: the last ``Gemm``/``MatMul``, i.e. the penultimate features feeding the
  classifier. Works for any backbone (conv nets without BN too), but the features are a
  non-linear function of the shift, so alignment is approximate.

Source statistics (mean and covariance of the layer's input on source data) are fitted in the
lab by :func:`source_statistics` and travel in the bundle as member :data:`SOURCE_STATS_MEMBER`;
without it the agent estimates them from the bundle's golden inputs (few samples: shrinkage
carries the estimate, see docs/data-adaptation.md).

Example:
    >>> import numpy as np
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    ...     [numpy_helper.from_array(np.eye(2, dtype=np.float32), "W"), numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    >>> model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    >>> rng = np.random.default_rng(0)
    >>> src = rng.normal(size=(500, 2)).astype(np.float32)
    >>> stats = source_statistics(model, {"x": src})
    >>> ad = coral(model, {"x": 3 * src + 1}, stats, shrink=0.0)   # a gain of 3 and an offset of 1
    >>> print(np.round(ad.initializers["W"], 2) + 0.0, np.round(ad.initializers["b"], 2))
    [[0.33 0.  ]
     [0.   0.33]] [-0.33 -0.33]
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._graph import Adaptation, AdaptationError, as_window, batches, check_window, expose, graph_inputs, initializer_array, load_model, session

if TYPE_CHECKING:
    import onnx

SOURCE_STATS_MEMBER = "adapt/coral-source.npz"
Where = Literal["input", "features"]
MAX_DIM = 4096
MIN_SAMPLES = 16


@dataclass(frozen=True)
class LinearLayer:
    """A Gemm (or MatMul + Add) whose weight and bias are initializers: what CORAL folds into."""

    node: str
    input: str  # the tensor CORAL aligns
    weight: str
    bias: str
    trans_b: bool
    scale: float  # alpha / beta of a Gemm: how much of W x one unit of bias is


@dataclass(frozen=True)
class SourceStatistics:
    """Mean and covariance of a linear layer's input on source-domain data (fitted in the lab)."""

    where: str
    layer: str
    mean: np.ndarray
    cov: np.ndarray
    samples: int

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps({"where": self.where, "layer": self.layer, "samples": self.samples}).encode()
        np.savez(buf, meta=np.frombuffer(meta, dtype=np.uint8), mean=self.mean, cov=self.cov)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SourceStatistics":
        try:
            with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                return cls(str(meta["where"]), str(meta["layer"]), npz["mean"], npz["cov"], int(meta["samples"]))
        except Exception as exc:
            raise AdaptationError(f"not a CORAL source-statistics file ({type(exc).__name__}: {exc}); "
                                  "make one with edgewise.data.adapt.source_statistics") from None


def linear_layer(model: "bytes | onnx.ModelProto", where: Where = "input") -> LinearLayer:
    """The first (``"input"``) or last (``"features"``) linear layer with initializer weight and bias."""
    if where not in ("input", "features"):
        raise AdaptationError(f"where must be 'input' or 'features', got {where!r}")
    proto = load_model(model)
    inits = {t.name for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    found: list[LinearLayer] = []
    for i, node in enumerate(nodes):
        name = node.name or f"node{i}"
        if node.op_type == "Gemm" and len(node.input) >= 3 and node.input[1] in inits and node.input[2] in inits:
            attrs = {a.name: a for a in node.attribute}
            if attrs.get("transA") is not None and attrs["transA"].i:
                continue
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            if beta == 0:
                continue
            found.append(LinearLayer(name, node.input[0], node.input[1], node.input[2],
                                     bool(attrs["transB"].i) if "transB" in attrs else False, alpha / beta))
        elif node.op_type == "MatMul" and node.input[1] in inits:
            add = next((n for n in nodes if n.op_type == "Add" and node.output[0] in n.input), None)
            if add is not None:
                other = [x for x in add.input if x != node.output[0]]
                if len(other) == 1 and other[0] in inits:
                    found.append(LinearLayer(name, node.input[0], node.input[1], other[0], False, 1.0))
    if not found:
        raise AdaptationError("the model has no linear layer (Gemm, or MatMul + Add) with initializer weights and bias; "
                              "CORAL folds into one. For BatchNorm models use AdaBN")
    return found[0] if where == "input" else found[-1]


def _layer_inputs(model: "onnx.ModelProto", layer: LinearLayer, window: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    sess = session(expose(model, [layer.input]))
    parts = []
    for part in batches(window, batch_size):
        (x,) = sess.run([layer.input], part)
        parts.append(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    x = np.concatenate(parts)
    if x.shape[1] > MAX_DIM:
        raise AdaptationError(f"layer {layer.node!r} takes {x.shape[1]} features; CORAL is limited to {MAX_DIM} "
                              "(a covariance of d x d); use where='features'")
    return x


def source_statistics(model: "bytes | onnx.ModelProto", source: Mapping[str, np.ndarray], *, where: Where = "input",
                      batch_size: int = 256) -> SourceStatistics:
    """Fit, on source (training) inputs, what CORAL aligns to; store ``.to_bytes()`` in the bundle as
    member :data:`SOURCE_STATS_MEMBER` (``build_bundle(..., extra_members={SOURCE_STATS_MEMBER: ...})``).

    ``source`` holds preprocessed inputs (what ONNX Runtime takes), samples along axis 0.
    """
    proto = load_model(model)
    layer = linear_layer(proto, where)
    feed = as_window(source, graph_inputs(proto))
    check_window(feed)
    x = _layer_inputs(proto, layer, feed, batch_size)
    if len(x) < 2:
        raise AdaptationError("source statistics need at least 2 samples")
    return SourceStatistics(where, layer.node, x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), len(x))


def _sqrt_pair(cov: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """C^1/2 and C^-1/2 of ``cov`` regularised as ``C + shrink * mean(diag C) * I`` (plus a floor)."""
    d = cov.shape[0]
    reg = shrink * float(np.trace(cov)) / d + 1e-8
    w, v = np.linalg.eigh(cov + reg * np.eye(d))
    w = np.maximum(w, 1e-12)
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def coral(
    model: "bytes | onnx.ModelProto",
    window: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    source: SourceStatistics,
    *,
    shrink: float = 0.2,
    batch_size: int = 256,
    min_samples: int = MIN_SAMPLES,
) -> Adaptation:
    """Align the covariance of the input of the layer ``source`` was fitted on to the source's, folded into
    that layer's weight and bias. ``window``: preprocessed inputs, samples along axis 0.

    ``shrink`` regularises both covariances toward a scaled identity (a window or golden set smaller than the
    feature count is rank deficient); 0 is plain CORAL.
    """
    if shrink < 0:
        raise AdaptationError(f"shrink must be >= 0, got {shrink}")
    proto = load_model(model)
    layer = linear_layer(proto, "input" if source.where == "input" else "features")
    if layer.node != source.layer:
        raise AdaptationError(f"the source statistics were fitted on layer {source.layer!r}, the model's {source.where} layer is "
                              f"{layer.node!r}; fit them again on this model")
    feed = as_window(window, graph_inputs(proto))
    check_window(feed)
    x = _layer_inputs(proto, layer, feed, batch_size)
    if len(x) < min_samples:
        raise AdaptationError(f"the window holds {len(x)} samples; CORAL needs at least {min_samples}")
    d = x.shape[1]
    if source.cov.shape != (d, d):
        raise AdaptationError(f"the source statistics are for {source.cov.shape[0]} features, layer {layer.node!r} takes {d}")
    mu_t = x.mean(axis=0)
    cov_t = np.cov(x, rowvar=False).reshape(d, d)
    s_half, _ = _sqrt_pair(source.cov.astype(np.float64), shrink)
    _, t_inv_half = _sqrt_pair(cov_t, shrink)
    m = t_inv_half @ s_half  # row vectors: x' = (x - mu_t) M + mu_s
    w0 = initializer_array(proto, layer.weight)
    b0 = initializer_array(proto, layer.bias)
    wt = (w0.T if layer.trans_b else w0).astype(np.float64)  # (d, out)
    if wt.shape[0] != d:
        raise AdaptationError(f"layer {layer.node!r}: weight {list(w0.shape)} does not take {d} features")
    shift = (source.mean.astype(np.float64) - mu_t @ m) @ wt  # (out,)
    wt_new = m @ wt
    w_new = (wt_new.T if layer.trans_b else wt_new).astype(w0.dtype)
    b_new = (b0.astype(np.float64) + layer.scale * shift.reshape(b0.shape) if b0.size == shift.size
             else b0.astype(np.float64) + layer.scale * shift).astype(b0.dtype)
    if b_new.shape != b0.shape:
        raise AdaptationError(f"layer {layer.node!r}: bias {list(b0.shape)} cannot take the CORAL shift of {shift.size} outputs")
    detail = {
        "where": source.where, "layer": layer.node, "shrink": shrink, "features": d,
        "mean_shift": float(np.mean(np.abs(mu_t - source.mean) / np.sqrt(np.diag(source.cov) + 1e-8))),
        "var_ratio": float(np.mean((np.diag(cov_t) + 1e-8) / (np.diag(source.cov) + 1e-8))),
    }
    return Adaptation(f"coral-{source.where}", {layer.weight: w_new, layer.bias: b_new}, len(x), detail)
