"""The device's side of a federated round (``fl.train`` command; docs/learn.md, "Rounds over real devices").

A round's task (:class:`~edgewise.protocol.messages.FLTask`) names the base model the device must be running and
carries the server's current head: the last linear layer (``Gemm``, or ``MatMul`` + ``Add``, with initializer
weight and bias; the same layer ``data.adapt.coral`` folds into with ``where="features"``). The device

1. reads its locally captured samples (``capture_destination = "local"``: :class:`~edgewise.agent.capture.SampleStore`)
   of that model version, keeping those the model was sure of (``confidence >= min_confidence``) with the model's own
   top-1 as the label (pseudo-labels: captured samples carry no ground truth);
2. computes the head's input for them with ONNX Runtime (the base model with the head's input exposed as an output);
3. trains the head in numpy (``learn.local.train_head``: softmax cross-entropy, FedProx ``mu``) from the server's head;
4. signs the delta with its key and puts an :class:`~edgewise.protocol.messages.FLUpdate` in the durable outbox:
   a device that goes offline after training delivers the update when its link is back.

With ``recipe.layers = "all"`` the task carries every tensor of the dense/ReLU chain that ends in the head (an MLP
exported by skl2onnx is one such chain from the input) and step 3 trains all of them in numpy (``learn.mlp``).

Nothing but the delta and the sample count leaves the device. The samples stay (a later round may use them again).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..protocol.messages import FLTask, FLUpdate, SampleArray

if TYPE_CHECKING:
    from .service import Agent

log = logging.getLogger("edgewise.agent.fl")

FL_KEY_LABEL = "fl-update"  # the device's update-signing key when it has no enrollment certificate


class FLTaskError(RuntimeError):
    """The device cannot run this task; the message says why (it goes back in the command.result event)."""


def run_task(agent: "Agent", args: dict[str, Any]) -> dict[str, Any]:
    """Run one ``fl.train`` task on ``agent``; return the command.result detail (result ok|refused|failed, reason)."""
    try:
        task = FLTask.model_validate(args)
    except ValueError as exc:
        return {"result": "refused", "reason": f"fl.train: invalid task: {exc}"}
    try:
        update = train(agent, task)
    except FLTaskError as exc:
        return {"result": "failed", "reason": str(exc), "job_id": task.job_id, "round": task.round}
    seq = agent._emit(update)  # type: ignore[arg-type]
    if seq is None:
        return {"result": "failed", "reason": "the outbox did not take the update (disk full?)", "job_id": task.job_id, "round": task.round}
    return {"result": "ok", "reason": f"trained on {update.num_samples} samples (loss {update.loss:.4f}); update queued as seq {seq}",
            "job_id": task.job_id, "round": task.round, "num_samples": update.num_samples, "loss": update.loss}


def local_samples(agent: "Agent", model: str, version: str) -> list[Any]:
    """Captured samples of ``model`` ``version`` kept on the device (oldest first)."""
    from .capture import SampleStore

    sink = getattr(agent.capture, "sink", None) if agent.capture is not None else None
    if not isinstance(sink, SampleStore):
        raise FLTaskError('this device keeps no samples locally: set capture = true and capture_destination = "local" in its config')
    return [s for _, s in sink.samples() if s.model == model and s.version == version]


def train(agent: "Agent", task: FLTask) -> FLUpdate:
    """Train the head for ``task`` on the device's samples and return the signed update (not yet queued)."""
    from ..data.adapt._graph import batches, expose, initializer_array, load_model, session
    from ..data.adapt.coral import linear_layer
    from ..learn.local import Recipe, delta_of, train_head
    from .adapt import base_bundle
    from .capture import stack_samples

    if task.recipe.layers not in ("head", "all"):
        raise FLTaskError(f'recipe layers must be "head" or "all", got {task.recipe.layers!r}')
    model = agent.current_model
    if model is None or (model.name, model.version) != (task.model, task.version):
        raise FLTaskError(f"the task is for {task.model} {task.version}; this device runs "
                          f"{f'{model.name} {model.version}' if model else 'no model'}")
    samples = local_samples(agent, task.model, task.version)
    sure = [s for s in samples if s.top1 is not None and s.top1 >= 0 and (s.confidence or 0.0) >= task.min_confidence]
    sure = sure[-task.max_samples:]
    if len(sure) < task.min_samples:
        raise FLTaskError(f"{len(sure)} local samples of {task.model} {task.version} with confidence >= {task.min_confidence} "
                          f"(of {len(samples)} kept); the task needs at least {task.min_samples}")
    if task.recipe.layers == "all":  # FL2: every layer of the MLP tail, in numpy (learn.mlp)
        return _train_all_layers(agent, task, sure)
    try:
        bundle = base_bundle(agent, model.sha256)
        proto = load_model(bundle.read_model())
        layer = linear_layer(proto, "features")
    except Exception as exc:  # AdaptationError (no head), a slot that no longer verifies, an unreadable model
        raise FLTaskError(f"cannot find the head to train: {exc}") from None
    if abs(layer.scale - 1.0) > 1e-9:
        raise FLTaskError(f"head {layer.node!r} is a Gemm with alpha/beta = {layer.scale}; only alpha = beta = 1 is supported")
    given = {t.name: t.array() for t in task.tensors}
    if set(given) != {layer.weight, layer.bias}:
        raise FLTaskError(f"the task's tensors {sorted(given)} are not this model's head ({layer.weight}, {layer.bias})")
    for name, arr in given.items():
        ref = initializer_array(proto, name)
        if arr.shape != ref.shape or not np.isfinite(arr).all():
            raise FLTaskError(f"the task's {name} is {list(arr.shape)} (model: {list(ref.shape)}) or not finite")
    stacked = stack_samples(sure)
    feed = {k[2:]: v for k, v in stacked.items() if k.startswith("x:")}
    sess = session(expose(proto, [layer.input]))
    feats = [np.asarray(sess.run([layer.input], part)[0], dtype=np.float64).reshape(len(next(iter(part.values()))), -1)
             for part in batches(feed, 256)]
    x = np.concatenate(feats)
    y = stacked["top1"].astype(np.int64)
    w = given[layer.weight]
    base = {"W": (w.T if layer.trans_b else w).astype(np.float32), "b": given[layer.bias].reshape(-1).astype(np.float32)}
    r = task.recipe
    try:
        new, loss = train_head(base, x, y, Recipe(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, mu=r.mu, layers="head"),
                               np.random.default_rng(task.seed))
    except ValueError as exc:
        raise FLTaskError(f"local training failed: {exc}") from None
    d = delta_of(new, base)
    tensors = [SampleArray.of(layer.weight, (d["W"].T if layer.trans_b else d["W"]).astype(w.dtype)),
               SampleArray.of(layer.bias, d["b"].reshape(given[layer.bias].shape).astype(given[layer.bias].dtype))]
    update = FLUpdate(device_id=agent.device_id, seq=0, ts=time.time(), mono=time.monotonic(), job_id=task.job_id,
                      round=task.round, base_version=task.base_version, model=task.model, version=task.version,
                      num_samples=len(y), loss=float(loss), labels="pseudo", tensors=tensors, signature="")
    return sign_update(agent, update)


