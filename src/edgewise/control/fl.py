"""Federated jobs over real devices: rounds that never wait for a device that left (docs/learn.md).

A job (:class:`FLJobSpec`, from ``edgewise fl start JOB.toml`` or ``POST /api/v1/fl/jobs``) trains the head of a
registered model version (its last linear layer) on the devices' locally captured samples. The engine
(:class:`FLEngine`, one loop started by ControlServices, state in the database) repeats:

1. **open** a round: draw ``cohort_size`` devices at random from the job's group / tag / device list among those
   running the base version, send each an ``fl.train`` command (the current head, the recipe, the deadline);
   with DP, first check that the budget affords the round (else the job stops: ``budget spent``);
2. updates arrive through the devices' outboxes (``telemetry/fl``), whenever they do: :func:`receive_update`
   checks each once (invited device, signature, model, tensor names and shapes, finite values) and keeps it or
   rejects it with a reason; a (job, device, round) is stored once, so a replay is never counted twice;
3. **close** the round at ``max_updates`` or at the deadline with whatever arrived: with ``>= min_updates``
   fresh updates (an update trained on a head at most ``max_staleness`` aggregations old; a late update from an
   earlier round counts in the round it arrives in, once) the head moves by the clipped, aggregated delta
   (learn.aggregate: fedavg / median / trimmed_mean; DP-FedAvg with noise when a budget is set) and is evaluated
   on the evaluation set; with fewer the round is recorded as ``skipped``.

When the rounds are done (or the target accuracy is reached, or the budget is spent) the job's head is written
into the base bundle's model, signed with ``fl_signing_key`` and registered as a new version whose manifest
carries the lineage (job, rounds, devices, metrics): it goes to devices through the usual rollout path.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import secrets
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ..protocol.messages import FLRecipe, FLTask, FLUpdate, SampleArray
from .errors import InvalidRequestError, NotFoundError
from .models import Device, DeviceCertificate, FLDeviceKey, FLJob, FLRound, FLUpdateRow
from .timeutil import utcnow

log = logging.getLogger(__name__)

FINAL_STATES = ("completed", "stopped", "failed")


# -- the job file ----------------------------------------------------------------------------------


class DPSpec(BaseModel):
    """Differential privacy (DP-FedAvg): the budget, and optionally the noise (else calibrated to spend ``epsilon``
    over ``rounds`` rounds)."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(default=None, gt=0)


class FLJobSpec(BaseModel):
    """A federated job (the JOB.toml; docs/learn.md has the reference)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=128)
    model: str
    base_version: str
    group: str | None = None
    tag: str | None = None
    devices: list[str] | None = None
    cohort_size: int = Field(default=10, ge=1, le=10_000)
    min_updates: int = Field(default=1, ge=1)
    max_updates: int | None = Field(default=None, ge=1)
    round_deadline_s: float = Field(default=300.0, gt=0)
    rounds: int = Field(default=3, ge=1, le=10_000)
    target_accuracy: float | None = Field(default=None, gt=0, le=1)
    recipe: FLRecipe = Field(default_factory=FLRecipe)
    min_confidence: float = Field(default=0.9, ge=0, le=1)
    min_samples: int = Field(default=8, ge=1)
    eval_set: str = Field(default="digits", description='"digits" (the demo data set) or an .npz path on the control plane with arrays x, y.')
    aggregator: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    clip_norm: float | None = Field(default=None, gt=0)
    server_lr: float = Field(default=1.0, gt=0)
    max_staleness: int = Field(default=1, ge=0, description="A late update counts if trained on a head at most this many aggregations old.")
    dp: DPSpec | None = None
    output_version: str | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "FLJobSpec":
        targets = [x for x in (self.group, self.tag, self.devices) if x]
        if len(targets) != 1:
            raise ValueError("name exactly one of group, tag or devices to draw the cohort from")
        if self.max_updates is not None and self.max_updates < self.min_updates:
            raise ValueError(f"max_updates ({self.max_updates}) is below min_updates ({self.min_updates})")
        if self.dp is not None and (self.clip_norm is None or self.aggregator != "fedavg"):
            raise ValueError("dp needs clip_norm (the sensitivity) and aggregator = \"fedavg\" (DP-FedAvg)")
        if self.output_version is not None:
            from ..bundle import check_semver

            check_semver(self.output_version)
        return self

    @property
    def effective_max_updates(self) -> int:
        return self.max_updates or self.cohort_size

    @property
    def effective_max_staleness(self) -> int:
        """DP rounds count no late update: each round's sensitivity is one clipped update per device."""
        return 0 if self.dp is not None else self.max_staleness


