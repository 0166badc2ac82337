"""Metrics: how good a variant is, in units the accuracy budget is stated in.

One small protocol: ``name``, ``higher_is_better``, ``units`` and
``score(outputs, reference, labels) -> float``. ``drop(baseline, value)`` is
always "how much worse than FP32", positive when worse, in the metric's units:

=================  ====================================  ============================================
metric             used when                             ``--max-accuracy-drop 0.01`` means
=================  ====================================  ============================================
``accuracy``       eval has labels ``y``                 at most 1 point of accuracy lost (fraction)
``top1_agreement`` no labels, classifier output          at most 1 % of samples change their top-1 class
``cosine``         no labels, embedding output           mean cosine similarity to FP32 ≥ 0.99
``max_abs_err``    no labels, anything else              no output element differs from FP32 by > 0.01
=================  ====================================  ============================================

Fidelity metrics (all but ``accuracy``) compare with the original FP32 model's
outputs on the same eval inputs, so FP32 itself scores 1, 1, or 0.

Which output? Classifier metrics read an integer label output of shape (N,) if
the model has one (scikit-learn exports do), else argmax over the last axis of
the first float output of rank 2. Cosine reads the first float output;
max_abs_err reads every float output.

Auto-selection (``choose_metric``), when ``--metric`` is not given:
labels → accuracy. Without labels: *classifier* if the model has an integer output,
or a float output produced by Softmax/LogSoftmax, or named like
``logits|prob|score|class|label``; *embedding* if the output is named like
``emb|feat|vec|hidden|pool|repr`` or produced by LpNormalization; otherwise max_abs_err.

Example:
    >>> import numpy as np
    >>> ref = [np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)]
    >>> out = [np.array([[0.2, 0.8], [0.4, 0.6]], np.float32)]
    >>> m = get_metric("top1_agreement")
    >>> m.score(out, ref, None), m.drop(1.0, 0.5)
    (0.5, 0.5)
    >>> get_metric("max_abs_err").drop(0.0, 0.4) == 0.4
    True
    >>> get_metric("accuracy").score(out, ref, np.array([1, 1]))
    1.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .data import ModelIO
from .errors import MetricError

CLASSIFIER_NAME = re.compile(r"logit|prob|score|class|label", re.IGNORECASE)
EMBEDDING_NAME = re.compile(r"emb|feat|vec|hidden|pool|repr", re.IGNORECASE)


class Metric(Protocol):
    name: str
    higher_is_better: bool
    units: str

    def score(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], labels: np.ndarray | None) -> float: ...

    def drop(self, baseline: float, value: float) -> float: ...


@dataclass(frozen=True)
class _Base:
    label_output: int | None = None  # index of an integer class-label output, if the model has one
    float_output: int = 0  # index of the float output classifier/cosine metrics read
    float_outputs: tuple[int, ...] = (0,)

    def drop(self, baseline: float, value: float) -> float:
        hib = getattr(self, "higher_is_better")
        return float(baseline - value) if hib else float(value - baseline)

    def _classes(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        if self.label_output is not None:
            return np.asarray(outputs[self.label_output]).reshape(-1)
        out = np.asarray(outputs[self.float_output])
        return out.reshape(out.shape[0], -1).argmax(axis=-1)


@dataclass(frozen=True)
class Accuracy(_Base):
    """Fraction of eval samples whose predicted class equals the label ``y``."""

    name: str = "accuracy"
    higher_is_better: bool = True
    units: str = "fraction of samples (0.01 = 1 point)"

    def score(self, outputs, reference, labels):  # type: ignore[no-untyped-def]
        if labels is None:
            raise MetricError("metric 'accuracy' needs labels: add 'y' to the eval .npz, or choose a fidelity metric")
        return float(np.mean(self._classes(outputs) == labels))


@dataclass(frozen=True)
class Top1Agreement(_Base):
    """Fraction of eval samples whose top-1 class matches the FP32 model's."""

    name: str = "top1_agreement"
    higher_is_better: bool = True
    units: str = "fraction of samples agreeing with FP32 (0.01 = 1 %)"

    def score(self, outputs, reference, labels):  # type: ignore[no-untyped-def]
        return float(np.mean(self._classes(outputs) == self._classes(reference)))


