"""Small torch models the lab ships, a deterministic trainer, and the figures the reports quote.

Built-in examples (``edgewise compress --model NAME``), each trained in seconds on CPU
on data that ships inside a package (see :mod:`.datasets`):

========================  =========================  ==========================================
name                      input                      model
========================  =========================  ==========================================
``digits-cnn``            ``(n, 1, 32, 32)`` 0..1    3 conv blocks (16-32-64 ch, BN, ReLU, max-pool), FC
``digits-mlp``            ``(n, 64)`` 0..1           64 -> 128 -> 64 -> 10, ReLU
``basicmotions-cnn``      ``(n, 6, 100)`` raw        input BN, 3 conv1d blocks (16-32-64), global avg pool, FC
========================  =========================  ==========================================

Every model class takes ``width`` (channel/unit multiplier) so a smaller student is
``DigitsCNN(width=0.5)`` or :func:`width_scaled`. A user's own model is any
``nn.Module`` mapping a float32 batch to class logits.

Example:
    >>> from edgewise.lab.datasets import load_digits_features
    >>> data = load_digits_features().subset(300, 100)
    >>> model = DigitsMLP()
    >>> result = train(model, data, epochs=2, lr=0.01, seed=0)
    >>> 0.0 <= result.test_accuracy <= 1.0
    True

torch is imported by this module: import it only from the lab, never on a device.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import DataSplit, load_basic_motions, load_digits_features, load_digits_images

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, x_batch, y_batch) -> scalar``; the default is cross-entropy."""


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class DigitsCNN(nn.Module):
    """Three conv blocks (16-32-64 channels x ``width``) on 32x32 digits, then one linear layer."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 1, size: int = 32) -> None:
        super().__init__()
        c1, c2, c3 = _ch(16, width), _ch(32, width), _ch(64, width)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, c1), *block(c1, c2), *block(c2, c3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3 * (size // 8) ** 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """64 raw digit features -> 128 -> 64 -> classes (hidden units x ``width``)."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_features: int = 64) -> None:
        super().__init__()
        h1, h2 = _ch(128, width), _ch(64, width)
        self.net = nn.Sequential(
            nn.Linear(in_features, h1), nn.ReLU(inplace=True), nn.Linear(h1, h2), nn.ReLU(inplace=True),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MotionCNN(nn.Module):
    """1-D CNN for multichannel sensor windows, e.g. BasicMotions (6 channels x 100 steps, 4 classes).

    The first layer is a BatchNorm over the raw channels, so the exported graph takes
    sensor values as recorded (no normalisation step outside the model).
    """

    def __init__(self, width: float = 1.0, num_classes: int = 4, in_channels: int = 6) -> None:
        super().__init__()
        c1, c2, c3 = _ch(16, width), _ch(32, width), _ch(64, width)
        self.norm = nn.BatchNorm1d(in_channels)
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, c1, 5, padding=2, bias=False), nn.BatchNorm1d(c1), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(c1, c2, 5, padding=2, bias=False), nn.BatchNorm1d(c2), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm1d(c3), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.norm(x)))


@dataclass(frozen=True)
class TrainConfig:
    """A training schedule: AdamW with a cosine learning rate, seeded shuffling."""

    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class BuiltinModel:
    """One of the shipped examples: how to build it, its data, and a schedule that trains it well."""

    name: str
    factory: Callable[..., nn.Module]
    load_data: Callable[[], DataSplit]
    train_config: TrainConfig
    description: str

    def build(self, width: float = 1.0) -> nn.Module:
        return self.factory(width=width)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("digits-cnn", DigitsCNN, load_digits_images, TrainConfig(epochs=12, lr=3e-3),
                     "3-block CNN on scikit-learn digits upsampled to 32x32"),
        BuiltinModel("digits-mlp", DigitsMLP, load_digits_features, TrainConfig(epochs=40, lr=3e-3),
                     "MLP on the 64 raw scikit-learn digit pixels"),
        BuiltinModel("basicmotions-cnn", MotionCNN, load_basic_motions, TrainConfig(epochs=60, lr=3e-3, batch_size=16),
                     "1-D CNN on BasicMotions accelerometer+gyroscope (needs `pip install aeon`)"),
    )
}


