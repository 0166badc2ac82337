"""All-layer local training of an MLP tail in numpy: the chain of dense layers (``Gemm``, or ``MatMul`` + ``Add``, with
initializer weights) joined by ``Relu`` that ends in the model's head, for devices without torch (recipe
``layers = "all"``).

The chain is found from the head backwards: the head's input is produced by a ``Relu`` whose input is another dense
layer's output, and so on, as long as each hidden tensor feeds only the next layer (no skip connection that a numpy
forward pass would miss). What is before the chain (a ``Cast``, a convolutional backbone) stays frozen: its output is
the chain's input, computed with ONNX Runtime like the head's input for head-only training. An MLP exported by
skl2onnx (``MLPClassifier``: MatMul/Add/Relu ... MatMul/Add/Softmax) is one chain from the model's input.

Training is softmax cross-entropy on the head's logits (the head feeds a softmax), mini-batch SGD with backpropagation
through the ReLUs, and the FedProx proximal term on every parameter. Tensors keep the model's names, shapes (a bias of
shape ``(1, n)`` stays so) and dtypes, so a delta is checked, aggregated and written back by name exactly like a head's.

>>> import numpy as np
>>> chain = [DenseLayer("l1", "x", "W1", "b1", False, True), DenseLayer("l2", "h", "W2", "b2", False, False)]
>>> rng = np.random.default_rng(0)
>>> w = {"W1": rng.normal(0, 0.5, (4, 8)).astype(np.float32), "b1": np.zeros(8, np.float32),
...      "W2": rng.normal(0, 0.5, (8, 3)).astype(np.float32), "b2": np.zeros((1, 3), np.float32)}
>>> x = rng.normal(size=(60, 4)); y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
>>> from edgewise.learn.local import Recipe
>>> new, loss = train_mlp(chain, w, x, y, Recipe(epochs=30, batch_size=16, lr=0.2, layers="all"), rng)
>>> bool((forward(chain, new, x).argmax(1) == y).mean() > (forward(chain, w, x).argmax(1) == y).mean())
True
>>> new["b2"].shape, new["b2"].dtype
((1, 3), dtype('float32'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .local import Recipe


class ChainError(ValueError):
    """The model has no dense chain that numpy can train (the message says what was found instead)."""


@dataclass(frozen=True)
class DenseLayer:
    """One dense layer of the chain: ``y = x @ W (+ b)``, ``W`` transposed in the model when ``trans_b``; ``relu``: a
    ReLU follows it (every layer but the head)."""

    node: str
    input: str
    weight: str
    bias: str
    trans_b: bool
    relu: bool


def _dense_producing(name: str, producers: dict[str, Any], inits: set[str], consumers: dict[str, int]) -> DenseLayer | None:
    """The dense layer whose (pre-activation) output is ``name``, or None."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Gemm" and len(node.input) >= 3 and node.input[1] in inits and node.input[2] in inits:
        attrs = {a.name: a for a in node.attribute}
        if ("transA" in attrs and attrs["transA"].i) or ("alpha" in attrs and attrs["alpha"].f != 1.0) \
                or ("beta" in attrs and attrs["beta"].f != 1.0):
            return None
        return DenseLayer(node.name or node.output[0], node.input[0], node.input[1], node.input[2],
                          bool(attrs["transB"].i) if "transB" in attrs else False, False)
    if node.op_type == "Add" and len(node.input) == 2:
        for i, other in ((0, 1), (1, 0)):
            mm = producers.get(node.input[i])
            if mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits and node.input[other] in inits \
                    and consumers.get(mm.output[0], 0) == 1:
                return DenseLayer(mm.name or mm.output[0], mm.input[0], mm.input[1], node.input[other], False, False)
    return None


