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

from ..data.drift import ADWIN, KS, PSI, PageHinkley
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
        block: int = 32,
        check_every: int = 32,
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
        self.scalar_detectors: dict[str, PageHinkley | ADWIN] = {}
        for s in self._scalar_names:
            if scalar_detector in ("page_hinkley", "both"):
                self.scalar_detectors[f"page_hinkley:{s}"] = PageHinkley(delta=ph_delta, threshold=ph_threshold, mean=0.0)
            if scalar_detector in ("adwin", "both"):
                self.scalar_detectors[f"adwin:{s}"] = ADWIN(delta=adwin_delta)
        self._lock = threading.Lock()  # predictions may come from several API threads
        self.samples = 0
        self.active = False
        self.fired: list[str] = []  # detectors that signalled in the latest block
        self._last_sequential = -(10**12)
        self._interval_score = 0.0
        self.alarms = 0  # drift starts since the observer was created
        # the block buffer: raw samples and class scores, allocated at the first sample
        self._shape: tuple[int, ...] | None = None
        self._xbuf: np.ndarray | None = None
        self._sbuf: np.ndarray | None = None
        self._k = 0
        self._pred_rows = 0  # rows in the buffer that came with class scores
        self._reset_sketch()

    # -- the observer protocol ------------------------------------------------------------------

    def observe(self, model: Any, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        x = feed.get(self._input_name)
        if x is None or x.ndim == 0 or x.shape[0] == 0:
            return
        scores = outputs.get(self._output_name) if self._output_name else None
        if scores is not None and (getattr(scores, "ndim", 0) != 2 or scores.shape[0] != x.shape[0]):
            scores = None
        n = x.shape[0]
        with self._lock:
            if self._shape != x.shape[1:]:
                self._allocate(x, scores)
            xb, sb = self._xbuf, self._sbuf
            preds = scores is not None and sb is not None and scores.shape[1] == sb.shape[1]
            i = 0
            while i < n:  # whole slices into the block buffer: one copy per block, not one per row
                k = self._k
                m = min(n - i, self.block - k)
                xb[k : k + m] = x[i : i + m]  # type: ignore[index]
                if preds:
                    sb[k : k + m] = scores[i : i + m]  # type: ignore[index]
                    self._pred_rows += m
                self._k = k + m
                i += m
                if self._k == self.block:
                    self._flush()

    def _allocate(self, x: np.ndarray, scores: np.ndarray | None) -> None:
        if self._k:
            self._flush()
        feats = summary_features(x[:1], self._fmap)
        if feats.shape[1] != len(self._mean):
            raise ValueError(f"drift: the input gives {feats.shape[1]} features, the reference has {len(self._mean)}")
        self._shape = x.shape[1:]
        self._xbuf = np.zeros((self.block, *self._shape), dtype=np.float64)
        width = len(self.reference.classes or []) or (scores.shape[1] if scores is not None else 0)
        self._sbuf = np.zeros((self.block, width), dtype=np.float64) if width else None

    def flush(self) -> None:
        """Update the detectors with the samples buffered so far (the telemetry tick calls it)."""
        with self._lock:
            if self._k:
                self._flush()

    def _flush(self) -> None:
        k = self._k
        with_preds = self._pred_rows == k
        self._k = self._pred_rows = 0
        feats = summary_features(self._xbuf[:k], self._fmap)  # type: ignore[index]
        z_mean, z_energy = input_scalars(feats, self._mean, self._std)
        cols = {"z_mean": z_mean, "z_energy": z_energy}
        self.samples += k
        fired: list[str] = []
        det = self.input_detector
        idx = det.update_many(feats)
        finite = np.isfinite(z_energy)
        if finite.all():
            self._sk_feat += np.bincount((idx + self._sk_base).reshape(-1), minlength=self._sk_feat.size).reshape(self._sk_feat.shape)
        else:  # not-finite values go to the sketch's ``missing``, the rest to their bins
            ok = np.isfinite(feats)
            self._sk_feat += np.bincount((idx + self._sk_base)[ok], minlength=self._sk_feat.size).reshape(self._sk_feat.shape)
            self._sk_missing += (~ok).sum(axis=0)
        if det.drift_detected:
            fired.append("input")
        top = det.score
        pd = self.prediction_detector
        if with_preds and self._sbuf is not None:
            probs = class_probabilities(self._sbuf[:k])
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
        for j, name in enumerate(self._scalar_names):
            col = cols.get(name)
            if col is None:
                continue
            z = np.clip((col - self._scalar_ref[j, 0]) / self._scalar_ref[j, 1], -10.0, 10.0)
            for kind in ("page_hinkley", "adwin"):
                d = self.scalar_detectors.get(f"{kind}:{name}")
                if d is None:
                    continue
                if isinstance(d, PageHinkley):
                    hit = d.update_many(z) > 0
                else:
                    hit = False
                    for v in z:
                        d.update(v)
                        hit = hit or d.drift_detected
                if hit:
                    fired.append(f"{kind}:{name}")
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
    def drift_score(self) -> float:
        """The largest current score of any detector (1 = its threshold)."""
        scores = [self.input_detector.score] + [d.score for d in self.scalar_detectors.values()]
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
        if self.scalar_detectors:
            out["scalar_scores"] = {k: round(d.score, 4) for k, d in self.scalar_detectors.items()}
        return out

    # -- sketch counts since the last interval (for the fleet) -----------------------------------

    def _reset_sketch(self) -> None:
        ref = self.reference
        shape = self.input_detector._w.counts.shape
        self._sk_base = (np.arange(ref.num_features) * shape[1])[None, :]
        self._sk_feat = np.zeros(shape, dtype=np.int64)
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
