"""Label-free adaptation on the device: a window of recent inputs, AdaBN or CORAL, a trial, a sealed delta.

The pieces:

- :class:`AdaptWindow` is a :class:`~edgewise.agent.observers.PredictionObserver`: it keeps the last
  ``capacity`` preprocessed inputs (exactly what ONNX Runtime got) in a ring buffer. Constant memory;
  one small copy per served sample.
- :class:`Adapter` computes an adaptation of the **signed base model** (never of an adapted one) on that
  window — AdaBN when the model has BatchNorm, else CORAL — and puts it through a trial:
  smoke test, then the *golden gate* (below). Pass: the delta is committed and the adapted model
  goes live; fail: it is dropped and the running model stays. Either way the agent reports an
  ``adaptation`` event with before/after figures.

Why a delta and not a new bundle: the adapted model is no longer the bytes the lab signed. The device
keeps the signed bundle in its slot untouched and stores the adaptation (new initializer values, nothing
else: an adaptation cannot change the graph) as ``state_dir/adapt/committed.ewa``, sealed with the
device's storage key (AES-256-GCM, ``security.encryption``) under a context naming the device and the base
bundle's sha256. At load the agent re-verifies the base bundle's signature as always, opens the delta
(the GCM tag fails for a delta that was altered, sealed by another device, or made for another bundle),
checks every initializer name/shape/dtype against the base model and applies it. A delta from outside
the device is never accepted: there is no import path, and one sealed elsewhere does not open.

The golden gate. The bundle's golden check (``agent.golden``) demands the build-time outputs exactly;
an adapted model differs on purpose, so it cannot pass that. "Not worse on the golden inputs" is
checked instead as top-1 agreement with the build-time golden outputs, for the running model and the
candidate alike, on the golden inputs *as this device would see them*: each channel (axis 1 of the
preprocessed input; the whole sample for flat features) is moved to the window's mean and standard
deviation. The candidate passes if its agreement is at least the running model's minus
``max_golden_drop`` and at least ``min_golden_agreement`` (a floor: an adaptation to a dead sensor
moves golden inputs to a constant, where both models fail). Agreement on the untouched golden inputs
is reported too.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..fsutil import atomic_write

if TYPE_CHECKING:
    from ..bundle import VerifiedBundle
    from ..data.adapt import Adaptation
    from ..security.keystore import Keystore
    from .runtime import LoadedModel

log = logging.getLogger("edgewise.agent.adapt")

COMMITTED = "committed.ewa"
TRIAL = "trial.ewa"
METHODS = ("auto", "adabn", "coral")


class AdaptError(RuntimeError):
    """Adaptation cannot run (no model, too few samples, a model neither method fits); the message says what to do."""


@dataclass
class AdaptSettings:
    """How the device adapts. ``window``: samples kept (0 turns the buffer off); ``min_samples``: needed to adapt."""

    window: int = 256
    min_samples: int = 64
    method: str = "auto"
    alpha: float = 1.0
    coral_where: str = "input"
    coral_shrink: float = 0.2
    max_golden_drop: float = 0.0
    min_golden_agreement: float = 0.5
    drift_cooldown_s: float = 600.0


@dataclass
class AdaptResult:
    """What one adaptation attempt did: ``result`` is ok (committed, live), rolled_back (failed its trial) or failed."""

    result: str
    method: str | None
    reason: str
    samples: int = 0
    trigger: str = "command"
    model: str | None = None
    version: str | None = None
    base_sha256: str | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AdaptWindow:
    """The last ``capacity`` inputs the model was fed (after preprocessing), one row per sample.

    Cleared when a different base model starts serving (its inputs may not even have the same shape).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = max(0, int(capacity))
        self._rows: deque[tuple[np.ndarray, ...]] = deque(maxlen=self.capacity or 1)
        self._names: tuple[str, ...] = ()
        self._sha: str | None = None
        self._lock = threading.Lock()

    def observe(self, model: "LoadedModel", feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if not self.capacity:
            return
        names = model.input_names
        with self._lock:
            if model.sha256 != self._sha or names != self._names:
                self._rows.clear()
                self._sha, self._names = model.sha256, names
            arrays = [feed[n] for n in names]
            n = len(arrays[0]) if arrays[0].ndim else 0
            for i in range(max(0, n - self.capacity), n):
                self._rows.append(tuple(np.array(a[i], copy=True) for a in arrays))

    def __len__(self) -> int:
        return len(self._rows) if self.capacity else 0

    def feed(self, sha256: str | None = None) -> dict[str, np.ndarray]:
        """The window as one feed (samples along axis 0); empty when it holds samples of another model."""
        with self._lock:
            if not self._rows or (sha256 is not None and sha256 != self._sha):
                return {}
            rows = list(self._rows)
            return {n: np.stack([r[j] for r in rows]) for j, n in enumerate(self._names)}

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


class _PatchedBundle:
    """A verified bundle seen through an adaptation: the same manifest, sha256 and key, the adapted model bytes."""

    def __init__(self, bundle: "VerifiedBundle", model_bytes: bytes) -> None:
        self._bundle = bundle
        self._model = model_bytes
        self.manifest = bundle.manifest
        self.sha256 = bundle.sha256
        self.key_id = bundle.key_id
        self.path = bundle.path

    def read_model(self) -> bytes:
        return self._model

    def read_member(self, name: str) -> bytes:
        return self._model if name == self.manifest.model.path else self._bundle.read_member(name)


class Adapter:
    """Computes, tries, commits and restores adaptations of the committed base model (see the module docstring)."""

    def __init__(self, root: Path, keystore: "Keystore", device_id: str, key_label: str = "storage",
                 settings: AdaptSettings | None = None, threads: int | None = None) -> None:
        self.root = Path(root)
        self.keystore = keystore
        self.device_id = device_id
        self.key_label = key_label
        self.settings = settings or AdaptSettings()
        self.threads = threads
        self.active: dict[str, Any] | None = None  # method, samples, base_sha256, committed_at of the live adaptation
        self._lock = threading.Lock()

    # -- sealed delta -----------------------------------------------------------------------------

    def _context(self, base_sha256: str) -> str:
        return f"edgewise-adaptation/1;device={self.device_id};base={base_sha256}"

    def _seal(self, adaptation: "Adaptation", base_sha256: str) -> bytes:
        from ..security.encryption import seal_bytes

        return seal_bytes(adaptation.to_bytes(), keystore=self.keystore, key_label=self.key_label, context=self._context(base_sha256))

    def _open(self, path: Path, base_sha256: str) -> "Adaptation":
        from ..data.adapt import Adaptation
        from ..security.encryption import copy_to_bytes, open_sealed

        plain = open_sealed(path, keystore=self.keystore, context=self._context(base_sha256), name=path.name)
        return Adaptation.from_bytes(copy_to_bytes(plain))

    def describe(self, model: "LoadedModel | None", window: int = 0) -> dict[str, Any]:
        """For ``/v1/health``: the live adaptation (method, samples, base sha256, committed_at) if it belongs to
        ``model``, and how many samples the window holds."""
        active = self.active
        if active and model is not None and active.get("base_sha256") == model.sha256:
            return {**active, "window": window}
        return {"method": None, "window": window}

    def committed_path(self) -> Path:
        return self.root / COMMITTED

    def discard(self) -> bool:
        """Drop the committed adaptation (the base model serves again after the next load); True if there was one."""
        had = self.committed_path().exists()
        self.committed_path().unlink(missing_ok=True)
        self.active = None
        return had

    # -- loading ----------------------------------------------------------------------------------

    def build(self, bundle: "VerifiedBundle", adaptation: "Adaptation") -> "LoadedModel":
        """The adapted model: the verified base model with the adaptation applied, smoke tested."""
        from ..data.adapt import apply_adaptation
        from .runtime import LoadedModel

        model = LoadedModel.from_bundle(_PatchedBundle(bundle, apply_adaptation(bundle.read_model(), adaptation)), threads=self.threads)  # type: ignore[arg-type]
        model.smoke_test()
        return model

    def restore(self, base: "LoadedModel", bundle: "VerifiedBundle") -> tuple["LoadedModel", str | None]:
        """At start: the base model with its committed adaptation applied, or the base model and why not.

        A trial left by a crash is dropped (the adapted model never passed); a delta made for another
        base bundle (the device updated since) is deleted; one that does not open or apply is deleted and reported.
        """
        problems = []
        trial = self.root / TRIAL
        if trial.exists():
            trial.unlink(missing_ok=True)
            problems.append("an adaptation on trial when the agent stopped was dropped (rolled back)")
        path = self.committed_path()
        self.active = None
        if not path.exists():
            return base, "; ".join(problems) or None
        try:
            adaptation = self._open(path, bundle.sha256)
        except Exception as exc:
            from ..security.encryption import EncryptionError

            path.unlink(missing_ok=True)
            if isinstance(exc, EncryptionError):
                problems.append(f"the stored adaptation is not for {base.name} {base.version} on this device (another base bundle, "
                                f"or altered): dropped it, serving the signed model ({exc})")
            else:
                problems.append(f"the stored adaptation cannot be read: dropped it, serving the signed model ({exc})")
            return base, "; ".join(problems)
        try:
            model = self.build(bundle, adaptation)
        except Exception as exc:  # AdaptationError, ModelLoadError
            path.unlink(missing_ok=True)
            problems.append(f"the stored adaptation does not apply to {base.name} {base.version}: dropped it ({exc})")
            return base, "; ".join(problems)
        self.active = {"method": adaptation.method, "samples": adaptation.samples, "base_sha256": bundle.sha256,
                       "committed_at": path.stat().st_mtime}
        log.info("%s %s: applied the committed %s adaptation (%d samples)", base.name, base.version, adaptation.method, adaptation.samples)
        return model, "; ".join(problems) or None

    # -- adapting ---------------------------------------------------------------------------------

    def compute(self, bundle: "VerifiedBundle", window: Mapping[str, np.ndarray], method: str = "auto") -> "Adaptation":
        """An adaptation of the bundle's (signed) model on ``window``: AdaBN, CORAL, or (auto) AdaBN if it has BatchNorm."""
        from ..data.adapt import AdaptationError, SourceStatistics, adabn, batchnorm_nodes, coral, source_statistics
        from ..data.adapt.coral import SOURCE_STATS_MEMBER

        s = self.settings
        if method not in METHODS:
            raise AdaptError(f"unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}")
        model_bytes = bundle.read_model()
        if method == "auto":
            method = "adabn" if batchnorm_nodes(model_bytes) else "coral"
        try:
            if method == "adabn":
                return adabn(model_bytes, window, alpha=s.alpha, min_samples=s.min_samples)
            if SOURCE_STATS_MEMBER in bundle.manifest.members:
                stats = SourceStatistics.from_bytes(bundle.read_member(SOURCE_STATS_MEMBER))
            else:  # no statistics fitted in the lab: the golden inputs are the only source data on the device
                golden = _golden(bundle)
                if golden is None:
                    raise AdaptError("CORAL needs source statistics: the bundle has neither the member "
                                     f"{SOURCE_STATS_MEMBER} nor golden inputs; rebuild it with either")
                stats = source_statistics(model_bytes, _preprocessed(bundle, golden[0]), where=s.coral_where)  # type: ignore[arg-type]
            return coral(model_bytes, window, stats, shrink=s.coral_shrink, min_samples=s.min_samples)
        except AdaptationError as exc:
            raise AdaptError(str(exc)) from None

    def attempt(self, current: "LoadedModel", bundle: "VerifiedBundle", window: Mapping[str, np.ndarray], *,
                method: str = "auto", trigger: str = "command", adaptation: "Adaptation | None" = None) -> tuple["LoadedModel | None", AdaptResult]:
        """Compute (unless ``adaptation`` is given), try and commit an adaptation; return the new model (None if
        nothing changed) and the result. ``current`` is the model serving now (base or adapted)."""
        with self._lock:
            return self._attempt(current, bundle, window, method, trigger, adaptation)

    def _attempt(self, current: "LoadedModel", bundle: "VerifiedBundle", window: Mapping[str, np.ndarray], method: str,
                 trigger: str, adaptation: "Adaptation | None") -> tuple["LoadedModel | None", AdaptResult]:
        base = dict(model=current.name, version=current.version, base_sha256=bundle.sha256, trigger=trigger)
        n = len(next(iter(window.values()))) if window else 0
        if adaptation is None:
            if n < self.settings.min_samples:
                return None, AdaptResult("failed", None, f"the window holds {n} samples, adaptation needs {self.settings.min_samples}; "
                                         "serve more predictions first", samples=n, **base)
            try:
                adaptation = self.compute(bundle, window, method)
            except AdaptError as exc:
                return None, AdaptResult("failed", None if method == "auto" else method, str(exc), samples=n, **base)
        what = adaptation.method
        trial = self.root / TRIAL
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(trial, self._seal(adaptation, bundle.sha256))  # written before loading: a crash drops it at start
            candidate = self.build(bundle, adaptation)
            before, after = golden_figures(bundle, current, candidate, window)
        except Exception as exc:
            trial.unlink(missing_ok=True)
            return None, AdaptResult("rolled_back", what, f"the {what} adaptation failed its trial: {exc}", samples=adaptation.samples,
                                     detail=adaptation.detail, **base)
        s = self.settings
        res = dict(method=what, samples=adaptation.samples, before=before, after=after, detail=adaptation.detail, **base)
        if "golden_shifted" in after:
            worse = after["golden_shifted"] < before["golden_shifted"] - s.max_golden_drop
            low = after["golden_shifted"] < s.min_golden_agreement
            if worse or low:
                trial.unlink(missing_ok=True)
                why = (f"worse on the golden inputs as this device sees them: agreement {after['golden_shifted']:.3f} vs "
                       f"{before['golden_shifted']:.3f} for the running model" if worse else
                       f"golden agreement {after['golden_shifted']:.3f} is below the floor {s.min_golden_agreement:g}")
                return None, AdaptResult("rolled_back", reason=f"the {what} adaptation was not committed: {why}", **res)  # type: ignore[arg-type]
        try:
            trial.replace(self.committed_path())
        except OSError as exc:
            trial.unlink(missing_ok=True)
            return None, AdaptResult("rolled_back", reason=f"cannot commit the adaptation: {exc.strerror or exc}", **res)  # type: ignore[arg-type]
        self.active = {"method": what, "samples": adaptation.samples, "base_sha256": bundle.sha256, "committed_at": time.time()}
        note = "" if "golden_shifted" in after else " (the bundle has no golden inputs: not gated)"
        return candidate, AdaptResult("ok", reason=f"{what} adaptation committed on {adaptation.samples} samples{note}", **res)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the golden gate


def _golden(bundle: "VerifiedBundle") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    golden = bundle.manifest.golden
    if golden is None:
        return None
    with np.load(io.BytesIO(bundle.read_member(golden.member)), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return ({k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")},
            {k[len("outputs/"):]: v for k, v in arrays.items() if k.startswith("outputs/")})


def _preprocessed(bundle: "VerifiedBundle", raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The golden inputs as ONNX Runtime takes them (the bundle's preprocessing on the first input)."""
    spec = bundle.manifest.preprocessing
    first = bundle.manifest.model.inputs[0].name
    return {k: (spec.apply(v) if spec and k == first else v) for k, v in raw.items()}


def _moment_match(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``x`` moved, channel by channel (axis 1 when rank > 2, else the whole sample), to the window's mean and std."""
    axes = (0, *range(2, x.ndim)) if x.ndim > 2 else tuple(range(x.ndim))
    keep = x.ndim > 2
    mx, sx = x.mean(axis=axes, keepdims=keep), x.std(axis=axes, keepdims=keep)
    mw, sw = window.mean(axis=axes, keepdims=keep), window.std(axis=axes, keepdims=keep)
    return ((x - mx) / np.maximum(sx, 1e-8) * sw + mw).astype(x.dtype)


def _top1(model: "LoadedModel", feed: Mapping[str, np.ndarray], output: str) -> np.ndarray:
    """Top-1 of ``output`` for each sample of an already preprocessed feed (the model's own session, batch of one)."""
    run = model._run  # the same ONNX Runtime session the model serves with  # noqa: SLF001
    n = len(next(iter(feed.values())))
    out = []
    for i in range(n):
        (y,) = run([output], {k: v[i : i + 1] for k, v in feed.items()})
        out.append(int(np.asarray(y).reshape(-1).argmax()))
    return np.asarray(out)


def golden_figures(bundle: "VerifiedBundle", current: "LoadedModel", candidate: "LoadedModel",
                   window: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """Top-1 agreement with the build-time golden outputs, running model (before) and candidate (after):
    ``golden`` on the golden inputs as built, ``golden_shifted`` on them moved to the window's statistics."""
    g = _golden(bundle)
    if g is None:
        return {}, {}
    raw, expected = g
    scores = [k for k, v in expected.items() if v.dtype.kind == "f" and v.ndim >= 2 and v[0].size > 1]  # per-sample class vectors
    name = next((k for k in scores if any(t in k.lower() for t in ("prob", "score"))), scores[0] if scores else None)
    if name is None:
        return {}, {}
    want = expected[name].reshape(len(expected[name]), -1).argmax(axis=1)
    clean = _preprocessed(bundle, raw)
    shifted = {k: (_moment_match(v, window[k]) if k in window and v.dtype.kind == "f" else v) for k, v in clean.items()}
    before, after = {}, {}
    for key, feed in (("golden", clean), ("golden_shifted", shifted)):
        before[key] = float((_top1(current, feed, name) == want).mean())
        after[key] = float((_top1(candidate, feed, name) == want).mean())
    return before, after


# --------------------------------------------------------------------------- the agent's side


def base_bundle(agent: Any, sha256: str) -> "VerifiedBundle":
    """The signed bundle the live model came from (its slot, committed or on trial), verified again now."""
    from ..bundle import verify_bundle

    slots = agent.slots
    for rec in (slots.trial(), slots.record()):
        if rec is not None and rec.sha256 == sha256:
            vb = verify_bundle(slots.bundle(rec.slot), agent.updater.trusted())
            if vb.sha256 != sha256:
                raise AdaptError(f"slot {rec.slot} changed since it was recorded (sha256 {vb.sha256[:16]}…); not adapting")
            return vb
    raise AdaptError("the live model's bundle is in no slot (installed from elsewhere?); install it through the agent first")


def adapt_agent(agent: Any, *, method: str = "auto", trigger: str = "command", adaptation: "Adaptation | None" = None) -> AdaptResult:
    """What ``Agent.adapt`` does: adapt the live model on the window, try it, commit or keep, report an event.

    Serialized with updates (the updater's lock): an update never swaps the model under an adaptation.
    """
    with agent.updater._lock:  # noqa: SLF001 - one model change at a time
        current = agent._model  # noqa: SLF001
        if current is None:
            result = AdaptResult("failed", None, "no model installed yet; nothing to adapt", trigger=trigger)
        else:
            window = agent.adapt_window.feed(current.sha256)
            try:
                bundle = base_bundle(agent, current.sha256)
            except Exception as exc:  # AdaptError, BundleError
                result = AdaptResult("failed", None, f"cannot read the signed base bundle: {exc}", trigger=trigger,
                                     model=current.name, version=current.version, base_sha256=current.sha256)
            else:
                model, result = agent.adapter.attempt(current, bundle, window, method=method, trigger=trigger, adaptation=adaptation)
                if model is not None:
                    agent._activate(model)  # noqa: SLF001
    ok = result.result == "ok"
    (log.info if ok else log.warning)("adaptation (%s): %s", trigger, result.reason)
    severity = "info" if ok else ("warning" if result.result == "rolled_back" else "info")
    agent._emit_event("adaptation", f"adaptation {result.result}: {result.reason}", severity=severity, detail=result.to_json())  # noqa: SLF001
    return result


def restore_agent(agent: Any, model: "LoadedModel") -> "LoadedModel":
    """At start: the committed model with its committed adaptation applied (when there is one for it)."""
    adapter: Adapter = agent.adapter
    if not adapter.committed_path().exists() and not (adapter.root / TRIAL).exists():
        return model  # the usual case: nothing to open, onnx is never imported
    try:
        bundle = base_bundle(agent, model.sha256)
    except Exception as exc:
        agent._emit_event("adaptation", f"stored adaptation not applied: {exc}", severity="warning")  # noqa: SLF001
        return model
    adapted, problem = adapter.restore(model, bundle)
    if problem:
        agent._emit_event("adaptation", problem, severity="warning", detail={"result": "rolled_back", "base_sha256": model.sha256})  # noqa: SLF001
    return adapted
