"""Fleet drift: merge the devices' drift sketches and tell a broken device from a changed world.

Devices send :class:`~edgewise.protocol.DriftSketch` counts on the bundle's reference bins. The
control plane adds them per device (and per hour, at ingest) and over the fleet per model version,
then compares three distributions for every feature, for the top-1 confidence and for the
predicted classes:

* device vs **reference** (the held-out statistics frozen into the bundle): has this device drifted?
* device vs **its peers** (the pool of all other devices, leave-one-out so a broken device does not
  pull the pool towards itself): is this device unlike the rest of the fleet?
* **pool** (without the peer outliers) vs reference: has the whole fleet moved?

A device far from its peers while the pool stays close to the reference is a **peer outlier** (a dead
or shifted sensor, a bad installation); a pool far from the reference is a **fleet-wide shift** (the
world changed; no single device is to blame, so none is flagged for it).

The distance is the population stability index (PSI) on the shared bins. PSI measured on finite
samples is biased upwards by about ``(bins − 1) · (1/n + 1/m)`` (it is a χ²/n statistic), so every
threshold here is ``base + that bias``: a device that sent 50 samples is not called drifted for the
noise of a small sample, while one with 50,000 is held to the base threshold. The first section is plain
numpy (tested without HTTP or a database); the second stores sketches and alerts.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..protocol import CONFIDENCE_BINS, DriftSketch
from .models import AlertRow, DriftSketchRow, ModelVersion

log = logging.getLogger(__name__)

PSI_THRESHOLD = 0.25
"""Base PSI above which a distribution counts as changed (the usual "significant shift" rule of thumb)."""
PEER_Z = 3.5
"""A device is a peer outlier only if its distance to its peers is also this many robust standard
deviations (MAD × 1.4826) above the fleet's median distance to peers: one device, not everyone."""
MIN_SAMPLES = 100
"""A device with fewer samples in the window is reported but never judged."""
MIN_PEERS = 3
"""Peer comparison needs at least this many judged devices (with fewer, "the rest of the fleet" is not a crowd)."""
SMOOTH = 0.5
"""Pseudo-count added to every bin before PSI, so an empty bin gives a large but finite log ratio."""

HOUR = 3600
WINDOW_HOURS = 6.0
"""Default look-back of the verdicts (API and alerts alike): long enough for sparse devices to reach
MIN_SAMPLES, short enough that a sensor that broke an hour ago is not diluted by a day of healthy data."""


class SketchMismatchError(ValueError):
    """Two sketches that cannot be added: different model version, reference or bins."""


# -- sketches: plain functions --------------------------------------------------------------------


def _add_lists(a: list[int], b: list[int], what: str) -> list[int]:
    if not a:
        return list(b)
    if not b:
        return list(a)
    if len(a) != len(b):
        raise SketchMismatchError(
            f"{what}: {len(a)} bins in one sketch and {len(b)} in the other; sketches must use the same "
            "reference bins (same bundle) to be added")
    return list(map(operator.add, a, b))


