"""Knowledge distillation: train a smaller student to match a trained teacher's softened outputs.

The loss is Hinton et al.'s (2015, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531)::

    loss = alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with student logits ``s``, teacher logits ``t``, temperature ``T`` and labels ``y``. The KL
divergence is taken *from the teacher's* distribution (the teacher's soft targets are what the
student is fitted to; ``F.kl_div(log_softmax(s/T), softmax(t/T))``), averaged over the batch;
``T**2`` keeps the soft term's gradients on the scale of the hard term's as ``T`` changes.
``alpha=0`` is plain cross-entropy, ``alpha=1`` pure distillation.

:func:`distill` trains the student twice from the same initial weights, seed and schedule:
once with the distillation loss, once with cross-entropy alone, so the report shows what
the teacher added. The student is any smaller ``nn.Module`` with the same input and output;
:func:`.torch_models.width_scaled` makes one from the teacher's family.

Example:
    >>> import torch
    >>> s, t, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    >>> float(hinton_loss(s, t, y, temperature=2.0, alpha=1.0))  # identical logits: KL is zero
    0.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import DataSplit
from .torch_models import LossFn, ModelStats, TrainResult, accuracy, clone, model_stats, train


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, batch mean."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean", log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * soft + (1 - alpha) * hard


def distillation_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> LossFn:
    """A ``loss_fn(logits, x, y)`` for :func:`.torch_models.train`: the teacher (frozen, eval mode) sees each batch."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(x)
        return hinton_loss(logits, t_logits, y, temperature, alpha)

    return loss_fn


@dataclass
class DistillResult:
    """The distilled student, the same student trained without a teacher, and their figures."""

    student: nn.Module
    baseline: nn.Module | None
    teacher_accuracy: float
    student_accuracy: float
    baseline_accuracy: float | None
    teacher_stats: ModelStats
    student_stats: ModelStats
    temperature: float
    alpha: float
    epochs: int
    seed: int
    student_training: TrainResult
    baseline_training: TrainResult | None

    @property
    def gain(self) -> float | None:
        """Accuracy the teacher added (distilled minus plain), in absolute terms."""
        return None if self.baseline_accuracy is None else self.student_accuracy - self.baseline_accuracy

    def to_json(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature, "alpha": self.alpha, "epochs": self.epochs, "seed": self.seed,
            "teacher": {"accuracy": self.teacher_accuracy, **self.teacher_stats.to_json()},
            "student_distilled": {"accuracy": self.student_accuracy, "seconds": self.student_training.seconds},
            "student_plain": None if self.baseline_accuracy is None else {
                "accuracy": self.baseline_accuracy,
                "seconds": self.baseline_training.seconds if self.baseline_training else None,
            },
            "student": self.student_stats.to_json(),
            "gain": self.gain,
        }


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: DataSplit,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    compare: bool = True,
    example: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train a copy of ``student`` against ``teacher`` on ``data``; with ``compare``, also a copy with cross-entropy only.

    Both copies start from ``student``'s current weights and use the same seed and
    schedule, so the difference between them is the teacher. ``teacher`` and ``student``
    are left untouched.
    """
    say = progress or (lambda _m: None)
    teacher = clone(teacher).eval()
    example = example if example is not None else torch.from_numpy(data.x_test[:1])
    t_out, s_out = teacher(example[:1]).shape, clone(student).eval()(example[:1]).shape
    if t_out != s_out:
        raise ValueError(f"teacher outputs {tuple(t_out)} but student outputs {tuple(s_out)}: they must match")
    initial = clone(student)
    distilled = clone(initial)
    say(f"distilling: T={temperature}, alpha={alpha}, {epochs} epochs")
    kd = train(distilled, data, epochs, lr, batch_size=batch_size, seed=seed,
               loss_fn=distillation_loss(teacher, temperature, alpha), progress=say)
    plain = plain_run = None
    if compare:
        say("training the same student without a teacher")
        plain = clone(initial)
        plain_run = train(plain, data, epochs, lr, batch_size=batch_size, seed=seed, progress=say)
    return DistillResult(
        student=distilled, baseline=plain, teacher_accuracy=accuracy(teacher, data.x_test, data.y_test),
        student_accuracy=kd.test_accuracy, baseline_accuracy=plain_run.test_accuracy if plain_run else None,
        teacher_stats=model_stats(teacher, example), student_stats=model_stats(distilled, example),
        temperature=temperature, alpha=alpha, epochs=epochs, seed=seed,
        student_training=kd, baseline_training=plain_run,
    )
