"""Domain-adversarial training (DANN) in the lab: labels from the source domain, unlabeled samples from the devices.

Ganin & Lempitsky, *Unsupervised Domain Adaptation by Backpropagation* (ICML 2015). A feature
extractor feeds two heads: the label classifier (trained on labelled source data) and a domain
discriminator (source vs target) behind a **gradient-reversal layer**: identity on the way forward,
``-lambda`` times the gradient on the way back. The features are pushed to serve the classifier while
making the domains indistinguishable. ``lambda`` ramps from 0 to ``lambda_max`` as
``2 / (1 + exp(-10 p)) - 1`` over training progress ``p``, as in the paper.

The target domain is any array of unlabeled inputs: in the loop, the samples the devices captured
(``edgewise`` sample capture, exported by the control plane) after the bundle's preprocessing.
The trained model exports like any other (the domain head is not part of ``forward``);
:func:`export_keep_batchnorm` keeps BatchNorm nodes in the ONNX graph so the device can still run AdaBN.

Example:
    >>> from edgewise.lab.datasets import load_digits_images
    >>> data = load_digits_images(size=8).subset(200, 50)
    >>> model = DANN.from_digits_cnn(width=0.25, size=8)
    >>> result = train_dann(model, data, data.x_train * 0.5, epochs=1, seed=0)
    >>> 0.0 <= result.test_accuracy <= 1.0
    True

torch is imported by this module (``pip install edgewise[lab]``): never on a device.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .datasets import DataSplit
from .torch_models import DigitsCNN, accuracy


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None


class GradientReversal(nn.Module):
    """Identity forward, gradient times ``-lam`` backward (``lam`` is set by the trainer each step)."""

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.lam)


class DANN(nn.Module):
    """``features`` (input -> flat vector) + ``classifier`` (-> logits) + a domain head behind gradient reversal.

    ``forward`` returns class logits only, so the exported model is a plain classifier.
    """

    def __init__(self, features: nn.Module, classifier: nn.Module, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.reverse = GradientReversal()
        self.domain = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    @classmethod
    def from_digits_cnn(cls, width: float = 1.0, size: int = 32, num_classes: int = 10) -> "DANN":
        """The lab's :class:`~edgewise.lab.torch_models.DigitsCNN` (with BatchNorm) split into features and classifier."""
        cnn = DigitsCNN(width=width, size=size, num_classes=num_classes)
        linear = cnn.classifier[-1]
        assert isinstance(linear, nn.Linear)
        return cls(nn.Sequential(cnn.features, nn.Flatten()), linear, linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def domain_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.domain(self.reverse(features)).squeeze(1)


@dataclass
class DannResult:
    """What :func:`train_dann` did. ``test_accuracy`` is on the source test split and ``target_accuracy`` on
    ``target_eval`` (when given), both with the final BatchNorm statistics (the target's, by default)."""

    epochs: int
    class_loss: float
    domain_loss: float
    domain_accuracy: float
    test_accuracy: float
    target_accuracy: float | None
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def train_dann(
    model: DANN,
    source: DataSplit,
    target_x: np.ndarray,
    *,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    lambda_max: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
    target_eval: tuple[np.ndarray, np.ndarray] | None = None,
    separate_batches: bool = True,
    target_batchnorm: bool = True,
    progress: Callable[[str], None] | None = None,
) -> DannResult:
    """Train ``model`` in place: cross-entropy on labelled ``source.x_train``, domain loss on source vs ``target_x``.

    ``target_x`` are unlabeled target-domain inputs with the source's sample shape (after preprocessing).
    ``target_eval=(x, y)`` only reports accuracy on labelled target data; it never trains on its labels.
    Deterministic for a given ``seed`` and thread count.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    tx = np.asarray(target_x, dtype=np.float32)
    if tx.ndim == 0 or len(tx) < 2:
        raise ValueError(f"target_x needs at least 2 unlabeled samples, got shape {list(tx.shape)}")
    if tx.shape[1:] != source.x_train.shape[1:]:
        raise ValueError(f"target samples have shape {list(tx.shape[1:])}, source samples {list(source.x_train.shape[1:])}; "
                         "pass target inputs preprocessed like the source")
    xs = torch.from_numpy(np.ascontiguousarray(source.x_train, dtype=np.float32))
    ys = torch.from_numpy(np.asarray(source.y_train, dtype=np.int64))
    xt = torch.from_numpy(np.ascontiguousarray(tx))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(xs) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    bce = nn.BCEWithLogitsLoss()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(xs), generator=gen)
            closs = dloss = dacc = 0.0
            n = 0
            for k, i in enumerate(range(0, len(xs), batch_size)):
                idx = order[i : i + batch_size]
                if len(idx) < 2:
                    continue
                p = (epoch * steps + k) / (epochs * steps)
                model.reverse.lam = lambda_max * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)
                tidx = torch.randint(0, len(xt), (len(idx),), generator=gen)
                if separate_batches:  # BatchNorm normalises each domain by its own batch statistics
                    feats = torch.cat([model.features(xs[idx]), model.features(xt[tidx])])
                else:
                    feats = model.features(torch.cat([xs[idx], xt[tidx]]))
                logits = model.classifier(feats[: len(idx)])
                dom = model.domain_logits(feats)
                dlabels = torch.cat([torch.zeros(len(idx)), torch.ones(len(idx))])
                lc = nn.functional.cross_entropy(logits, ys[idx])
                ld = bce(dom, dlabels)
                opt.zero_grad(set_to_none=True)
                (lc + ld).backward()
                opt.step()
                if sched.last_epoch + 1 < sched.total_steps:
                    sched.step()
                closs += float(lc.detach()) * len(idx)
                dloss += float(ld.detach()) * len(idx)
                dacc += float(((dom > 0).float() == dlabels).float().mean()) * len(idx)
                n += len(idx)
            history.append({"epoch": epoch + 1, "class_loss": closs / max(n, 1), "domain_loss": dloss / max(n, 1),
                            "domain_accuracy": dacc / max(n, 1), "lambda": model.reverse.lam})
            if progress:
                h = history[-1]
                progress(f"epoch {epoch + 1}/{epochs}: class loss {h['class_loss']:.4f}, domain acc {h['domain_accuracy']:.3f}")
    if target_batchnorm:
        recalibrate_batchnorm(model, tx, batch_size=batch_size)
    model.eval()
    last = history[-1]
    return DannResult(
        epochs=epochs, class_loss=last["class_loss"], domain_loss=last["domain_loss"], domain_accuracy=last["domain_accuracy"],
        test_accuracy=accuracy(model, source.x_test, source.y_test),
        target_accuracy=accuracy(model, *target_eval) if target_eval is not None else None,
        seconds=time.perf_counter() - start, history=history,
    )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> int:
    """Set every BatchNorm layer's running statistics to those of ``x`` (the target domain); return the BN layers reset.

    The model is deployed on the target domain, so its BN layers should normalise with target statistics
    (AdaBN in the lab; the device can redo it later on its own window).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    model.train()
    tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for i in range(0, len(tx), batch_size):
        if len(tx[i : i + batch_size]) > 1:
            model(tx[i : i + batch_size])
    for m, mom in saved.items():
        m.momentum = mom
    model.train(was_training)
    return len(bns)


def export_keep_batchnorm(model: nn.Module, example: torch.Tensor | np.ndarray, path: str | Path | None = None, *,
                          input_name: str = "x", output_name: str = "logits", opset: int = 17) -> bytes:
    """ONNX bytes of ``model`` (eval mode) with its BatchNormalization nodes kept (not folded into convolutions),
    dynamic batch; written to ``path`` too when given. AdaBN on the device needs the BN nodes; the cost is one
    extra elementwise op per BN layer at inference.
    """
    ex = example if isinstance(example, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (ex,), buf, dynamo=False, opset_version=opset, input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            )
    finally:
        model.train(was_training)
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