def _add_maps(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + int(v)
    return out


def merge(a: DriftSketch, b: DriftSketch) -> DriftSketch:
    """The sketch of both windows: counts added, the window spanning both.

    Associative and commutative (adding counts), so sketches can be merged per device, per hour and
    over the fleet in any order. Raises :class:`SketchMismatchError` for sketches of different model
    versions or references, or whose bins differ in number.
    """
    for name in ("model", "version", "reference"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None and x != y:
            raise SketchMismatchError(f"cannot add sketches of different {name}s ({x!r} and {y!r}); "
                                      "merge per model version")
    if a.confidence_hist and b.confidence_hist and list(a.confidence_bins) != list(b.confidence_bins):
        raise SketchMismatchError("confidence_bins differ between the sketches; both must use the bundle's bins")
    features = {k: list(v) for k, v in a.features.items()}
    for k, v in b.features.items():
        features[k] = _add_lists(features.get(k, []), v, f"feature {k!r}")
    starts = [s.window_start for s in (a, b) if s.n or s.window_start]
    ends = [s.window_end for s in (a, b) if s.n or s.window_end]
    return DriftSketch.model_construct(  # both inputs were validated; sums of counts stay valid
        model=a.model if a.model is not None else b.model,
        version=a.version if a.version is not None else b.version,
        reference=a.reference if a.reference is not None else b.reference,
        window_start=min(starts) if starts else 0.0,
        window_end=max(ends) if ends else 0.0,
        n=a.n + b.n,
        features=features,
        missing=_add_maps(a.missing, b.missing),
        confidence_bins=list(a.confidence_bins if a.confidence_hist else b.confidence_bins),
        confidence_hist=_add_lists(a.confidence_hist, b.confidence_hist, "confidence_hist"),
        classes=_add_maps(a.classes, b.classes),
    )


def merge_all(sketches: Iterable[DriftSketch]) -> DriftSketch | None:
    """All sketches added together (None for none)."""
    out: DriftSketch | None = None
    for s in sketches:
        out = s if out is None else merge(out, s)
    return out


# -- reference statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The bundle's reference distributions, as counts or proportions on the same bins as the sketches.

    ``features`` maps a feature name to one weight per bin; ``confidence`` is on ``CONFIDENCE_BINS``;
    ``classes`` maps a class index (string) to its weight. ``n`` is the held-out sample size the
    reference was measured on (its own sampling noise enters the threshold; 0: treat as exact).
    """

    features: dict[str, np.ndarray] = field(default_factory=dict)
    confidence: np.ndarray | None = None
    classes: dict[str, float] = field(default_factory=dict)
    n: int = 0
    fingerprint: str | None = None


def _weights(obj: Any) -> list[float] | None:
    """Bin weights from the shapes reference statistics are stored in: a list, or a dict holding
    ``counts``/``hist``/``proportions``/``probs``/``freq``."""
    if isinstance(obj, (list, tuple)) and all(isinstance(x, (int, float)) for x in obj):
        return [float(x) for x in obj]
    if isinstance(obj, Mapping):
        for key in ("counts", "hist", "histogram", "proportions", "probs", "freq", "frequencies"):
            if key in obj:
                return _weights(obj[key])
    return None


def reference_from_dict(ref: Mapping[str, Any]) -> Reference | None:
    """Read reference statistics stored as JSON (the bundle manifest's ``reference`` section).

    The shape is :class:`edgewise.data.reference.ReferenceStats` (``feature_names`` + ``features``: one
    ``{"cuts", "counts"}`` histogram per feature, ``confidence`` histogram, ``classes`` counts by index,
    ``samples``); a mapping ``{"features": {"<name>": {"counts": [...]}}, "classes": {"0": 120}, "n": ...}``
    is read too (extra keys ignored).

    Returns None when there is nothing usable (a bundle built without reference statistics).
    """
    if not isinstance(ref, Mapping):
        return None
    feats: dict[str, np.ndarray] = {}
    raw = ref.get("features") or {}
    items: Iterable[tuple[str, Any]]
    if isinstance(raw, Mapping):
        items = raw.items()
    elif isinstance(raw, list):  # edgewise.data.reference.ReferenceStats: names in feature_names
        names = ref.get("feature_names") or []
        items = [(str(names[i]) if i < len(names) else str(f.get("name", i)), f)
                 for i, f in enumerate(raw) if isinstance(f, Mapping)]
    else:
        items = []
    for name, spec in items:
        w = _weights(spec)
        if w:
            feats[str(name)] = np.asarray(w, dtype=float)
    conf_raw = ref.get("confidence") or ref.get("confidence_hist")
    conf = _weights(conf_raw) if conf_raw is not None else None
    classes_raw = ref.get("classes") or ref.get("class_counts") or {}
    classes: dict[str, float] = {}
    if isinstance(classes_raw, Mapping):
        classes = {str(k): float(v) for k, v in classes_raw.items() if isinstance(v, (int, float))}
    elif isinstance(classes_raw, list):
        w = _weights(classes_raw)
        classes = {str(i): v for i, v in enumerate(w or [])}
    if not feats and conf is None and not classes:
        return None
    n = ref.get("n") or ref.get("samples") or 0
    fp = ref.get("fingerprint") or ref.get("sha256")
    return Reference(features=feats, confidence=np.asarray(conf, dtype=float) if conf else None, classes=classes,
                     n=int(n) if isinstance(n, (int, float)) else 0, fingerprint=str(fp) if fp else None)


def reference_from_manifest(manifest: Mapping[str, Any]) -> Reference | None:
    """The reference statistics of a stored bundle manifest (``reference``, or ``drift.reference``, or
    ``metadata.reference``); None if the bundle has none."""
    for path in (("reference",), ("drift", "reference"), ("metadata", "reference"), ("reference_stats",)):
        node: Any = manifest
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            ref = reference_from_dict(node)
            if ref is not None:
                return ref
    return None


def reference_from_sketch(sketch: DriftSketch) -> Reference:
    """A reference measured as a sketch (tests and tools; the lab freezes the real one into the bundle)."""
    return Reference(features={k: np.asarray(v, dtype=float) for k, v in sketch.features.items()},
                     confidence=np.asarray(sketch.confidence_hist, dtype=float) if sketch.confidence_hist else None,
                     classes={k: float(v) for k, v in sketch.classes.items()}, n=sketch.n,
                     fingerprint=sketch.reference)


# -- distances ------------------------------------------------------------------------------------


def psi(counts: np.ndarray | list[float], expected: np.ndarray | list[float]) -> float:
    """Population stability index of ``counts`` against ``expected`` (both per bin, any scale).

    Each side is smoothed with :data:`SMOOTH` pseudo-counts per bin (``expected`` given as proportions is
    scaled to the size of ``counts`` first), so empty bins give a large, finite value.
    """
    p = np.asarray(counts, dtype=float)
    q = np.asarray(expected, dtype=float)
    if p.shape != q.shape:
        raise SketchMismatchError(f"{p.size} bins against {q.size} reference bins; is the device running this bundle?")
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    if q.sum() <= 1.0 + 1e-9:  # proportions: give them the weight of the sample being compared
        q = q * p.sum()
    p = (p + SMOOTH) / (p.sum() + SMOOTH * p.size)
    q = (q + SMOOTH) / (q.sum() + SMOOTH * q.size)
    return float(np.sum((p - q) * np.log(p / q)))


def psi_bias(bins: int, n: float, m: float = 0.0) -> float:
    """Expected PSI between two samples of sizes ``n`` and ``m`` from the same distribution (m = 0:
    the second one is exact): ``(bins − 1) · (1/n + 1/m)``."""
    if bins <= 1 or n <= 0:
        return 0.0
    return (bins - 1) * (1.0 / n + (1.0 / m if m > 0 else 0.0))


def threshold(bins: int, n: float, m: float = 0.0, base: float = PSI_THRESHOLD) -> float:
    """The PSI above which two samples of these sizes really differ: base + the small-sample bias."""
    return base + psi_bias(bins, n, m)


@dataclass(frozen=True)
class Distance:
    """How far one sketch is from a reference, in units of the size-corrected threshold.

    ``score`` is the largest PSI / threshold over every feature, the confidence and the classes, so
    ``score > 1`` means "changed"; ``worst`` names where; ``psi`` keeps every raw value.
    """

    score: float
    worst: str | None
    psi: dict[str, float]

    @property
    def drifted(self) -> bool:
        return self.score > 1.0


@dataclass(frozen=True)
class _Layout:
    """Where each compared distribution sits in one flat count vector: features, then confidence, then classes.

    Putting every device in one row of a matrix lets the whole fleet be compared in a few numpy calls
    (1,000 devices × 64 features in tens of milliseconds), not a Python loop per device and feature.
    """

    names: list[str]  # "feature:<name>", "confidence", "classes"
    sizes: np.ndarray  # bins per segment
    starts: np.ndarray  # first column of each segment
    features: dict[str, int]  # feature name -> segment index
    class_keys: list[str]

    @property
    def width(self) -> int:
        return int(self.sizes.sum())


def _layout(sketches: Iterable[DriftSketch], ref: Reference | None) -> _Layout:
    feats: dict[str, int] = {k: len(v) for k, v in ref.features.items()} if ref is not None else {}
    conf = len(ref.confidence) if ref is not None and ref.confidence is not None else 0
    classes: set[str] = set(ref.classes) if ref is not None else set()
    for sk in sketches:
        for k, v in sk.features.items():
            feats.setdefault(k, len(v))
        conf = conf or len(sk.confidence_hist)
        classes.update(sk.classes)
    names = [f"feature:{k}" for k in feats] + (["confidence"] if conf else []) + (["classes"] if classes else [])
    class_keys = sorted(classes, key=lambda k: (len(k), k))
    sizes = np.asarray(list(feats.values()) + ([conf] if conf else []) + ([len(class_keys)] if classes else []), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes.size else np.zeros(0, np.int64)
    return _Layout(names, sizes, starts, {k: i for i, k in enumerate(feats)}, class_keys)


def _put(vec: np.ndarray, layout: _Layout, segment: int, values: Any) -> None:
    size, start = int(layout.sizes[segment]), int(layout.starts[segment])
    if len(values) == size:  # other bins (another bundle build): left out of the comparison, never misread
        vec[start:start + size] = values


def _vector(sk: DriftSketch, layout: _Layout) -> np.ndarray:
    vec = np.zeros(layout.width)
    for k, v in sk.features.items():
        if k in layout.features:
            _put(vec, layout, layout.features[k], v)
    if sk.confidence_hist and "confidence" in layout.names:
        _put(vec, layout, layout.names.index("confidence"), sk.confidence_hist)
    if sk.classes and "classes" in layout.names:
        _put(vec, layout, layout.names.index("classes"), [sk.classes.get(k, 0) for k in layout.class_keys])
    return vec


def _ref_vector(ref: Reference, layout: _Layout) -> np.ndarray:
    vec = np.zeros(layout.width)
    for k, v in ref.features.items():
        _put(vec, layout, layout.features[k], v)
    if ref.confidence is not None:
        _put(vec, layout, layout.names.index("confidence"), ref.confidence)
    if ref.classes:
        _put(vec, layout, layout.names.index("classes"), [ref.classes.get(k, 0.0) for k in layout.class_keys])
    return vec


def _distances(p: np.ndarray, q: np.ndarray, layout: _Layout, base: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSI, score (PSI / size-corrected threshold) and validity per row of ``p`` against ``q`` and segment.

    ``q`` is one row (a reference) or one row per row of ``p`` (each device's peers). A segment of ``q``
    that adds up to at most 1 is taken as proportions (exact, no sampling noise) and scaled to ``p``'s size.
    """
    sizes, starts = layout.sizes, layout.starts
    p = np.atleast_2d(p).astype(float)
    q = np.broadcast_to(np.atleast_2d(q), p.shape).astype(float)
    ps = np.add.reduceat(p, starts, axis=1)
    qs = np.add.reduceat(q, starts, axis=1)
    proportions = qs <= 1.0 + 1e-9
    scale = np.where(proportions & (qs > 0), ps / np.where(qs > 0, qs, 1.0), 1.0)
    q = q * np.repeat(scale, sizes, axis=1)
    qs_scaled = qs * scale
    ph = (p + SMOOTH) / np.repeat(ps + SMOOTH * sizes, sizes, axis=1)
    qh = (q + SMOOTH) / np.repeat(qs_scaled + SMOOTH * sizes, sizes, axis=1)
    value = np.add.reduceat((ph - qh) * np.log(ph / qh), starts, axis=1)
    valid = (ps > 0) & (qs > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_n = np.where(ps > 0, 1.0 / ps, 0.0)
        inv_m = np.where(proportions | (qs <= 0), 0.0, 1.0 / np.where(qs > 0, qs, 1.0))
    thr = base + np.maximum(sizes - 1, 0) * (inv_n + inv_m)
    score = np.where(valid, value / thr, 0.0)
    return np.where(valid, value, 0.0), score, valid


def _as_distances(value: np.ndarray, score: np.ndarray, valid: np.ndarray, layout: _Layout) -> list[Distance]:
    out = []
    for i in range(value.shape[0]):
        cols = np.flatnonzero(valid[i])
        if cols.size == 0:
            out.append(Distance(0.0, None, {}))
            continue
        worst = int(cols[np.argmax(score[i, cols])])
        out.append(Distance(round(float(score[i, worst]), 6), layout.names[worst],
                            {layout.names[j]: round(float(value[i, j]), 6) for j in cols}))
    return out


def distance(sketch: DriftSketch, ref: Reference, *, base: float = PSI_THRESHOLD) -> Distance:
    """Compare a sketch with a reference on every feature, the confidence and the classes they share."""
    layout = _layout([sketch], ref)
    if not layout.names:
        return Distance(0.0, None, {})
    return _as_distances(*_distances(_vector(sketch, layout), _ref_vector(ref, layout), layout, base), layout)[0]


# -- the fleet judgement --------------------------------------------------------------------------


DeviceStatus = Literal["ok", "drifted", "peer_outlier", "insufficient_data"]
FleetStatus = Literal["ok", "fleet_shift", "no_reference", "insufficient_data"]


@dataclass(frozen=True)
class DeviceDrift:
    device_id: str
    n: int
    status: DeviceStatus
    reference: Distance | None  # vs the bundle's reference (None: no reference)
    peers: Distance | None  # vs the pool of all other devices (None: too few peers)
    peer_z: float | None  # robust z of the peer distance among the fleet


@dataclass(frozen=True)
class FleetDrift:
    model: str
    version: str
    status: FleetStatus
    devices: list[DeviceDrift]
    pooled: Distance | None  # pool (without peer outliers) vs reference
    n: int
    outliers: list[str]

    def as_dict(self) -> dict[str, Any]:
        def dist(d: Distance | None) -> dict[str, Any] | None:
            return None if d is None else {"score": d.score, "worst": d.worst, "psi": d.psi}

        return {
            "model": self.model, "version": self.version, "status": self.status, "n": self.n,
            "outliers": list(self.outliers), "pooled": dist(self.pooled),
            "devices": [{"device_id": d.device_id, "n": d.n, "status": d.status, "reference": dist(d.reference),
                         "peers": dist(d.peers), "peer_z": d.peer_z} for d in self.devices],
        }


def assess_fleet(
    per_device: Mapping[str, DriftSketch],
    reference: Reference | None,
    *,
    model: str = "",
    version: str = "",
    base: float = PSI_THRESHOLD,
    peer_z: float = PEER_Z,
    min_samples: int = MIN_SAMPLES,
    min_peers: int = MIN_PEERS,
) -> FleetDrift:
    """Judge every device against the reference and its peers, and the fleet against the reference.

    ``per_device`` holds one merged sketch per device (same model version). A judged device (at least
    ``min_samples``) is a **peer outlier** when its distance to the pool of the other judged devices is
    over the size-corrected threshold *and* ``peer_z`` robust standard deviations above the fleet's
    median peer distance. The fleet has **shifted** when the pool of the judged devices that are not
    outliers is over the threshold against the reference. A device far from the reference but close to
    its peers is "drifted" (with the fleet), not an outlier.
    """
    ids = sorted(per_device)
    layout = _layout(per_device.values(), reference)
    if not ids or not layout.names:
        return FleetDrift(model, version, "insufficient_data", [DeviceDrift(d, per_device[d].n, "insufficient_data",
                          None, None, None) for d in ids], None, sum(s.n for s in per_device.values()), [])
    mat = np.stack([_vector(per_device[d], layout) for d in ids])
    n = np.asarray([per_device[d].n for d in ids])
    judged = n >= min_samples
    refq = _ref_vector(reference, layout) if reference is not None else None

    ref_d: list[Distance | None] = [None] * len(ids)
    if refq is not None:
        ref_d = list(_as_distances(*_distances(mat, refq, layout, base), layout))
    peer_d: dict[str, Distance] = {}
    zs: dict[str, float] = {}
    rows = np.flatnonzero(judged)
    if rows.size >= min_peers:
        total = mat[rows].sum(axis=0)
        dists = _as_distances(*_distances(mat[rows], total - mat[rows], layout, base), layout)
        peer_d = {ids[r]: d for r, d in zip(rows, dists)}
        vals = np.asarray([d.score for d in dists])
        med = float(np.median(vals))
        mad = float(np.median(np.abs(vals - med))) * 1.4826
        # a floor on the spread: in a perfectly uniform fleet MAD is ~0 and every wobble would be "3.5 sigma"
        spread = max(mad, 0.1 * med, 0.05)
        zs = {ids[r]: round((v - med) / spread, 3) for r, v in zip(rows, vals)}
    outliers = sorted(dev for dev, d in peer_d.items() if d.drifted and zs.get(dev, 0.0) > peer_z)

    pooled = None
    keep = [r for r in rows if ids[r] not in outliers]
    if refq is not None and keep:
        pooled = _as_distances(*_distances(mat[keep].sum(axis=0), refq, layout, base), layout)[0]
    if reference is None:
        fleet: FleetStatus = "no_reference" if rows.size else "insufficient_data"
    elif pooled is None:
        fleet = "insufficient_data"
    else:
        fleet = "fleet_shift" if pooled.drifted else "ok"

    devices: list[DeviceDrift] = []
    for i, dev in enumerate(ids):
        rd = ref_d[i] if n[i] > 0 else None
        if not judged[i]:
            status: DeviceStatus = "insufficient_data"
        elif dev in outliers:
            status = "peer_outlier"
        elif rd is not None and rd.drifted:
            status = "drifted"
        else:
            status = "ok"
        devices.append(DeviceDrift(dev, int(n[i]), status, rd, peer_d.get(dev), zs.get(dev)))
    return FleetDrift(model=model, version=version, status=fleet, devices=devices, pooled=pooled,
                      n=int(n[judged].sum()), outliers=outliers)


# -- storage: sketches merged per device per hour -------------------------------------------------


def hour_of(ts: float) -> int:
    return int(math.floor(ts / HOUR) * HOUR)


def row_to_sketch(row: DriftSketchRow) -> DriftSketch:
    return DriftSketch.model_construct(model=row.model, version=row.version, reference=row.reference or None,
                       window_start=row.window_start, window_end=row.window_end, n=row.n, features=row.features,
                       missing=row.missing, confidence_bins=row.confidence_bins or list(CONFIDENCE_BINS),
                       confidence_hist=row.confidence_hist, classes=row.classes)


def add_sketch(session: Session, device_id: str, sketch: DriftSketch, *, model: str | None, version: str | None,
               ts: float, now: datetime) -> bool:
    """Add one device sketch to its (device, model version, reference, hour) row; False if refused.

    Called by ingest for newly stored records only (so redelivery does not count twice), inside the
    record's transaction. A sketch whose bins do not match what the device sent earlier in the hour is
    refused and logged, not stored: adding it would corrupt the counts.
    """
    model = sketch.model or model
    version = sketch.version or version
    if not model or not version or sketch.n <= 0:
        return False
    sketch = sketch.model_copy(update={"model": model, "version": version})
    ref = sketch.reference or ""
    hour = hour_of(ts)
    row = session.execute(select(DriftSketchRow).where(
        DriftSketchRow.device_id == device_id, DriftSketchRow.model == model, DriftSketchRow.version == version,
        DriftSketchRow.reference == ref, DriftSketchRow.hour == hour)).scalar_one_or_none()
    if row is None:
        merged = sketch
        row = DriftSketchRow(device_id=device_id, model=model, version=version, reference=ref, hour=hour, sketches=0)
        session.add(row)
    else:
        try:
            merged = merge(row_to_sketch(row), sketch)
        except SketchMismatchError as exc:
            log.warning("%s: drift sketch refused (%s)", device_id, exc)
            return False
    row.n = merged.n
    row.sketches = (row.sketches or 0) + 1
    row.window_start = merged.window_start
    row.window_end = merged.window_end
    row.features = merged.features
    row.missing = merged.missing
    row.confidence_bins = list(merged.confidence_bins)
    row.confidence_hist = merged.confidence_hist
    row.classes = merged.classes
    row.updated_at = now
    return True


def device_sketches(session: Session, model: str, version: str, *, since_hour: int | None = None,
                    device_id: str | None = None, reference: str | None = None) -> dict[str, DriftSketch]:
    """One merged sketch per device for a model version (from ``since_hour`` on; None: all stored).

    ``reference``: only sketches counted on these bins (plus those that named none)."""
    q = select(DriftSketchRow).where(DriftSketchRow.model == model, DriftSketchRow.version == version)
    if reference:
        q = q.where(DriftSketchRow.reference.in_([reference, ""]))
    if since_hour is not None:
        q = q.where(DriftSketchRow.hour >= since_hour)
    if device_id is not None:
        q = q.where(DriftSketchRow.device_id == device_id)
    out: dict[str, DriftSketch] = {}
    for row in session.execute(q.order_by(DriftSketchRow.hour)).scalars():
        s = row_to_sketch(row)
        try:
            out[row.device_id] = merge(out[row.device_id], s) if row.device_id in out else s
        except SketchMismatchError as exc:  # e.g. the bundle was rebuilt with new bins under the same version
            log.warning("%s: skipping a drift sketch of %s %s (%s)", row.device_id, model, version, exc)
    return out


def model_versions_with_sketches(session: Session, *, since_hour: int | None = None) -> list[tuple[str, str]]:
    q = select(DriftSketchRow.model, DriftSketchRow.version).distinct()
    if since_hour is not None:
        q = q.where(DriftSketchRow.hour >= since_hour)
    return sorted((m, v) for m, v in session.execute(q).all())


def stored_reference(session: Session, model: str, version: str) -> Reference | None:
    mv = session.execute(select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version)
                         .order_by(ModelVersion.id)).scalars().first()  # variants of a version share its reference data
    return reference_from_manifest(mv.manifest) if mv is not None and mv.manifest else None


def fleet_drift(session: Session, model: str, version: str, *, hours: float = WINDOW_HOURS, now: datetime,
                **kw: Any) -> FleetDrift:
    """The fleet judgement for one model version over the last ``hours`` (by the devices' clocks as
    corrected by the server)."""
    since = hour_of(now.timestamp() - hours * HOUR) if hours > 0 else None
    ref = stored_reference(session, model, version)
    sketches = device_sketches(session, model, version, since_hour=since, reference=ref.fingerprint if ref else None)
    return assess_fleet(sketches, ref, model=model, version=version, **kw)


# -- alerts ---------------------------------------------------------------------------------------


OPEN_STATUSES = ("firing", "acknowledged")  # an alert is open until resolved (see control.alerts)


def _open_alert(session: Session, kind: str, model: str, version: str, device_id: str | None) -> AlertRow | None:
    q = select(AlertRow).where(AlertRow.kind == kind, AlertRow.status.in_(OPEN_STATUSES), AlertRow.model == model,
                               AlertRow.version == version)
    q = q.where(AlertRow.device_id.is_(None) if device_id is None else AlertRow.device_id == device_id)
    return session.execute(q).scalars().first()


def _set_alert(session: Session, active: bool, kind: str, model: str, version: str, device_id: str | None,
               message: str, detail: dict[str, Any], now: datetime, severity: str = "warning") -> AlertRow | None:
    """Open the alert if the condition holds and none is open; resolve the open one if it stopped."""
    row = _open_alert(session, kind, model, version, device_id)
    if active:
        if row is None:
            row = AlertRow(kind=kind, severity=severity, status="firing", model=model, version=version,
                           device_id=device_id, message=message, detail=detail, opened_at=now, updated_at=now,
                           subject=f"device:{device_id}" if device_id else f"model:{model}@{version}")
            session.add(row)
            log.warning("alert opened: %s", message)
            return row
        row.detail, row.updated_at = detail, now
        return None
    if row is not None:
        row.status, row.resolved_at, row.updated_at = "resolved", now, now
        log.info("alert resolved: %s", row.message)
    return None


def record_alerts(session: Session, report: FleetDrift, now: datetime) -> list[AlertRow]:
    """Open (or resolve) ``drift.peer_outlier`` alerts per device and a ``drift.fleet_shift`` alert per
    model version to match ``report``; returns the newly opened ones. The caller commits."""
    opened: list[AlertRow] = []
    m, v = report.model, report.version
    for d in report.devices:
        if d.status == "insufficient_data":
            continue  # no judgement: leave an open alert as it is
        active = d.status == "peer_outlier"
        worst = d.peers.worst if d.peers else None
        row = _set_alert(session, active, "drift.peer_outlier", m, v, d.device_id,
                         f"{d.device_id} is unlike its peers on {m} {v} (worst: {worst}; "
                         f"score {d.peers.score if d.peers else 0:.2f}, z {d.peer_z})",
                         {"score": d.peers.score if d.peers else None, "worst": worst, "peer_z": d.peer_z, "n": d.n},
                         now)
        if row is not None:
            opened.append(row)
    if report.status in ("ok", "fleet_shift") and report.pooled is not None:
        row = _set_alert(session, report.status == "fleet_shift", "drift.fleet_shift", m, v, None,
                         f"the fleet running {m} {v} has shifted from the reference (worst: {report.pooled.worst}; "
                         f"score {report.pooled.score:.2f})",
                         {"score": report.pooled.score, "worst": report.pooled.worst, "n": report.n,
                          "devices": len(report.devices)}, now)
        if row is not None:
            opened.append(row)
    return opened


def evaluate(session: Session, *, now: datetime, hours: float = WINDOW_HOURS, **kw: Any) -> list[FleetDrift]:
    """Judge every model version that sent sketches in the window and record alerts (commits)."""
    since = hour_of(now.timestamp() - hours * HOUR) if hours > 0 else None
    reports = [fleet_drift(session, m, v, hours=hours, now=now, **kw)
               for m, v in model_versions_with_sketches(session, since_hour=since)]
    for r in reports:
        record_alerts(session, r, now)
    session.commit()
    return reports


class DriftWatch:
    """Ingest's side of fleet drift: add each new record's sketch, and re-judge a model version's fleet
    (recording alerts) at most every ``interval_s`` seconds while its sketches keep arriving.

    Judging reads the last ``hours`` of sketches of every device of the version (measured: about 0.1 s
    for 200 devices × 1 hour, 1.7 s for 200 devices × 24 hours on SQLite), so it runs on a worker
    thread with its own session, never on the MQTT network thread that ingest runs on; a condition
    that starts between two judgements is recorded with the next one. Never raises into ingest: a
    failure is logged and retried with the next sketch.
    """

    def __init__(self, *, interval_s: float = 30.0, hours: float = WINDOW_HOURS) -> None:
        self.interval_s = interval_s
        self.hours = hours
        self.refused = 0  # sketches that did not fit the device's earlier ones in the same hour
        self.judged = 0  # judgements made (for tests and /stats)
        self._last: dict[tuple[str, str], float] = {}
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.lease: Any = None  # issue 9 SCALE: a control.lease.Lease; only its holder judges (several ingest workers)

    def add(self, session: Session, rec: Any, corrected_ts: float | None, now: datetime) -> set[tuple[str, str]]:
        """Store ``rec.sketch`` (a Summary's or Telemetry's), if any; the model version it counted for."""
        sketch = getattr(rec, "sketch", None)
        if sketch is None:
            return set()
        ts = corrected_ts if corrected_ts is not None else rec.ts
        if not add_sketch(session, rec.device_id, sketch, model=rec.model, version=rec.version, ts=ts, now=now):
            if sketch.n > 0:
                self.refused += 1
            return set()
        return {(sketch.model or rec.model, sketch.version or rec.version)}

    def after_commit(self, session: Session, keys: Iterable[tuple[str, str]], now: datetime) -> None:
        """Schedule a judgement of the model versions in ``keys`` that were not judged within ``interval_s``."""
        mono = time.monotonic()
        if self.lease is not None and not self.lease.held():
            return  # another ingest worker judges the fleet (docs/scale-out.md)
        with self._lock:
            for key in keys:
                last = self._last.get(key)
                if last is None or mono - last >= self.interval_s:
                    self._last[key] = mono
                    self._pending.add(key)
            if not self._pending or (self._worker is not None and self._worker.is_alive()):
                return
            bind = session.get_bind()
            self._worker = threading.Thread(target=self._run, args=(bind,), name="edgewise-drift-judge", daemon=True)
            self._worker.start()

    def _run(self, bind: Any) -> None:
        from .timeutil import utcnow

        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                model, version = self._pending.pop()
            with Session(bind=bind) as session:
                try:
                    now = utcnow()
                    record_alerts(session, fleet_drift(session, model, version, hours=self.hours, now=now), now)
                    session.commit()
                    self.judged += 1
                except Exception:
                    session.rollback()
                    log.exception("judging fleet drift of %s %s failed; will retry with the next sketch", model, version)


def list_alerts(session: Session, *, status: str | None = None, kind_prefix: str | None = None,
                limit: int = 200) -> list[AlertRow]:
    q = select(AlertRow)
    if status == "open":  # issue 6's name: every alert not resolved yet
        q = q.where(AlertRow.status.in_(OPEN_STATUSES))
    elif status:
        q = q.where(AlertRow.status == status)
    if kind_prefix:
        q = q.where(AlertRow.kind.startswith(kind_prefix))
    return list(session.execute(q.order_by(AlertRow.opened_at.desc(), AlertRow.id.desc()).limit(limit)).scalars())
