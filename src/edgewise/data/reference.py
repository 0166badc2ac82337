"""Reference statistics: what "normal" input and output look like, measured in the lab, frozen in the bundle.

Built once from held-out data (inputs after the bundle's preprocessing, and the model's own outputs
on them), stored in the signed manifest as ``reference``, and read by the drift detectors on the
device and by the control plane (the histogram cut points are the *shared bins* every device counts
on, so sketches from many devices add up).

What is summarised:

- **features**: ``flat`` (every element of a sample is one feature: tabular data, 8x8 digits) or
  ``channels`` (images and time series: per channel the mean, the standard deviation and the rms of
  first differences along the last axis, i.e. level, spread and high-frequency energy, 3 per channel);
- per feature: a histogram on fixed cut points (reference deciles), mean and standard deviation;
- per sample scalars for the sequential detectors: ``z_mean`` (mean standardised feature value: gain
  and offset), ``z_energy`` (mean squared standardised value: noise, contrast, dead channels),
  ``confidence`` (top-1 probability) and ``entropy`` (normalised to 0..1), each with its reference
  mean and standard deviation;
- the top-1 confidence histogram (on :data:`~edgewise.protocol.messages.CONFIDENCE_BINS`), the
  entropy histogram and the predicted class counts.

Only numpy and pydantic here: the agent imports this module. :func:`build_reference` (lab side)
imports ONNX Runtime lazily.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..protocol.messages import CONFIDENCE_BINS

REFERENCE_FORMAT = "edgewise-reference/1"
#: Cut points of the entropy histogram (normalised entropy, 0..1).
ENTROPY_BINS: tuple[float, ...] = CONFIDENCE_BINS
#: Above this many elements per sample, ``auto`` summarises by channel instead of using every element.
MAX_FLAT_FEATURES = 256
SCALARS = ("z_mean", "z_energy", "confidence", "entropy")


class ReferenceStatsError(ValueError):
    """Reference statistics cannot be built or do not fit the input; the message says what to change."""


class FeatureMap(BaseModel):
    """How a sample becomes the feature vector the histograms are kept on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "channels"] = "flat"
    channel_axis: int = Field(default=1, ge=1, description="Axis of the channels in the batched input (channels only).")


class Histogram(BaseModel):
    """Counts on fixed bins: bin ``k`` holds ``x`` with ``k`` = number of cut points ``<= x``
    (``numpy.searchsorted(cuts, x, side="right")``), so there are ``len(cuts) + 1`` bins."""

    model_config = ConfigDict(extra="forbid")

    cuts: list[float]
    counts: list[int]

    @model_validator(mode="after")
    def _sizes(self) -> "Histogram":
        if len(self.counts) != len(self.cuts) + 1:
            raise ValueError(f"a histogram with {len(self.cuts)} cut points needs {len(self.cuts) + 1} counts, got {len(self.counts)}")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:])):
            raise ValueError("histogram cut points must increase strictly")
        return self

    @classmethod
    def fit(cls, values: Any, bins: int = 10) -> "Histogram":
        """Cut points at the quantiles of ``values`` (ties merged) and the counts of ``values`` on them."""
        v = np.asarray(values, dtype=np.float64).ravel()
        return _histogram(v, _quantile_cuts(v, bins))

    def probabilities(self, pseudo: float = 0.5) -> np.ndarray:
        """Bin probabilities with ``pseudo`` added to every count (an empty reference bin is not impossible)."""
        c = np.asarray(self.counts, dtype=np.float64) + pseudo
        return c / c.sum()


class ScalarStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float = Field(gt=0)


