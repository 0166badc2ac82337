"""AdaBN on the ONNX model itself: new BatchNorm statistics from unlabeled inputs, no torch.

Every ``BatchNormalization`` node (inference form: ``X, scale, B, input_mean, input_var``)
normalises with the mean and variance of the *training* data. Under a shift of the input
(a sensor's gain, an offset, a contrast change) those statistics are wrong for the data the
device sees, and every layer after the first BN inherits the error. AdaBN replaces them
with the statistics of a window of recent inputs; the learned ``scale``/``B`` stay.

How it runs on ONNX Runtime: the BN nodes' inputs are exposed as extra graph outputs and
their mean/var initializers as overridable graph inputs, so **one** session serves every
pass. The nodes are updated in graph (topological) order, one pass each, because BN *k*
sees data normalised by BN *k-1*: its statistics must be measured with BN *k-1* already
adapted (what ``model.train()`` on the target data does in torch). The window is run in
batches, statistics are accumulated in float64 (constant memory in the window length).

Example:
    >>> import numpy as np
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    >>> g = helper.make_graph([bn], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    ...     [numpy_helper.from_array(np.ones(2, np.float32), n) for n in "sv"]
    ...     + [numpy_helper.from_array(np.zeros(2, np.float32), n) for n in "bm"])
    >>> model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    >>> ad = adabn(model, {"x": x}, min_samples=2)
    >>> ad.initializers["m"].tolist(), ad.initializers["v"].tolist()
    ([2.0, 20.0], [1.0, 100.0])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._graph import Adaptation, AdaptationError, as_window, batches, check_window, expose, graph_inputs, initializer_array, load_model, session

if TYPE_CHECKING:
    import onnx

MIN_SAMPLES = 8


@dataclass(frozen=True)
class BatchNormNode:
    """One inference-mode BatchNormalization node: its name, input tensor, mean/var initializers and epsilon."""

    name: str
    input: str
    mean: str
    var: str
    epsilon: float


def batchnorm_nodes(model: "bytes | onnx.ModelProto") -> list[BatchNormNode]:
    """The model's BatchNormalization nodes whose mean and variance are initializers, in graph order.

    An empty list for a model without BatchNorm (or one exported with BN folded into the convolutions:
    export with ``training=torch.onnx.TrainingMode.PRESERVE`` from an ``eval()`` model to keep them).
    """
    proto = load_model(model)
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 5:
            continue
        if node.input[3] not in inits or node.input[4] not in inits:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        out.append(BatchNormNode(node.name or f"node{i}", node.input[0], node.input[3], node.input[4], float(eps)))
    return out


def adabn(
    model: "bytes | onnx.ModelProto",
    window: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    *,
    alpha: float = 1.0,
    batch_size: int = 64,
    min_samples: int = MIN_SAMPLES,
) -> Adaptation:
    """Re-estimate every BatchNorm node's mean and variance on ``window`` (the model's inputs exactly as
    ONNX Runtime takes them, i.e. *after* the bundle's preprocessing; samples along axis 0).

    ``alpha`` blends source and window statistics (1: the window's alone, pure AdaBN; 0.5: halfway),
    which steadies a small window. Raises :class:`AdaptationError` for a model without BatchNorm
    (use :func:`~edgewise.data.adapt.coral`), a window with fewer than ``min_samples`` samples or
    with NaN/inf values.
    """
    if not 0.0 < alpha <= 1.0:
        raise AdaptationError(f"alpha must be in (0, 1], got {alpha}")
    proto = load_model(model)
    nodes = batchnorm_nodes(proto)
    if not nodes:
        raise AdaptationError("the model has no BatchNormalization node with mean/var initializers: AdaBN needs one; "
                              "use CORAL (edgewise.data.adapt.coral) for models without BatchNorm")
    feed = as_window(window, graph_inputs(proto))
    check_window(feed)
    n = len(next(iter(feed.values())))
    if n < min_samples:
        raise AdaptationError(f"the window holds {n} samples; AdaBN needs at least {min_samples} to estimate statistics")
    stats: dict[str, np.ndarray] = {}
    for node in nodes:
        stats[node.mean] = initializer_array(proto, node.mean)
        stats[node.var] = initializer_array(proto, node.var)
    source = {k: v.copy() for k, v in stats.items()}
    sess = session(expose(proto, [nd.input for nd in nodes], [k for nd in nodes for k in (nd.mean, nd.var)]))
    detail: dict[str, dict[str, float]] = {}
    for node in nodes:
        total = sq = None
        count = 0
        for part in batches(feed, batch_size):
            (x,) = sess.run([node.input], {**part, **stats})
            if x.ndim < 2:
                raise AdaptationError(f"BatchNorm {node.name!r}: input {node.input!r} has rank {x.ndim}, expected (N, C, ...)")
            axes = (0, *range(2, x.ndim))
            x64 = x.astype(np.float64)
            s, q = x64.sum(axis=axes), np.square(x64).sum(axis=axes)
            total, sq = (s, q) if total is None else (total + s, sq + q)
            count += x.size // x.shape[1]
        assert total is not None and sq is not None
        mean = total / count
        var = np.maximum(sq / count - np.square(mean), 0.0)
        m0, v0 = source[node.mean].astype(np.float64), source[node.var].astype(np.float64)
        new_mean = (1.0 - alpha) * m0 + alpha * mean
        new_var = (1.0 - alpha) * v0 + alpha * var
        stats[node.mean] = new_mean.astype(source[node.mean].dtype)
        stats[node.var] = new_var.astype(source[node.var].dtype)
        detail[node.name] = {
            "mean_shift": float(np.mean(np.abs(new_mean - m0) / np.sqrt(v0 + node.epsilon))),
            "var_ratio": float(np.mean((new_var + node.epsilon) / (v0 + node.epsilon))),
        }
    return Adaptation("adabn", stats, n, {"alpha": alpha, "layers": detail})