def mlp_chain(model: Any) -> list[DenseLayer]:
    """The dense/ReLU chain ending in the model's head (its last dense layer), first layer first.

    Raises :class:`ChainError` when the model has no head numpy can train (no dense layer with initializer weight and
    bias, a Gemm with alpha/beta != 1); a chain of one layer (the head alone) is a valid answer."""
    from ..data.adapt import AdaptationError
    from ..data.adapt._graph import load_model
    from ..data.adapt.coral import linear_layer

    proto = load_model(model)
    try:
        head = linear_layer(proto, "features")
    except AdaptationError as exc:
        raise ChainError(str(exc)) from None
    if abs(head.scale - 1.0) > 1e-9:
        raise ChainError(f"head {head.node!r} is a Gemm with alpha/beta = {head.scale}; only alpha = beta = 1 is supported")
    inits = {t.name for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    for o in proto.graph.output:
        consumers[o.name] = consumers.get(o.name, 0) + 1
    chain = [DenseLayer(head.node, head.input, head.weight, head.bias, head.trans_b, False)]
    while True:
        relu = producers.get(chain[0].input)
        if relu is None or relu.op_type != "Relu" or consumers.get(relu.output[0], 0) != 1 or consumers.get(relu.input[0], 0) != 1:
            return chain
        layer = _dense_producing(relu.input[0], producers, inits, consumers)
        if layer is None:
            return chain
        chain.insert(0, DenseLayer(layer.node, layer.input, layer.weight, layer.bias, layer.trans_b, True))


def chain_weights(model: Any, chain: list[DenseLayer]) -> dict[str, np.ndarray]:
    """The chain's initializers by name, as the model holds them (what a task carries for ``layers = "all"``)."""
    from ..data.adapt._graph import initializer_array, load_model

    proto = load_model(model)
    return {n: initializer_array(proto, n) for layer in chain for n in (layer.weight, layer.bias)}


def _mats(chain: list[DenseLayer], weights: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for layer in chain:
        w = np.asarray(weights[layer.weight], dtype=np.float64)
        out.append(((w.T if layer.trans_b else w).copy(), np.asarray(weights[layer.bias], dtype=np.float64).reshape(-1).copy()))
    return out


def _forward(chain: list[DenseLayer], mats: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    acts, pre = [x], []
    a = x
    for layer, (w, b) in zip(chain, mats):
        z = a @ w + b
        pre.append(z)
        a = np.maximum(z, 0.0) if layer.relu else z
        acts.append(a)
    return acts, pre


def forward(chain: list[DenseLayer], weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's logits for the chain's input ``x`` (rows), float64."""
    return _forward(chain, _mats(chain, weights), np.asarray(x, dtype=np.float64).reshape(len(x), -1))[0][-1]


def _training_inputs(mats: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` flattened to float64 rows and ``y`` as int64 classes, checked against the chain (both trainers)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as samples and at least one sample, got {len(x)} samples and {len(y)} labels")
    classes = mats[-1][0].shape[1]
    yy = np.asarray(y, dtype=np.int64)
    if yy.min() < 0 or yy.max() >= classes:
        raise ValueError(f"labels must be in [0, {classes}), got {int(yy.min())}..{int(yy.max())}")
    xf = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if xf.shape[1] != mats[0][0].shape[0]:
        raise ValueError(f"the chain takes {mats[0][0].shape[0]} features, the samples give {xf.shape[1]}")
    return xf, yy


def train_mlp(chain: list[DenseLayer], base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, recipe: Recipe,
              rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Mini-batch SGD over every layer of the chain (softmax cross-entropy, FedProx ``mu``); returns the new tensors
    by name (the base's shapes and dtypes) and the mean training loss of the last epoch."""
    rng = rng or np.random.default_rng()
    mats = _mats(chain, base)
    start = [(w.copy(), b.copy()) for w, b in mats]
    xf, y = _training_inputs(mats, x, y)
    loss = 0.0
    for _ in range(recipe.epochs):
        order = rng.permutation(len(xf))
        losses = []
        for i in range(0, len(xf), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb, yb = xf[idx], y[idx]
            acts, pre = _forward(chain, mats, xb)
            z = acts[-1] - acts[-1].max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            losses.append(-np.log(np.maximum(p[np.arange(len(yb)), yb], 1e-12)).mean())
            p[np.arange(len(yb)), yb] -= 1.0
            g = p / len(yb)  # d loss / d logits
            grads = [None] * len(mats)
            for k in range(len(mats) - 1, -1, -1):
                w, _ = mats[k]
                grads[k] = (acts[k].T @ g, g.sum(axis=0))
                if k > 0:
                    g = (g @ w.T) * (pre[k - 1] > 0)  # every layer before the head is followed by a ReLU
            for k, ((w, b), (gw, gb)) in enumerate(zip(mats, grads)):  # type: ignore[misc]
                if recipe.mu > 0:
                    gw = gw + recipe.mu * (w - start[k][0])
                    gb = gb + recipe.mu * (b - start[k][1])
                w -= recipe.lr * gw
                b -= recipe.lr * gb
        loss = float(np.mean(losses))
    out: dict[str, np.ndarray] = {}
    for layer, (w, b) in zip(chain, mats):
        bw, bb = np.asarray(base[layer.weight]), np.asarray(base[layer.bias])
        out[layer.weight] = (w.T if layer.trans_b else w).astype(bw.dtype).reshape(bw.shape)
        out[layer.bias] = b.astype(bb.dtype).reshape(bb.shape)
    return out, loss


def torch_available() -> bool:
    """True when torch can be imported on this device (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def train_mlp_torch(chain: list[DenseLayer], base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, recipe: Recipe,
                    rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], float]:
    """:func:`train_mlp` with torch doing the arithmetic (autograd, float64), for devices that have torch: the same
    mini-batches in the same order, the same loss (softmax cross-entropy + FedProx ``mu``), the same plain SGD step,
    so both trainers give the same update up to rounding; torch is only faster on larger layers."""
    import torch

    rng = rng or np.random.default_rng()
    mats = _mats(chain, base)
    xf, yy = _training_inputs(mats, x, y)
    params = [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)) for w, b in mats]
    start = [(w.detach().clone(), b.detach().clone()) for w, b in params]
    xt, yt = torch.from_numpy(xf), torch.from_numpy(yy)
    loss_value = 0.0
    for _ in range(recipe.epochs):
        order = rng.permutation(len(xf))
        losses = []
        for i in range(0, len(xf), recipe.batch_size):
            idx = torch.from_numpy(order[i : i + recipe.batch_size])
            a = xt[idx]
            for k, (w, b) in enumerate(params):
                a = a @ w + b
                if k < len(params) - 1:
                    a = torch.relu(a)
            ce = torch.nn.functional.cross_entropy(a, yt[idx])
            prox = sum(((w - w0) ** 2).sum() + ((b - b0) ** 2).sum() for (w, b), (w0, b0) in zip(params, start))
            total = ce + 0.5 * recipe.mu * prox if recipe.mu > 0 else ce
            grads = torch.autograd.grad(total, [t for pair in params for t in pair])
            with torch.no_grad():
                for t, g in zip([t for pair in params for t in pair], grads):
                    t -= recipe.lr * g
            losses.append(float(ce.detach()))
        loss_value = float(np.mean(losses))
    out: dict[str, np.ndarray] = {}
    for layer, (w, b) in zip(chain, params):
        bw, bb = np.asarray(base[layer.weight]), np.asarray(base[layer.bias])
        wn = w.detach().numpy()
        out[layer.weight] = (wn.T if layer.trans_b else wn).astype(bw.dtype).reshape(bw.shape)
        out[layer.bias] = b.detach().numpy().astype(bb.dtype).reshape(bb.shape)
    return out, loss_value