def builtin(name: str) -> BuiltinModel:
    """Look up a shipped example by name (``digits-cnn``, ``digits-mlp``, ``basicmotions-cnn``)."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}") from None


def width_scaled(factory: Callable[..., nn.Module], width: float, **kwargs: Any) -> nn.Module:
    """A narrower (or wider) model of the same family: ``factory(width=width, **kwargs)``.

    ``factory`` is a model class or function taking ``width`` (every model here does),
    e.g. ``width_scaled(DigitsCNN, 0.5)`` keeps half the channels of every layer.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): just try
        params = None
    if params is not None and "width" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{getattr(factory, '__name__', factory)!r} takes no `width` argument; pass the student model itself")
    return factory(width=width, **kwargs)


# --------------------------------------------------------------------------- figures


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_input(data: DataSplit | np.ndarray, batch: int = 1) -> torch.Tensor:
    """A real input batch (the first ``batch`` test samples) for tracing, counting and export."""
    x = data.x_test if isinstance(data, DataSplit) else data
    return torch.from_numpy(np.ascontiguousarray(x[:batch], dtype=np.float32))


@dataclass(frozen=True)
class ModelStats:
    """Size figures of a torch model: parameters, multiply-accumulates per sample, fp32 weight bytes."""

    params: int
    macs: int
    param_bytes: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def model_stats(model: nn.Module, example: torch.Tensor) -> ModelStats:
    """Parameters and MACs (per sample, from torch-pruning's op counter) of ``model``."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    model.train(was_training)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelStats(params=int(params), macs=int(macs), param_bytes=int(param_bytes))


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` did: final figures and a per-epoch history."""

    epochs: int
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    tx = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ty = None if y is None else (y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return tx.float(), ty


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for every row of ``x``."""
    tx, _ = _tensors(x)
    was_training = model.training
    model.eval()
    out = torch.cat([model(tx[i : i + batch_size]) for i in range(0, len(tx), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    _, ty = _tensors(x, y)
    return float((predict_logits(model, x).argmax(1) == ty).float().mean())


def train(
    model: nn.Module,
    data: DataSplit,
    epochs: int = 10,
    lr: float = 3e-3,
    *,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (AdamW, cosine learning rate); deterministic for a given ``seed``.

    The seed fixes shuffling and any randomness in the model (dropout); the same model
    state, data, seed and thread count give bit-identical weights. ``loss_fn(logits, x, y)``
    replaces cross-entropy (distillation passes its own). Returns final train/test figures.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    x, y = _tensors(data.x_train, data.y_train)
    assert y is not None
    loss_fn = loss_fn or (lambda logits, _x, yb: nn.functional.cross_entropy(logits, yb))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15) if epochs else None
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            total, correct, loss_sum = 0, 0, 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                if len(idx) < 2 and len(x) > 1:  # a batch of one breaks BatchNorm
                    continue
                xb, yb = x[idx], y[idx]
                logits = model(xb)
                loss = loss_fn(logits, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                assert sched is not None
                if sched.last_epoch + 1 < sched.total_steps:
                    sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                total += len(idx)
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)})
            if progress:
                progress(f"epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}, train acc {history[-1]['train_accuracy']:.3f}")
    model.eval()
    test_acc = accuracy(model, data.x_test, data.y_test)
    last = history[-1] if history else {"loss": float("nan"), "train_accuracy": accuracy(model, data.x_train, data.y_train)}
    return TrainResult(
        epochs=epochs, train_loss=float(last["loss"]), train_accuracy=float(last["train_accuracy"]),
        test_accuracy=test_acc, seconds=time.perf_counter() - start, history=history,
    )


def train_builtin(name: str, *, data: DataSplit | None = None, width: float = 1.0, config: TrainConfig | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[nn.Module, DataSplit, TrainResult]:
    """Build and train one of :data:`BUILTIN_MODELS` on its own data (or ``data``); seeded."""
    spec = builtin(name)
    data = data if data is not None else spec.load_data()
    cfg = config or spec.train_config
    torch.manual_seed(cfg.seed)
    model = spec.build(width)
    result = train(model, data, cfg.epochs, cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                   seed=cfg.seed, progress=progress)
    return model, data, result


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (weights, buffers, structure) that training or pruning can change freely."""
    return copy.deepcopy(model)