class ReferenceStats(BaseModel):
    """Reference statistics of one model's held-out data (manifest field ``reference``)."""

    model_config = ConfigDict(extra="ignore")

    format: str = Field(default=REFERENCE_FORMAT, description="Readers skip drift detection on a format they do not know.")
    input: str = Field(description="The model input the features are computed from (after preprocessing).")
    output: str | None = Field(default=None, description="The class-score output used for confidence and classes (None: no classifier output).")
    samples: int = Field(ge=1, description="Held-out samples the statistics were computed from.")
    feature_map: FeatureMap = Field(default_factory=FeatureMap)
    feature_names: list[str]
    features: list[Histogram]
    feature_mean: list[float]
    feature_std: list[float] = Field(description="Standard deviations, floored so constant features do not divide by zero.")
    scalars: dict[str, ScalarStats] = Field(default_factory=dict)
    confidence: Histogram | None = None
    entropy: Histogram | None = None
    classes: list[int] | None = Field(default=None, description="Predicted top-1 class counts, by class index.")
    fingerprint: str | None = Field(default=None, description="sha256 (first 16 hex) of the bins: sketches on other bins never merge.")

    @model_validator(mode="after")
    def _lengths(self) -> "ReferenceStats":
        n = len(self.feature_names)
        if not (len(self.features) == len(self.feature_mean) == len(self.feature_std) == n):
            raise ValueError(f"reference: {n} feature names but {len(self.features)} histograms, {len(self.feature_mean)} means, "
                             f"{len(self.feature_std)} standard deviations")
        return self

    def bins_fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of everything that defines the shared bins: feature map, names, cut points."""
        import hashlib
        import json

        doc = {
            "map": self.feature_map.model_dump(mode="json"), "names": self.feature_names,
            "cuts": [h.cuts for h in self.features], "confidence": list(CONFIDENCE_BINS),
            "classes": len(self.classes or []),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def cut_matrix(self) -> np.ndarray:
        """Cut points as a ``(features, max_cuts)`` float64 matrix padded with +inf (a padded cut is never ``<= x``)."""
        width = max((len(h.cuts) for h in self.features), default=0)
        m = np.full((self.num_features, max(width, 1)), np.inf)
        for i, h in enumerate(self.features):
            m[i, : len(h.cuts)] = h.cuts
        return m

    def reference_probabilities(self, pseudo: float = 0.5) -> np.ndarray:
        """``(features, max_cuts + 1)`` reference bin probabilities; bins a feature does not have are 0."""
        width = self.cut_matrix().shape[1] + 1
        p = np.zeros((self.num_features, width))
        for i, h in enumerate(self.features):
            p[i, : len(h.counts)] = h.probabilities(pseudo)
        return p


# -- shared by lab and agent: samples -> features -> scalars ----------------------------------------------


def summary_features(x: np.ndarray, fmap: FeatureMap) -> np.ndarray:
    """``(n, features)`` float64 feature vectors of a batch ``x`` (samples along axis 0)."""
    x = np.asarray(x)
    n = x.shape[0]
    if fmap.kind == "flat":
        return x.reshape(n, -1).astype(np.float64, copy=False)
    if x.ndim < 3:
        raise ReferenceStatsError(f"channel features need inputs of rank >= 3 (batch, channels, ...), got shape {list(x.shape)}; use kind='flat'")
    x = np.moveaxis(x, fmap.channel_axis, 1).reshape(n, x.shape[fmap.channel_axis], -1).astype(np.float64, copy=False)
    mean = x.mean(axis=2)
    std = x.std(axis=2)
    rough = np.sqrt(np.mean(np.square(np.diff(x, axis=2)), axis=2)) if x.shape[2] > 1 else np.zeros_like(mean)
    return np.concatenate([mean, std, rough], axis=1)


def feature_names(sample_shape: tuple[int, ...], fmap: FeatureMap) -> list[str]:
    if fmap.kind == "flat":
        return [f"x[{i}]" for i in range(int(np.prod(sample_shape)))]
    channels = sample_shape[fmap.channel_axis - 1]
    return [f"{stat}[{c}]" for stat in ("mean", "std", "diff_rms") for c in range(channels)]


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of class scores as probabilities: taken as they are when they already are (non-negative,
    summing to 1), else softmaxed (logits from a torch export)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.min() >= 0 and float(np.abs(s.sum(axis=1) - 1.0).max()) <= 1e-3:
        return s
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def find_class_output(outputs: Mapping[str, Any]) -> str | None:
    """The classifier's per-class output: the first 2-D float output whose name contains "prob" or "score",
    else the first 2-D float output, else None (the agent's Summary uses the same rule)."""
    fallback = None
    for name, arr in outputs.items():
        if getattr(arr, "ndim", 0) == 2 and arr.dtype.kind == "f" and arr.shape[1] > 0:
            if "prob" in name.lower() or "score" in name.lower():
                return name
            if fallback is None:
                fallback = name
    return fallback


def confidence_entropy(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 class, top-1 confidence and entropy normalised to 0..1 per row."""
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(probs)), top]
    k = probs.shape[1]
    ent = np.einsum("ij,ij->i", probs, np.log(np.maximum(probs, 1e-12))) * (-1.0 / (np.log(k) if k > 1 else 1.0))
    return top, conf, np.clip(ent, 0.0, 1.0)


def input_scalars(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample ``z_mean`` and ``z_energy`` of ``(n, features)`` vectors."""
    z = (features - mean) / std
    inv = 1.0 / z.shape[1]
    return z.sum(axis=1) * inv, np.einsum("ij,ij->i", z, z) * inv


def _histogram(values: np.ndarray, cuts: np.ndarray) -> Histogram:
    idx = np.searchsorted(cuts, values, side="right")
    return Histogram(cuts=[float(c) for c in cuts], counts=np.bincount(idx, minlength=len(cuts) + 1).tolist())


def _quantile_cuts(values: np.ndarray, bins: int) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([0.0])
    q = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    cuts = np.unique(q)
    if len(cuts) == 1 and np.all(finite == cuts[0]):
        cuts = np.array([cuts[0], np.nextafter(cuts[0], np.inf)])  # constant feature: [< v], [== v], [> v]
    return cuts


def compute_reference(
    inputs: np.ndarray,
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    input_name: str = "x",
    bins: int = 10,
    feature_map: FeatureMap | Literal["auto", "flat", "channels"] = "auto",
) -> ReferenceStats:
    """Reference statistics of held-out ``inputs`` (already preprocessed, samples along axis 0) and the
    model's ``outputs`` on them (optional: without a class output, only input drift can be watched).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = compute_reference(rng.normal(size=(500, 4)), {"probabilities": rng.dirichlet(np.ones(3), 500)})
        >>> ref.num_features, len(ref.features[0].counts), sum(ref.classes)
        (4, 10, 500)
    """
    x = np.asarray(inputs)
    if x.ndim < 2 or x.shape[0] < 20:
        raise ReferenceStatsError(f"reference inputs need samples along axis 0 and at least 20 of them, got shape {list(x.shape)}")
    if x.dtype.kind not in "biuf":
        raise ReferenceStatsError(f"reference inputs must be numeric, got dtype {x.dtype}")
    if not 2 <= bins <= 64:
        raise ReferenceStatsError(f"bins must be between 2 and 64, got {bins}")
    if isinstance(feature_map, str):
        per_sample = int(np.prod(x.shape[1:]))
        kind = feature_map if feature_map != "auto" else ("flat" if per_sample <= MAX_FLAT_FEATURES or x.ndim < 3 else "channels")
        feature_map = FeatureMap(kind=kind)  # type: ignore[arg-type]
    feats = summary_features(x, feature_map)
    if not np.isfinite(feats).all():
        raise ReferenceStatsError("reference inputs hold NaN or inf; clean the held-out data (or add imputation to the preprocessing)")
    mean = feats.mean(axis=0)
    std = feats.std(axis=0)
    positive = std[std > 0]
    floor = max(0.05 * float(np.median(positive)) if positive.size else 1.0, 1e-6)
    std = np.maximum(std, floor)
    hists = [_histogram(feats[:, j], _quantile_cuts(feats[:, j], bins)) for j in range(feats.shape[1])]
    z_mean, z_energy = input_scalars(feats, mean, std)
    scalars = {"z_mean": z_mean, "z_energy": z_energy}
    out_name = find_class_output(outputs) if outputs else None
    conf_h = ent_h = classes = None
    if out_name is not None:
        probs = class_probabilities(np.asarray(outputs[out_name])[: len(x)])  # type: ignore[index]
        top, conf, ent = confidence_entropy(probs)
        conf_h = _histogram(conf, np.asarray(CONFIDENCE_BINS[1:-1]))
        ent_h = _histogram(ent, np.asarray(ENTROPY_BINS[1:-1]))
        classes = np.bincount(top, minlength=probs.shape[1]).tolist()
        scalars.update(confidence=conf, entropy=ent)
    ref = ReferenceStats(
        input=input_name, output=out_name, samples=len(x), feature_map=feature_map,
        feature_names=feature_names(x.shape[1:], feature_map), features=hists,
        feature_mean=mean.tolist(), feature_std=std.tolist(),
        scalars={k: ScalarStats(mean=float(v.mean()), std=max(float(v.std()), 1e-6)) for k, v in scalars.items()},
        confidence=conf_h, entropy=ent_h, classes=classes,
    )
    ref.fingerprint = ref.bins_fingerprint()
    return ref


def build_reference(
    model_bytes: bytes,
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    *,
    preprocessing: Any = None,
    bins: int = 10,
    feature_map: FeatureMap | Literal["auto", "flat", "channels"] = "auto",
) -> ReferenceStats:
    """Lab side: run the model on raw held-out ``inputs`` (the bundle's preprocessing applied to the first
    input, as on the device) and compute :func:`compute_reference` on what the model saw and answered."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, np.ndarray):
        if len(names) != 1:
            raise ReferenceStatsError(f"the model takes {len(names)} inputs {names}; give the held-out data as an npz with one array per input")
        inputs = {names[0]: inputs}
    if len(names) == 1 and names[0] not in inputs:
        # a single-input model: accept the one array of the file, or a lab split's held-out part
        arrays = list(inputs)
        key = arrays[0] if len(arrays) == 1 else ("x_test" if "x_test" in inputs else None)
        if key is not None:
            inputs = {names[0]: inputs[key]}
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ReferenceStatsError(f"held-out data lacks the model input(s) {missing}; it holds {sorted(inputs)} (npz keys must be the input names)")
    feed = {}
    for j, n in enumerate(names):
        a = np.asarray(inputs[n])
        if j == 0 and preprocessing:
            a = preprocessing.apply(a)
        feed[n] = a
    out_names = [o.name for o in sess.get_outputs()]
    try:
        outs = dict(zip(out_names, sess.run(out_names, feed)))
    except Exception as exc:
        raise ReferenceStatsError(f"the model fails on the held-out data: {exc}") from None
    return compute_reference(feed[names[0]], outs, input_name=names[0], bins=bins, feature_map=feature_map)
