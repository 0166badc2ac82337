"""Drift detection on the device: a prediction observer that compares what the model sees and says
with the reference statistics in its bundle.

Registered by the agent when the loaded bundle carries ``reference`` statistics (see
``edgewise.data.reference``). After every prediction it updates, per sample:

- **input drift**: a sliding-window PSI (or KS) per feature on the reference's fixed bins;
- **sequential change detectors**: Page-Hinkley (and/or ADWIN) on standardised summary scalars
  (``z_mean``, ``z_energy``, ``confidence``, ``entropy``);
- **prediction drift**: a sliding-window PSI on the top-1 confidence, the entropy and the predicted class.

Memory is constant (windows of small integers, fixed-size detector state); the detectors are plain numpy
and Python. Drift *starts* when a window detector's score goes over 1 or a sequential detector fires, and
*ends* when every window score is back under ``end_below`` and no sequential detector fired for a
window's worth of samples: the agent turns both into a ``drift`` event through the outbox. ``drift_score``
(the largest score of any detector, 1 = threshold) goes into telemetry. It also counts, per telemetry
interval, the samples on the reference's shared bins: the mergeable sketch the control plane pools.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Literal, Mapping

import numpy as np

from ..data.drift import ADWIN, KS, PSI
from ..data.drift.page_hinkley import PageHinkleyBank
from ..data.reference import (
    SCALARS,
    Histogram,
    ReferenceStats,
    class_probabilities,
    confidence_entropy,
    input_scalars,
    summary_features,
)

log = logging.getLogger("edgewise.agent.drift")

ScalarDetector = Literal["page_hinkley", "adwin", "both", "none"]

# Samples per detector update. The cost of an update is ~130 µs whatever its size plus ~1.5 µs per sample
# (digits, 64 features), so blocks of 64 cost ~4 µs per sample where blocks of 32 cost ~7; drift is
# noticed at most one block later (docs/data-drift.md has the delays).
DEFAULT_BLOCK = 64


def class_histogram(counts: list[int]) -> Histogram:
    """The predicted-class counts as a histogram on cut points 0.5, 1.5, ... (bin k = class k)."""
    return Histogram(cuts=[k + 0.5 for k in range(len(counts) - 1)], counts=list(counts))


class DriftObserver:
    """Watches every served prediction for input drift, change in summary scalars and prediction drift.

    Samples are buffered and the detectors updated in blocks of ``block`` samples (vectorised numpy:
    a few microseconds per sample instead of tens), so drift is noticed at most ``block - 1`` samples
    later than a per-sample update would.

    Parameters:
        reference: the bundle's reference statistics.
        window: samples in the sliding windows (PSI/KS on features and on predictions).
        alpha: false-alarm probability per check of each window detector.
        input_test: ``psi`` or ``ks`` for per-feature input drift.
        scalar_detector: sequential detector(s) on the summary scalars.
        block: samples buffered before the detectors are updated (1: every sample).
        check_every: compute the window statistics every this many samples (rounded up to blocks).
        ph_delta, ph_threshold: Page-Hinkley on standardised scalars (units: reference standard deviations).
        adwin_delta: ADWIN confidence.
        end_below: drift ends when every window score is under this (hysteresis).
        on_change: ``on_change(active, detail)`` when drift starts (True) or ends (False).
    """

    def __init__(
        self,
        reference: ReferenceStats,
        *,
        window: int = 200,
        alpha: float = 1e-4,
        input_test: Literal["psi", "ks"] = "psi",
        scalar_detector: ScalarDetector = "page_hinkley",
        block: int = DEFAULT_BLOCK,
        check_every: int = DEFAULT_BLOCK,
        ph_delta: float = 0.5,
        ph_threshold: float = 25.0,
        adwin_delta: float = 0.002,
        end_below: float = 0.8,
        on_change: Callable[[bool, dict[str, Any]], None] | None = None,
    ) -> None:
        self.reference = reference
        self.window = int(window)
        self.block = max(1, int(block))
        self.end_below = end_below
        self.on_change = on_change
        self._fmap = reference.feature_map
        self._mean = np.asarray(reference.feature_mean)
        self._std = np.asarray(reference.feature_std)
        self._input_name = reference.input
        self._output_name = reference.output
        test = {"psi": PSI, "ks": KS}.get(input_test)
        if test is None:
            raise ValueError(f"input_test must be 'psi' or 'ks', got {input_test!r}")
        if scalar_detector not in ("page_hinkley", "adwin", "both", "none"):
            raise ValueError(f"scalar_detector must be page_hinkley, adwin, both or none, got {scalar_detector!r}")
        self.input_detector: PSI | KS = test(reference.features, window=window, alpha=alpha, check_every=check_every)
        pred_hists = [h for h in (reference.confidence, reference.entropy) if h is not None]
        if reference.classes:
            pred_hists.append(class_histogram(reference.classes))
        self.prediction_detector: PSI | None = None
        if reference.output and reference.confidence is not None and reference.entropy is not None and reference.classes:
            self.prediction_detector = PSI(pred_hists, window=window, alpha=alpha, check_every=check_every)
        self._scalar_names = [s for s in SCALARS if s in reference.scalars]
        self._scalar_ref = np.array([[reference.scalars[s].mean, reference.scalars[s].std] for s in self._scalar_names]).reshape(-1, 2)
        # Page-Hinkley on all summary scalars at once (one bank: one set of numpy calls per block), ADWIN per scalar
        self._ph = (PageHinkleyBank(len(self._scalar_names), delta=ph_delta, threshold=ph_threshold, mean=0.0)
                    if scalar_detector in ("page_hinkley", "both") and self._scalar_names else None)
        self._adwin: dict[str, ADWIN] = (
            {s: ADWIN(delta=adwin_delta) for s in self._scalar_names} if scalar_detector in ("adwin", "both") else {})
        self._lock = threading.Lock()  # predictions may come from several API threads
        self.samples = 0
        self.active = False
        self.fired: list[str] = []  # detectors that signalled in the latest block
        self._last_sequential = -(10**12)
        self._interval_score = 0.0
        self.alarms = 0  # drift starts since the observer was created
        # the block: raw samples and class scores since the last flush (at most ``block`` rows, or one batch)
        self._shape: tuple[int, ...] | None = None
        self._width = -1  # class scores per row the prediction detector expects
        self._xs: list[np.ndarray] = []  # rows since the last block, as served (copies)
        self._ss: list[np.ndarray] = []  # their class scores
        self._k = 0
        self._pred_rows = 0  # rows in the buffer that came with class scores
        self._reset_sketch()

    # -- the observer protocol ------------------------------------------------------------------

    def observe(self, model: Any, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        # The serving thread's share: keep a copy of the rows (the caller may reuse its buffers) and count them;
        # everything else happens once per block in _flush.
        x = feed.get(self._input_name)
        if x is None:
            return
        shape = x.shape
        if not shape or not shape[0]:
            return
        scores = outputs.get(self._output_name) if self._output_name else None
        with self._lock:
            if shape[1:] != self._shape:
                self._allocate(x, scores)
            if scores is not None and scores.shape == (shape[0], self._width):
                self._ss.append(scores.copy())
                self._pred_rows += shape[0]
            self._xs.append(x.copy())
            self._k += shape[0]
            if self._k >= self.block:
                self._flush()

    def _allocate(self, x: np.ndarray, scores: np.ndarray | None) -> None:
        if self._k:
            self._flush()
        feats = summary_features(x[:1], self._fmap)
        if feats.shape[1] != len(self._mean):
            raise ValueError(f"drift: the input gives {feats.shape[1]} features, the reference has {len(self._mean)}")
        self._shape = x.shape[1:]
        width = len(self.reference.classes or []) or (scores.shape[1] if scores is not None and scores.ndim == 2 else 0)
        self._width = width if width else -1  # -1: no score shape matches, predictions are not watched

    def flush(self) -> None:
        """Update the detectors with the samples buffered so far (the telemetry tick calls it)."""
        with self._lock:
            if self._k:
                self._flush()

    def _flush(self) -> None:
        k = self._k
        with_preds = self._pred_rows == k
        xs, ss = self._xs, self._ss
        self._xs, self._ss = [], []
        self._k = self._pred_rows = 0
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        feats = summary_features(x.astype(np.float64, copy=False), self._fmap)
        z_mean, z_energy = input_scalars(feats, self._mean, self._std)
        cols = {"z_mean": z_mean, "z_energy": z_energy}
        self.samples += k
        fired: list[str] = []
        det = self.input_detector
        idx = det.update_many(feats)
        if np.isfinite(z_energy).all():
            self._sk_feat_flat += det._w.added  # the window just counted these rows on the same bins
        else:  # not-finite values go to the sketch's ``missing``, the rest to their bins
            ok = np.isfinite(feats)
            self._sk_feat += np.bincount((idx + self._sk_base)[ok], minlength=self._sk_feat.size).reshape(self._sk_feat.shape)
            self._sk_missing += (~ok).sum(axis=0)
        if det.drift_detected:
            fired.append("input")
        top = det.score
        pd = self.prediction_detector
        if with_preds and ss:
            probs = class_probabilities(ss[0] if len(ss) == 1 else np.concatenate(ss))
            cls, conf, ent = confidence_entropy(probs)
            cols.update(confidence=conf, entropy=ent)
            if self._sk_conf is not None:
                self._sk_conf += np.bincount(np.searchsorted(self._conf_cuts, conf, side="right"), minlength=self._sk_conf.size)
            if self._sk_cls is not None:
                self._sk_cls += np.bincount(np.minimum(cls, self._sk_cls.size - 1), minlength=self._sk_cls.size)
            if pd is not None:
                pd.update_many(np.stack([conf, ent, cls.astype(np.float64)], axis=1))
                if pd.drift_detected:
                    fired.append("prediction")
                top = max(top, pd.score)
        window_score = top
        if self._scalar_names:
            z = np.full((k, len(self._scalar_names)), np.nan)  # a scalar this block lacks (no scores) is skipped
            for j, name in enumerate(self._scalar_names):
                col = cols.get(name)
                if col is not None:
                    z[:, j] = col
            z = np.clip((z - self._scalar_ref[:, 0]) / self._scalar_ref[:, 1], -10.0, 10.0)
            if self._ph is not None:
                hits = self._ph.update_many(z)
                for j in (np.flatnonzero(hits) if hits.any() else ()):
                    fired.append(f"page_hinkley:{self._scalar_names[j]}")
                    self._last_sequential = self.samples
                top = max(top, float(self._ph.score.max()))
            for j, name in enumerate(self._scalar_names):
                d = self._adwin.get(name)
                if d is None:
                    continue
                hit = False
                for v in z[:, j]:
                    d.update(v)
                    hit = hit or d.drift_detected
                if hit:
                    fired.append(f"adwin:{name}")
                    self._last_sequential = self.samples
                top = max(top, d.score)
        self._sk_n += k
        self.fired = fired
        if top > self._interval_score:
            self._interval_score = top
        if not self.active and fired:
            self.active = True
            self.alarms += 1
            self._notify(True, fired)
        elif self.active and not fired and window_score < self.end_below and self.samples - self._last_sequential > self.window:
            self.active = False
            self._notify(False, [])

    def _notify(self, active: bool, fired: list[str]) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(active, self.detail(fired))
        except Exception:  # reporting must never fail a prediction
            log.debug("drift on_change failed", exc_info=True)

    # -- what the agent reads -------------------------------------------------------------------

    @property
    def scalar_scores(self) -> dict[str, float]:
        """Current score of each sequential detector, keyed ``page_hinkley:<scalar>`` / ``adwin:<scalar>``."""
        out: dict[str, float] = {}
        for j, name in enumerate(self._scalar_names):
            if self._ph is not None:
                out[f"page_hinkley:{name}"] = float(self._ph.score[j])
            if name in self._adwin:
                out[f"adwin:{name}"] = float(self._adwin[name].score)
        return out

    @property
    def drift_score(self) -> float:
        """The largest current score of any detector (1 = its threshold)."""
        scores = [self.input_detector.score, *self.scalar_scores.values()]
        if self.prediction_detector is not None:
            scores.append(self.prediction_detector.score)
        return float(max(scores))

    def take_interval_score(self) -> float:
        """The largest score seen since the previous call (a telemetry interval), then start a new interval."""
        with self._lock:
            if self._k:
                self._flush()
            s = max(self._interval_score, 0.0)
            self._interval_score = 0.0
        return round(s, 4)

    def detail(self, fired: list[str] | None = None) -> dict[str, Any]:
        """What a drift event carries: scores per detector family, the detectors that fired, the worst features."""
        inp = self.input_detector
        names = self.reference.feature_names
        ratio = inp.values / inp.threshold
        worst = np.argsort(-ratio)[:5]
        out: dict[str, Any] = {
            "active": self.active,
            "score": round(self.drift_score, 4),
            "input_score": round(inp.score, 4),
            "samples": self.samples,
            "window": self.window,
            "fired": list(fired or []),
            "drifted_features": [names[i] for i in inp.drifted][:20],
            "worst_features": {names[i]: round(float(ratio[i]), 3) for i in worst},
        }
        if self.prediction_detector is not None:
            out["prediction_score"] = round(self.prediction_detector.score, 4)
        if self.scalar_scores:
            out["scalar_scores"] = {k: round(v, 4) for k, v in self.scalar_scores.items()}
        return out

    # -- sketch counts since the last interval (for the fleet) -----------------------------------

    def _reset_sketch(self) -> None:
        ref = self.reference
        shape = self.input_detector._w.counts.shape
        self._sk_base = (np.arange(ref.num_features) * shape[1])[None, :]
        self._sk_feat = np.zeros(shape, dtype=np.int64)
        self._sk_feat_flat = self._sk_feat.reshape(-1)  # a view: adding the window's flat counts fills _sk_feat
        self._sk_missing = np.zeros(ref.num_features, dtype=np.int64)
        self._conf_cuts = np.asarray(ref.confidence.cuts) if ref.confidence is not None else None
        self._sk_conf = np.zeros(len(ref.confidence.counts), dtype=np.int64) if ref.confidence is not None else None
        self._sk_cls = np.zeros(len(ref.classes), dtype=np.int64) if ref.classes else None
        self._sk_n = 0

    def take_sketch_counts(self) -> dict[str, Any]:
        """Counts on the reference's shared bins since the previous call: ``features`` (one list per feature,
        ``len(cuts) + 1`` counts each), ``missing`` (not-finite values per feature), ``confidence`` (on
        CONFIDENCE_BINS), ``classes`` and ``n``."""
        with self._lock:
            if self._k:
                self._flush()
            bins = [len(h.counts) for h in self.reference.features]
            out = {
                "n": int(self._sk_n),
                "features": [self._sk_feat[i, :b].tolist() for i, b in enumerate(bins)],
                "missing": self._sk_missing.tolist(),
                "confidence": self._sk_conf.tolist() if self._sk_conf is not None else [],
                "classes": self._sk_cls.tolist() if self._sk_cls is not None else [],
            }
            self._reset_sketch()
        return out


def observer_for(model: Any, on_change: Callable[[bool, dict[str, Any]], None] | None = None, **settings: Any) -> DriftObserver | None:
    """A :class:`DriftObserver` for a loaded model whose manifest carries reference statistics, else None."""
    ref = getattr(getattr(model, "manifest", None), "reference", None)
    if ref is None:
        return None
    if not isinstance(ref, ReferenceStats):
        ref = ReferenceStats.model_validate(ref)
    return DriftObserver(ref, on_change=on_change, **settings)


class DriftWatch:
    """The agent's drift observer: follows the live model and keeps one :class:`DriftObserver` for it.

    Always registered; it costs one identity check per prediction while the model has no reference
    statistics. When the serving model changes (update, rollback, restart), the detectors start afresh
    on the new model's reference (a drift on the old model is not carried over), unless the new model has
    the same name, version and reference bins (an adapted model): then the detectors and their state carry on.

    ``on_change(active, detail)`` is called when drift starts or ends; ``detail`` names the model.
    """

    def __init__(self, on_change: Callable[[bool, dict[str, Any]], None] | None = None, **settings: Any) -> None:
        self.on_change = on_change
        self.settings = settings
        self._for: Any = None
        self.observer: DriftObserver | None = None
        self._lock = threading.Lock()
        self._window_start: float | None = None

    def observe(self, model: Any, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if model is not self._for:
            self._bind(model)
        obs = self.observer
        if obs is not None:
            if self._window_start is None:
                import time

                self._window_start = time.time()
            obs.observe(model, feed, outputs)

    def _bind(self, model: Any) -> None:
        with self._lock:
            if model is self._for:
                return
            obs = None
            ref = getattr(getattr(model, "manifest", None), "reference", None)
            current = self.observer
            if (current is not None and ref is not None and getattr(ref, "fingerprint", None)
                    and ref.fingerprint == current.reference.fingerprint
                    and (getattr(model, "name", None), getattr(model, "version", None)) == (getattr(self._for, "name", None), getattr(self._for, "version", None))):
                # the same reference bins (an adapted model, a reload of the same bundle): keep watching, keep the state
                self._for = model
                return
            if ref is not None and getattr(ref, "format", None) != "edgewise-reference/1":
                log.warning("%s %s: reference statistics format %r unknown to this agent; drift detection off",
                            model.name, model.version, ref.format)
            elif ref is not None:
                name, version = model.name, model.version

                def changed(active: bool, detail: dict[str, Any]) -> None:
                    if self.on_change is not None:
                        live = self._for
                        self.on_change(active, {"model": getattr(live, "name", name), "version": getattr(live, "version", version), **detail})

                try:
                    obs = observer_for(model, on_change=changed, **self.settings)
                except Exception as exc:  # a bad reference must not stop serving
                    log.warning("%s %s: drift detection off: %s", name, version, exc)
            self.observer = obs
            self._window_start = None
            self._for = model

    def reset(self) -> None:
        """Forget the detectors' state: the next prediction starts them afresh on the live model's reference
        (an operator's ``drift.reset`` after fixing a sensor, so a drift that ended does not linger)."""
        with self._lock:
            self._for = None
            self.observer = None
            self._window_start = None

    @property
    def drift_score(self) -> float | None:
        """The current score of the live model's detectors (None without reference statistics)."""
        obs = self.observer
        return obs.drift_score if obs is not None else None

    @property
    def active(self) -> bool:
        obs = self.observer
        return bool(obs is not None and obs.active)

    def take_interval(self) -> dict[str, Any]:
        """Telemetry fields for the interval since the previous call: ``drift_score`` (the largest score seen)
        and ``sketch`` (counts on the reference bins); empty without reference statistics."""
        import time

        obs, model = self.observer, self._for
        if obs is None:
            return {}
        out: dict[str, Any] = {"drift_score": obs.take_interval_score()}
        counts = obs.take_sketch_counts()
        start, self._window_start = self._window_start, None
        if not counts["n"]:
            return out  # an idle interval: no ~1.7 KB of zero counts on the wire
        from ..protocol.messages import DriftSketch

        ref = obs.reference
        names = ref.feature_names
        out["sketch"] = DriftSketch(
            model=getattr(model, "name", None), version=getattr(model, "version", None),
            reference=ref.fingerprint or ref.bins_fingerprint(),
            window_start=start or 0.0, window_end=time.time(), n=counts["n"],
            features={names[i]: c for i, c in enumerate(counts["features"])},
            missing={names[i]: m for i, m in enumerate(counts["missing"]) if m},
            confidence_hist=counts["confidence"],
            classes={str(k): c for k, c in enumerate(counts["classes"]) if c},
        )
        return out