@dataclass(frozen=True)
class Cosine(_Base):
    """Mean per-sample cosine similarity to the FP32 model's output."""

    name: str = "cosine"
    higher_is_better: bool = True
    units: str = "mean cosine similarity to FP32 (0.01 = 0.99 floor)"

    def score(self, outputs, reference, labels):  # type: ignore[no-untyped-def]
        a = np.asarray(outputs[self.float_output], np.float64)
        b = np.asarray(reference[self.float_output], np.float64)
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        num = (a * b).sum(axis=1)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(a).sum(1) + np.abs(b).sum(1) == 0, 1.0, 0.0))
        return float(np.mean(cos))


@dataclass(frozen=True)
class MaxAbsError(_Base):
    """Largest absolute difference from FP32 over every element of every float output."""

    name: str = "max_abs_err"
    higher_is_better: bool = False
    units: str = "max absolute error vs FP32, in the output's own units"

    def score(self, outputs, reference, labels):  # type: ignore[no-untyped-def]
        err = 0.0
        for i in self.float_outputs:
            a, b = np.asarray(outputs[i], np.float64), np.asarray(reference[i], np.float64)
            if a.size:
                err = max(err, float(np.max(np.abs(a - b))))
        return err


METRICS = {"accuracy": Accuracy, "top1_agreement": Top1Agreement, "cosine": Cosine, "max_abs_err": MaxAbsError}


def get_metric(name: str, **kwargs) -> Metric:  # type: ignore[no-untyped-def]
    try:
        return METRICS[name](**kwargs)
    except KeyError:
        raise MetricError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def _producers(model_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Output name -> op type of the node producing it (looking through Identity/Cast/Reshape/Flatten)."""
    try:
        import onnx

        g = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - selection then relies on names and dtypes only
        return {}
    by_out = {o: n for n in g.node for o in n.output}
    result = {}
    for out in g.output:
        node = by_out.get(out.name)
        while node is not None and node.op_type in ("Identity", "Cast", "Reshape", "Flatten", "Squeeze") and node.input:
            node = by_out.get(node.input[0])
        result[out.name] = node.op_type if node is not None else ""
    return result


def choose_metric(io: ModelIO, *, has_labels: bool, override: str | None = None, model_path=None) -> tuple[Metric, str]:  # type: ignore[no-untyped-def]
    """The metric for this model and data, and why (see the module docstring)."""
    outs = io.outputs
    label_idx = next((i for i, o in enumerate(outs) if o.dtype.startswith("int") and len(o.shape) == 1), None)
    floats = [i for i, o in enumerate(outs) if o.dtype.startswith("float")]
    rank2 = [i for i in floats if len(outs[i].shape) == 2]
    producers = _producers(model_path) if model_path is not None else {}

    def build(name: str) -> Metric:
        if name in ("accuracy", "top1_agreement") and label_idx is None and not rank2:
            raise MetricError(
                f"metric {name!r} needs a class output: an integer label (N,) or float scores (N, C); "
                f"this model's outputs are {[(o.name, o.dtype, o.shape) for o in outs]}"
            )
        if name in ("cosine", "max_abs_err") and not floats:
            raise MetricError(f"metric {name!r} needs a float output; this model's outputs are {[(o.name, o.dtype) for o in outs]}")
        kwargs = {"label_output": label_idx, "float_output": (rank2 or floats or [0])[0], "float_outputs": tuple(floats)}
        return get_metric(name, **kwargs)

    if override:
        if override == "accuracy" and not has_labels:
            raise MetricError("metric 'accuracy' needs labels: add 'y' to the eval .npz, or choose a fidelity metric")
        return build(override), f"chosen with --metric {override}"
    if has_labels:
        return build("accuracy"), "eval data has labels 'y'"
    classifier = label_idx is not None or any(
        producers.get(outs[i].name) in ("Softmax", "LogSoftmax") or CLASSIFIER_NAME.search(outs[i].name) for i in rank2
    )
    if classifier:
        return build("top1_agreement"), "no labels; the model looks like a classifier (class output, softmax or a logits/probabilities name)"
    embedding = any(
        producers.get(outs[i].name) == "LpNormalization" or EMBEDDING_NAME.search(outs[i].name) for i in floats
    )
    if embedding:
        idx = next(i for i in floats if producers.get(outs[i].name) == "LpNormalization" or EMBEDDING_NAME.search(outs[i].name))
        return get_metric("cosine", label_output=label_idx, float_output=idx, float_outputs=tuple(floats)), (
            "no labels; the model looks like an embedding model (normalized output or an embedding/feature name)"
        )
    return build("max_abs_err"), "no labels and neither a classifier nor an embedding output: worst-case error vs FP32"