def _train_all_layers(agent: "Agent", task: FLTask, sure: list[Any]) -> FLUpdate:
    """``layers = "all"``: train the dense/ReLU chain that ends in the head (``learn.mlp``) from the task's tensors,
    on the chain's input computed with ONNX Runtime (whatever is before the chain stays frozen)."""
    from ..data.adapt._graph import batches, expose, load_model, session
    from ..learn.local import Recipe
    from ..learn.mlp import ChainError, chain_weights, mlp_chain, torch_available, train_mlp, train_mlp_torch
    from .adapt import base_bundle
    from .capture import stack_samples

    model = agent.current_model
    assert model is not None
    try:
        proto = load_model(base_bundle(agent, model.sha256).read_model())
        chain = mlp_chain(proto)
    except ChainError as exc:
        raise FLTaskError(f"cannot find layers to train: {exc}") from None
    except Exception as exc:  # a slot that no longer verifies, an unreadable model
        raise FLTaskError(f"cannot read the model to train: {exc}") from None
    ref = chain_weights(proto, chain)
    given = {t.name: t.array() for t in task.tensors}
    if set(given) != set(ref):
        raise FLTaskError(f'layers = "all": the task\'s tensors {sorted(given)} are not this model\'s dense chain {sorted(ref)}')
    for name, arr in given.items():
        if arr.shape != ref[name].shape or not np.isfinite(arr).all():
            raise FLTaskError(f"the task's {name} is {list(arr.shape)} (model: {list(ref[name].shape)}) or not finite")
    stacked = stack_samples(sure)
    feed = {k[2:]: v for k, v in stacked.items() if k.startswith("x:")}
    first = chain[0].input
    if first in feed:  # the chain starts at a graph input (no frozen part)
        x = np.asarray(feed[first], dtype=np.float64).reshape(len(feed[first]), -1)
    else:
        sess = session(expose(proto, [first]))
        x = np.concatenate([np.asarray(sess.run([first], part)[0], dtype=np.float64).reshape(len(next(iter(part.values()))), -1)
                            for part in batches(feed, 256)])
    y = stacked["top1"].astype(np.int64)
    base = {k: v.astype(ref[k].dtype) for k, v in given.items()}
    r = task.recipe
    try:
        # torch on devices that have it (same update as numpy's, up to rounding), numpy on the others
        trainer = train_mlp_torch if getattr(agent.config, "fl_torch", "auto") == "auto" and torch_available() else train_mlp
        new, loss = trainer(chain, base, x, y, Recipe(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, mu=r.mu, layers="all"),
                            np.random.default_rng(task.seed))
    except ValueError as exc:
        raise FLTaskError(f"local training failed: {exc}") from None
    tensors = [SampleArray.of(k, (new[k] - base[k]).astype(base[k].dtype)) for k in base]
    update = FLUpdate(device_id=agent.device_id, seq=0, ts=time.time(), mono=time.monotonic(), job_id=task.job_id,
                      round=task.round, base_version=task.base_version, model=task.model, version=task.version,
                      num_samples=len(y), loss=float(loss), labels="pseudo", tensors=tensors, signature="")
    return sign_update(agent, update)


def sign_update(agent: "Agent", update: FLUpdate) -> FLUpdate:
    """Sign with the enrollment identity key (and attach the certificate) when the device is enrolled, else with its
    own FL key (created on first use in the agent's keystore; its public key travels with the update and is pinned
    by the control plane at first contact)."""
    from cryptography.hazmat.primitives import serialization

    from ..security.keystore import FileKeystore
    from .enroll import IDENTITY_LABEL

    cfg = agent.config
    cert_path = cfg.device_cert_path
    identity = FileKeystore(cfg.state_dir / "keys")
    fields: dict[str, Any]
    if cert_path.exists() and identity.has_key(IDENTITY_LABEL):
        store, label = identity, IDENTITY_LABEL
        fields = {"certificate": cert_path.read_text(encoding="utf-8"), "public_key": None}
    else:
        store, label = agent.keystore, FL_KEY_LABEL
        if not store.has_key(label):
            store.create_key(label, "ec-p256")
            log.info("created the federated-learning signing key %r in %s", label, store.url)
        pub = store.public_key(label).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[union-attr]
        fields = {"certificate": None, "public_key": pub.decode()}
    unsigned = update.model_copy(update={**fields, "signature": ""})
    signature = store.sign(label, unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})