# -- weights and the model's head --------------------------------------------------------------------


def pack(weights: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **weights)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class _Base:
    """What the control plane needs of a base model: its verified bundle, the head, and features of the eval set."""

    def __init__(self, bundle: Any, layer: Any, proto: Any) -> None:
        self.bundle, self.layer, self.proto = bundle, layer, proto
        self.features: dict[str, np.ndarray] = {}  # evaluation-set tensors by name: the head's input, the chain's input
        self.labels: np.ndarray | None = None


def _load_base(session: Session, registry: Any, model: str, version: str) -> _Base:
    from ..bundle import BundleError, verify_bundle
    from ..data.adapt import AdaptationError
    from ..data.adapt._graph import load_model
    from ..data.adapt.coral import linear_layer

    row = registry.get(session, model, version)
    try:
        vb = verify_bundle(registry.bundles_dir / row.path, registry.trusted)
        proto = load_model(vb.read_model())
        layer = linear_layer(proto, "features")
    except (BundleError, AdaptationError) as exc:
        raise InvalidRequestError(f"{model} {version} cannot be trained federatedly: {exc}") from None
    if abs(layer.scale - 1.0) > 1e-9:
        raise InvalidRequestError(f"{model} {version}: head {layer.node!r} is a Gemm with alpha/beta != 1; not supported")
    return _Base(vb, layer, proto)


def head_weights(base: _Base, layers: str = "head") -> dict[str, np.ndarray]:
    from ..data.adapt._graph import initializer_array

    if layers == "all":  # every layer of the dense/ReLU chain that ends in the head (learn.mlp; devices train them all)
        from ..learn.mlp import ChainError, chain_weights, mlp_chain

        try:
            return chain_weights(base.proto, mlp_chain(base.proto))
        except ChainError as exc:
            raise InvalidRequestError(f'recipe layers = "all": {exc}') from None
    return {base.layer.weight: initializer_array(base.proto, base.layer.weight), base.layer.bias: initializer_array(base.proto, base.layer.bias)}


def load_eval_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs and labels of the evaluation set: ``digits`` (the demo split's test part) or an ``.npz`` (x, y)."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)  # the same split as edgewise.lab.demo_model.load_digits_split
        _, x_te, _, y_te = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.3, random_state=0, stratify=y)
        return x_te, y_te
    path = Path(name)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz["x"]), np.asarray(npz["y"]).astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidRequestError(f"eval_set {name!r}: use \"digits\" or an .npz on the control plane with arrays x and y ({exc})") from None


def _eval_features(base: _Base, eval_set: str, at: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The head's input (or tensor ``at``: the chain's input with layers = "all") on the evaluation set (preprocessed as
    on the device), computed once per base model and tensor."""
    at = at or base.layer.input
    if at not in base.features:
        from ..data.adapt._graph import batches, expose, graph_inputs, session

        x, y = load_eval_set(eval_set)
        m = base.bundle.manifest
        if m.preprocessing:
            x = m.preprocessing.apply(x)
        first = graph_inputs(base.proto)[0]
        dtype = next((i.dtype for i in m.model.inputs if i.name == first), "float32")
        if at == first:  # the chain starts at the graph's input
            base.features[at] = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        else:
            sess = session(expose(base.proto, [at]))
            base.features[at] = np.concatenate([np.asarray(sess.run([at], p)[0], dtype=np.float64).reshape(len(p[first]), -1)
                                                for p in batches({first: np.asarray(x).astype(dtype)}, 512)])
        base.labels = y
    assert base.labels is not None
    return base.features[at], base.labels


def accuracy(base: _Base, weights: dict[str, np.ndarray], eval_set: str) -> float:
    """Top-1 accuracy of the base model with head ``weights`` (argmax of the head's logits: the head feeds a softmax)."""
    if set(weights) != {base.layer.weight, base.layer.bias}:  # layers = "all": forward through the whole chain
        from ..learn.mlp import forward, mlp_chain

        chain = mlp_chain(base.proto)
        x, y = _eval_features(base, eval_set, chain[0].input)
        return float((forward(chain, weights, x).argmax(axis=1) == y).mean()) if len(y) else 0.0
    x, y = _eval_features(base, eval_set)
    w = weights[base.layer.weight].astype(np.float64)
    logits = x @ (w.T if base.layer.trans_b else w) + weights[base.layer.bias].astype(np.float64).reshape(-1)
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0


# -- jobs --------------------------------------------------------------------------------------------


def population(session: Session, spec: FLJobSpec) -> list[Device]:
    """Devices the job may draw from now: in its group / tag / list, running the base version, not offline."""
    if spec.group:
        from .groups import resolve

        devices = resolve(session, spec.group)
    elif spec.tag:
        devices = [d for d in session.scalars(select(Device).order_by(Device.id)) if spec.tag in (d.tags or [])]
    else:
        devices = [d for d in (session.get(Device, i) for i in spec.devices or []) if d is not None]
    return [d for d in devices if d.model == spec.model and d.version == spec.base_version and d.status != "offline"]


def create_job(session: Session, registry: Any, spec: FLJobSpec, *, created_by: str | None = None, engine: "FLEngine | None" = None) -> FLJob:
    """Check the spec against the registry (the base version exists and has a trainable head; the eval set loads)
    and record the job; the engine opens its first round at its next tick."""
    base = _load_base(session, registry, spec.model, spec.base_version)
    weights = head_weights(base, spec.recipe.layers)
    base_acc = accuracy(base, weights, spec.eval_set)
    eligible = population(session, spec)  # an unknown group is a 404 now, not a failed job later
    z = None
    if spec.dp is not None:
        from ..learn.dp import calibrate_noise

        pop = max(len(eligible), spec.cohort_size)
        q = min(1.0, spec.cohort_size / pop)
        z = spec.dp.noise_multiplier or calibrate_noise(spec.dp.epsilon, spec.dp.delta, q, spec.rounds)
    job = FLJob(id=f"fl-{secrets.token_hex(6)}", name=spec.name, spec=spec.model_dump(mode="json"), state="running",
                model=spec.model, base_version=spec.base_version, weights=pack(weights), weights_version=0,
                noise_multiplier=z, privacy=[], epsilon=0.0 if spec.dp else None, base_accuracy=base_acc,
                accuracy=base_acc, created_by=created_by)
    session.add(job)
    session.commit()
    if engine is not None:
        engine.bases[(spec.model, spec.base_version)] = base
    log.info("federated job %s on %s %s created (base accuracy %.3f%s)", job.id, spec.model, spec.base_version, base_acc,
             f", noise multiplier {z:.3f}" if z else "")
    return job


def get_job(session: Session, job_id: str) -> FLJob:
    job = session.get(FLJob, job_id)
    if job is None:
        raise NotFoundError(f"no federated job {job_id!r} (list them with GET /api/v1/fl/jobs)")
    return job


def stop_job(session: Session, job_id: str, reason: str = "stopped by an operator") -> FLJob:
    job = get_job(session, job_id)
    if job.state not in FINAL_STATES:
        _finish(session, job, "stopped", reason)
        session.commit()
    return job


def job_status(session: Session, job: FLJob) -> dict[str, Any]:
    """The job as the API shows it: state, ε so far, and per round the cohort, participants, rejections, accuracy, ε."""
    rounds = session.scalars(select(FLRound).where(FLRound.job_id == job.id).order_by(FLRound.number)).all()
    ups = session.scalars(select(FLUpdateRow).where(FLUpdateRow.job_id == job.id).order_by(FLUpdateRow.id)).all()
    rejected = [{"device_id": u.device_id, "round": u.round, "status": u.status, "reason": u.reason} for u in ups
                if u.status in ("rejected", "stale")]
    spec = job.spec
    return {
        "id": job.id, "name": job.name, "state": job.state, "reason": job.reason, "model": job.model,
        "base_version": job.base_version, "result_version": job.result_version, "weights_version": job.weights_version,
        "base_accuracy": job.base_accuracy, "accuracy": job.accuracy, "epsilon": job.epsilon,
        "delta": (spec.get("dp") or {}).get("delta"), "epsilon_budget": (spec.get("dp") or {}).get("epsilon"),
        "noise_multiplier": job.noise_multiplier, "spec": spec,
        "created_at": job.created_at.isoformat(), "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "updates": {s: sum(1 for u in ups if u.status == s) for s in ("accepted", "used", "rejected", "stale")},
        "rejected_updates": rejected,
        "rounds": [{
            "number": r.number, "state": r.state, "cohort": r.cohort, "population": r.population,
            "participants": r.detail.get("participants", []), "used": r.used, "late": r.late, "rejected": r.rejected,
            "clipped": r.clipped, "accuracy": r.accuracy, "epsilon": r.epsilon,
            "opened_at": r.opened_at.isoformat(), "deadline_at": r.deadline_at.isoformat(),
            "closed_at": r.closed_at.isoformat() if r.closed_at else None, "detail": r.detail,
        } for r in rounds],
    }


# -- updates as they arrive (called by ingest, on the MQTT thread) -----------------------------------


def receive_update(session: Session, rec: FLUpdate, now: Any) -> int:
    """Check and store one update; return 1 if it was new (accepted or rejected), 0 for a replay or no such job.

    Order of checks: job, invited device (it was in the cohort of the round it names), signature (certificate or
    pinned key), model version, then tensor names, shapes and finiteness against the job's head. A rejection is
    logged and stored with its reason (``GET /api/v1/fl/jobs/{id}`` lists them)."""
    job = session.get(FLJob, rec.job_id)
    if job is None:
        log.warning("federated update from %s for unknown job %r dropped", rec.device_id, rec.job_id)
        return 0
    dup = session.scalars(select(FLUpdateRow.id).where(FLUpdateRow.job_id == job.id, FLUpdateRow.device_id == rec.device_id,
                                                       FLUpdateRow.round == rec.round)).first()
    if dup is not None:
        return 0  # the outbox delivers at least once: the first copy is the one that counts
    row = FLUpdateRow(job_id=job.id, device_id=rec.device_id, round=rec.round, seq=rec.seq, base_version=rec.base_version,
                      num_samples=rec.num_samples, loss=rec.loss, status="accepted", received_at=now)
    try:
        try:
            delta = _check(session, job, rec)
        except _Rejected:
            raise
        except Exception as exc:  # whatever a hostile payload trips over costs that update, never the batch
            raise _Rejected(f"{type(exc).__name__}: {exc}", "malformed") from None
        row.delta = pack(delta)
    except _Rejected as exc:
        row.status, row.reason = "rejected", f"{exc.reason}: {exc}"
        log.warning("federated job %s: rejected the update of %s for round %d (%s): %s", job.id, rec.device_id, rec.round, exc.reason, exc)
    session.add(row)
    session.flush()
    return 1


class _Rejected(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check(session: Session, job: FLJob, rec: FLUpdate) -> dict[str, np.ndarray]:
    from ..learn.aggregate import ClientUpdate, UpdateRejected, check_update

    if job.state in FINAL_STATES:
        raise _Rejected(f"the job is {job.state}", "job_over")
    rnd = session.scalars(select(FLRound).where(FLRound.job_id == job.id, FLRound.number == rec.round)).first()
    if rnd is None or rec.device_id not in (rnd.cohort or []) or session.get(Device, rec.device_id) is None:
        raise _Rejected(f"device {rec.device_id} was not asked to train in round {rec.round}", "unknown_device")
    verify_signature(session, rec)
    if (rec.model, rec.version) != (job.model, job.base_version):
        raise _Rejected(f"trained {rec.model} {rec.version}, the job trains {job.model} {job.base_version}", "wrong_model")
    try:
        delta = {t.name: t.array() for t in rec.tensors}
    except ValueError as exc:
        raise _Rejected(str(exc), "malformed") from None
    try:
        check_update(ClientUpdate(rec.device_id, delta, rec.num_samples, rec.base_version, rec.loss), unpack(job.weights))
    except UpdateRejected as exc:
        raise _Rejected(str(exc), exc.reason) from None
    return delta


def verify_signature(session: Session, rec: FLUpdate) -> None:
    """Raise _Rejected unless ``rec`` is signed by its device's key.

    The key is the enrollment certificate's when the update carries a certificate (it must be one this fleet CA
    issued to that device, not revoked, not expired: matched by fingerprint). Otherwise the device's own FL key,
    pinned at the first signed update it sends (trust on first use over its authenticated MQTT session: a later
    update under another key is refused). An enrolled device must sign with its certificate's key."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ..security.ca import certificate_fingerprint

    now = utcnow()
    live = [c for c in session.scalars(select(DeviceCertificate).where(DeviceCertificate.device_id == rec.device_id))
            if c.revoked_at is None and c.not_after > now]
    pin: FLDeviceKey | None = None
    if rec.certificate:
        try:
            cert = x509.load_pem_x509_certificate(rec.certificate.encode())
        except ValueError as exc:
            raise _Rejected(f"certificate does not parse: {exc}", "bad_signature") from None
        if certificate_fingerprint(cert) not in {c.fingerprint for c in live}:
            raise _Rejected("the certificate is not a live certificate this fleet CA issued to the device", "bad_signature")
        key = cert.public_key()
    elif rec.public_key:
        if live:
            raise _Rejected("the device is enrolled: it must sign with its certificate's key", "bad_signature")
        try:
            key = serialization.load_pem_public_key(rec.public_key.encode())
        except ValueError as exc:
            raise _Rejected(f"public key does not parse: {exc}", "bad_signature") from None
        pinned = session.get(FLDeviceKey, rec.device_id)
        if pinned is not None and pinned.public_key.strip() != rec.public_key.strip():
            raise _Rejected(f"signed with another key than the one pinned for {rec.device_id} on {pinned.pinned_at:%Y-%m-%d}", "bad_signature")
        if pinned is None:
            pin = FLDeviceKey(device_id=rec.device_id, public_key=rec.public_key.strip(), source="first-use", pinned_at=now)
    else:
        raise _Rejected("the update carries no certificate and no public key", "bad_signature")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _Rejected("only ECDSA P-256 keys sign updates", "bad_signature")
    try:
        key.verify(base64.b64decode(rec.signature, validate=True), rec.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise _Rejected("the signature does not verify", "bad_signature") from None
    if pin is not None:
        session.add(pin)
        log.info("pinned the federated-learning key of %s (first signed update)", rec.device_id)


# -- the engine ----------------------------------------------------------------------------------------


class FLEngine:
    """Opens and closes rounds for every running job, every ``tick_s``; state in the database (survives restarts)."""

    def __init__(self, db: Any, publisher: Any, registry: Any, *, signing_key: Path | None = None, tick_s: float = 1.0) -> None:
        self.db, self.publisher, self.registry = db, publisher, registry
        self.signing_key, self.tick_s = signing_key, tick_s
        self.bases: dict[tuple[str, str], _Base] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.lease: Any = None  # issue 9 SCALE: a control.lease.Lease; the loop ticks only while it is held

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgewise-fl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            if self.lease is not None and not self.lease.held():
                continue  # another process runs the federated rounds (docs/scale-out.md)
            try:
                self.tick()
            except Exception:
                log.exception("federated-learning engine tick failed; retrying at the next tick")

    def tick(self) -> None:
        with self._lock, self.db.session() as session:
            for job in session.scalars(select(FLJob).where(FLJob.state == "running").order_by(FLJob.created_at)).all():
                try:
                    self._advance(session, job)
                    session.commit()
                except SQLAlchemyError:  # the database (locked, gone): try again at the next tick
                    session.rollback()
                    log.warning("federated job %s: database trouble; retrying at the next tick", job.id, exc_info=True)
                except Exception as exc:
                    session.rollback()
                    log.exception("federated job %s failed", job.id)
                    job = session.get(FLJob, job.id)
                    if job is not None:
                        _finish(session, job, "failed", f"{type(exc).__name__}: {exc}")
                        session.commit()

    def _base(self, session: Session, job: FLJob) -> _Base:
        key = (job.model, job.base_version)
        if key not in self.bases:
            self.bases[key] = _load_base(session, self.registry, job.model, job.base_version)
        return self.bases[key]

    def _advance(self, session: Session, job: FLJob) -> None:
        spec = FLJobSpec.model_validate(job.spec)
        now = utcnow()
        rnd = session.scalars(select(FLRound).where(FLRound.job_id == job.id).order_by(FLRound.number.desc())).first()
        if rnd is not None and rnd.state == "open":
            waiting = session.scalars(select(FLUpdateRow).where(FLUpdateRow.job_id == job.id, FLUpdateRow.status == "accepted")).all()
            if len(waiting) >= spec.effective_max_updates or now >= rnd.deadline_at:
                self._close(session, job, spec, rnd, waiting)
                rnd = None if job.state != "running" else rnd
            else:
                return
        if job.state != "running":
            return
        done = session.query(FLRound).filter(FLRound.job_id == job.id, FLRound.state.in_(("closed", "skipped"))).count()
        if done >= spec.rounds:
            self._complete(session, job, f"{done} rounds done")
        elif spec.target_accuracy is not None and (job.accuracy or 0) >= spec.target_accuracy:
            self._complete(session, job, f"target accuracy {spec.target_accuracy} reached ({job.accuracy:.3f})")
        else:
            self._open(session, job, spec, (rnd.number if rnd else 0) + 1)

    def _open(self, session: Session, job: FLJob, spec: FLJobSpec, number: int) -> None:
        from .commands import send_command
        from .errors import ControlError

        pop = population(session, spec)
        busy = _busy(session, job.id, number, spec.effective_max_staleness)
        free = [d for d in pop if d.id not in busy]  # still training for a round whose update would count: not asked again
        rng = np.random.default_rng(None if spec.seed is None else spec.seed + number)
        cohort = sorted(d.id for d in (rng.choice(np.array(free, dtype=object), size=min(spec.cohort_size, len(free)), replace=False) if free else []))
        if spec.dp is not None and job.noise_multiplier:
            from ..learn.dp import BudgetExceeded, PrivacyBudget

            budget = PrivacyBudget(spec.dp.epsilon, spec.dp.delta, [tuple(x) for x in job.privacy])  # type: ignore[misc]
            try:
                budget.check_round(min(1.0, spec.cohort_size / max(len(pop), spec.cohort_size)), job.noise_multiplier)
            except BudgetExceeded as exc:
                self._complete(session, job, f"privacy budget spent: {exc}")
                return
        deadline = utcnow() + timedelta(seconds=spec.round_deadline_s)
        rnd = FLRound(job_id=job.id, number=number, state="open", cohort=cohort, population=len(pop), base_version=job.weights_version,
                      opened_at=utcnow(), deadline_at=deadline, detail={})
        session.add(rnd)
        session.commit()  # the round exists before any device hears of it: its updates always find it
        weights = unpack(job.weights)
        task = FLTask(job_id=job.id, round=number, model=job.model, version=job.base_version, base_version=job.weights_version,
                      tensors=[SampleArray.of(k, v) for k, v in weights.items()], recipe=spec.recipe, deadline=deadline.timestamp(),
                      min_confidence=spec.min_confidence, min_samples=spec.min_samples,
                      seed=None if spec.seed is None else spec.seed + number)
        unreached = []
        for device_id in cohort:
            try:
                send_command(session, self.publisher, device_id, "fl.train", task.model_dump(mode="json"), ttl_s=spec.round_deadline_s)
            except ControlError as exc:
                unreached.append(device_id)
                log.warning("federated job %s round %d: could not send the task to %s: %s", job.id, number, device_id, exc)
        rnd.detail = {"unreached": unreached}
        job.updated_at = utcnow()
        log.info("federated job %s: round %d open with %d of %d devices until %s", job.id, number, len(cohort), len(pop), deadline)

    def _close(self, session: Session, job: FLJob, spec: FLJobSpec, rnd: FLRound, waiting: list[FLUpdateRow]) -> None:
        from ..learn.aggregate import ClientUpdate, aggregate, apply

        now = utcnow()
        fresh: list[FLUpdateRow] = []
        for u in sorted(waiting, key=lambda u: u.id):
            staleness = job.weights_version - u.base_version
            if staleness > spec.effective_max_staleness or staleness < 0:
                u.status, u.reason = "stale", f"stale: trained on head version {u.base_version}, the job is at {job.weights_version}"
            else:
                fresh.append(u)
        fresh = fresh[: spec.effective_max_updates]  # the rest wait for the next round (still fresh then or not)
        rnd.closed_at = now
        rejected_here = session.query(FLUpdateRow).filter(FLUpdateRow.job_id == job.id, FLUpdateRow.round == rnd.number,
                                                          FLUpdateRow.status == "rejected").count()
        rnd.rejected = rejected_here
        if len(fresh) < spec.min_updates:
            rnd.state = "skipped"
            rnd.detail = {**rnd.detail, "reason": f"{len(fresh)} fresh update(s), the job needs {spec.min_updates}"}
            log.info("federated job %s: round %d skipped (%s)", job.id, rnd.number, rnd.detail["reason"])
            return
        base = unpack(job.weights)
        updates = [ClientUpdate(u.device_id, unpack(u.delta or b""), u.num_samples, u.base_version, u.loss) for u in fresh]
        sw = [1.0 / math.sqrt(1.0 + job.weights_version - u.base_version) for u in fresh]
        dp = spec.dp is not None and job.noise_multiplier
        q = min(1.0, spec.cohort_size / max(rnd.population, spec.cohort_size))
        result = aggregate(base, updates, method=spec.aggregator, clip_norm=spec.clip_norm, trim_fraction=spec.trim_fraction,
                           noise_multiplier=job.noise_multiplier if dp else 0.0, expected_count=max(len(rnd.cohort), 1) if dp else None,
                           staleness_weights=sw)
        for u in fresh:
            if u.device_id in result.rejected:
                u.status, u.reason = "rejected", result.rejected[u.device_id]
            else:
                u.status, u.counted_in, u.delta = "used", rnd.number, None
        new = apply(base, result.delta, spec.server_lr)
        job.weights, job.weights_version = pack(new), job.weights_version + 1
        job.accuracy = accuracy(self._base(session, job), new, spec.eval_set)
        if dp:
            from ..learn.dp import PrivacyBudget

            budget = PrivacyBudget(spec.dp.epsilon, spec.dp.delta, [tuple(x) for x in job.privacy])  # type: ignore[union-attr,misc]
            job.epsilon = budget.charge_round(q, float(job.noise_multiplier))  # type: ignore[arg-type]
            job.privacy = [list(x) for x in budget.rounds]
            rnd.epsilon = job.epsilon
        used = [u for u in fresh if u.status == "used"]
        rnd.state, rnd.used, rnd.clipped, rnd.accuracy = "closed", len(used), int(result.clipped), job.accuracy
        rnd.late = sum(1 for u in used if u.round != rnd.number)
        rnd.detail = {**rnd.detail, "participants": sorted(u.device_id for u in used), "samples": sum(u.num_samples for u in used),
                      "late_from": sorted({u.round for u in used if u.round != rnd.number}), "noise_std": result.noise_std,
                      "norms": [round(float(n), 6) for n in result.norms], "sampling_rate": q}
        job.updated_at = now
        log.info("federated job %s: round %d closed with %d update(s), accuracy %.3f%s", job.id, rnd.number, len(used),
                 job.accuracy, f", ε={job.epsilon:.3f}" if dp else "")

    def _complete(self, session: Session, job: FLJob, reason: str) -> None:
        rounds = session.scalars(select(FLRound).where(FLRound.job_id == job.id, FLRound.state == "closed")).all()
        if rounds and self.signing_key is not None:
            try:
                job.result_version = register_result(session, self.registry, job, rounds, self._base(session, job), self.signing_key)
                reason += f"; registered {job.model} {job.result_version}"
            except Exception as exc:
                log.exception("federated job %s: cannot register the result", job.id)
                reason += f"; the result was not registered: {exc}"
        elif rounds:
            reason += "; no fl_signing_key configured: the result was not registered"
        _finish(session, job, "completed" if "budget" not in reason else "stopped", reason)


def _busy(session: Session, job_id: str, number: int, max_staleness: int) -> set[str]:
    """Devices asked in one of the last ``max_staleness`` rounds that have not answered it: their update may still
    arrive and count, so they are not given a second task meanwhile (FedBuff: one task per device at a time)."""
    if max_staleness <= 0:
        return set()
    recent = session.scalars(select(FLRound).where(FLRound.job_id == job_id, FLRound.number >= number - max_staleness)).all()
    answered = {(u.device_id, u.round) for u in session.scalars(select(FLUpdateRow).where(FLUpdateRow.job_id == job_id,
                                                                                             FLUpdateRow.round >= number - max_staleness))}
    return {d for r in recent for d in r.cohort if (d, r.number) not in answered}


def _finish(session: Session, job: FLJob, state: str, reason: str) -> None:
    job.state, job.reason = state, reason
    job.finished_at = job.updated_at = utcnow()
    for rnd in session.scalars(select(FLRound).where(FLRound.job_id == job.id, FLRound.state == "open")):
        rnd.state, rnd.closed_at = "skipped", utcnow()
        rnd.detail = {**rnd.detail, "reason": f"job {state}"}
    log.info("federated job %s %s: %s", job.id, state, reason)


def _next_version(session: Session, name: str, base: str) -> str:
    from ..bundle import semver_key
    from .registry import Registry

    taken = {r.version for r in Registry.versions(session, name)}
    major, minor, patch = (int(p) for p in base.split("+")[0].split("-")[0].split(".")[:3])
    top = max((semver_key(v) for v in taken), default=semver_key(base))
    while True:
        patch += 1
        v = f"{major}.{minor}.{patch}"
        if v not in taken and semver_key(v) > top:
            return v
        if patch > 100_000:
            raise RuntimeError("no free version")


def register_result(session: Session, registry: Any, job: FLJob, rounds: list[FLRound], base: _Base, signing_key: Path) -> str:
    """Write the job's head into the base bundle's model, sign it, store it in the registry; return the version."""
    import tempfile

    from ..bundle import GOLDEN_MEMBER, build_bundle
    from ..data.adapt._graph import Adaptation, apply_adaptation
    from ..security import load_signer

    spec = FLJobSpec.model_validate(job.spec)
    vb, m = base.bundle, base.bundle.manifest
    model_bytes = apply_adaptation(vb.read_model(), Adaptation("federated", unpack(job.weights), 0))
    golden = None
    if m.golden is not None and GOLDEN_MEMBER in m.members:
        g = unpack(vb.read_member(GOLDEN_MEMBER))
        golden = ({k[len("inputs/"):]: v for k, v in g.items() if k.startswith("inputs/")}, m.golden.atol, m.golden.latency_budget_ms)
    extra = {n: vb.read_member(n) for n in m.members if n not in (m.model.path, GOLDEN_MEMBER)}
    version = spec.output_version or _next_version(session, job.model, job.base_version)
    devices = sorted({d for r in rounds for d in r.detail.get("participants", [])})
    lineage = {
        "kind": "federated", "job": job.id, "job_name": job.name, "base": {"model": job.model, "version": job.base_version},
        "rounds": len(rounds), "devices": len(devices), "updates": sum(r.used for r in rounds),
        "aggregator": spec.aggregator, "clip_norm": spec.clip_norm, "recipe": spec.recipe.model_dump(),
        "metrics": {"eval_set": spec.eval_set, "accuracy": job.accuracy, "base_accuracy": job.base_accuracy},
        "privacy": {"epsilon": job.epsilon, "delta": spec.dp.delta, "noise_multiplier": job.noise_multiplier} if spec.dp else None,
    }
    out = Path(tempfile.mkdtemp(prefix="fl-", dir=registry.incoming_dir)) / f"{job.model}-{version}.ewb"
    try:
        build_bundle(model_bytes, name=m.name, version=version, signer=load_signer(signing_key), out=out, labels=m.labels,
                     preprocessing=m.preprocessing, description=f"{m.description} (federated job {job.id} on {job.base_version})".strip(),
                     min_ram_mb=m.requirements.min_ram_mb, extra_members=extra, metadata={**m.metadata, "lineage": lineage},
                     runtime=m.runtime, variant=m.variant, golden=golden, reference=m.reference)
        result = registry.store(session, out)
    finally:
        out.unlink(missing_ok=True)
        try:
            out.parent.rmdir()
        except OSError:
            pass
    log.info("federated job %s: registered %s %s", job.id, job.model, result.version.version)
    return str(result.version.version)
