"""The release pipeline: a trained model to the fleet, unattended (``edgewise release PIPELINE.yaml``).

Stages, each a plain function so a CI script (or a test) can run any of them alone::

    spec = load_spec("PIPELINE.yaml")                      # pydantic: an error names the field
    model = prepare_model(spec, work_dir)                  # ONNX file, or train one of the lab's demo models
    data = load_dataset(spec, model)                       # calibration + held-out split
    targets = resolve_targets(spec, client)                # hardware classes (listed, or those in a group)
    opt = optimize_target(spec, model, data, target, dir)  # lab.optimize: the fastest variant within budget
    gates = evaluate_gates(spec, model, data, target, opt) # accuracy, latency, golden inputs
    bundle = bundle_variant(spec, model, data, target, opt, gates, out)   # signed .ewb, variant of the version
    publish(client, bundles)                               # POST /api/v1/models (API token)
    rollout = start_rollout(client, spec)                  # POST /api/v1/rollouts (staged, gated on model health)
    final = wait_rollout(client, rollout["id"], ...)       # poll GET /api/v1/rollouts/{id}

:func:`run_pipeline` runs them in order and raises one typed error per way a release can fail
(:class:`GateFailedError`, :class:`PublishError`, :class:`RolloutStartError`,
:class:`RolloutFailedError`, :class:`RolloutTimeoutError`), so the CLI maps each to its own
exit code. No gate failure ever publishes anything: every hardware class is optimized, gated and
bundled before the first upload.

The lab never imports the control plane: it talks to it over HTTP like any other client
(:class:`ControlClient`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Environment variables the pipeline reads (CI secrets).
TOKEN_ENVS = ("EDGEWISE_TOKEN", "EDGEWISE_API_TOKEN")
SERVER_ENV = "EDGEWISE_SERVER"

STAGES = ("optimize", "gates", "bundle", "publish", "rollout")
TERMINAL_OK = {"completed"}
TERMINAL_FAILED = {"halted", "aborted"}

#: Demo models the lab can build itself: name -> (kind, default dataset).
DEMO_MODELS: dict[str, tuple[str, str]] = {
    "digits-logreg": ("sklearn:logreg", "digits"),
    "digits-mlp": ("sklearn:mlp", "digits"),
    "digits-cnn": ("torch:digits-cnn", "digits-images"),
    "digits-mlp-torch": ("torch:digits-mlp", "digits-features"),
    "basicmotions-cnn": ("torch:basicmotions-cnn", "basicmotions"),
}
DATASETS = ("digits", "digits-features", "digits-images", "basicmotions")

Progress = Callable[[str, str], None]  # (stage, message)


# ----------------------------------------------------------------------------------------- errors


class PipelineError(Exception):
    """Base of every release-pipeline failure; the message says what to do next."""


class PipelineSpecError(PipelineError):
    """PIPELINE.yaml (or a file it names) is invalid."""


class GateFailedError(PipelineError):
    """A release gate failed for at least one hardware class; nothing was published."""

    def __init__(self, message: str, result: "PipelineResult") -> None:
        super().__init__(message)
        self.result = result


class PublishError(PipelineError):
    """The registry refused an upload, or could not be reached."""


class RolloutStartError(PipelineError):
    """The control plane refused to start the rollout (or has no rollout API)."""


class RolloutFailedError(PipelineError):
    """The rollout halted (a wave's error condition held) or was aborted."""


class RolloutTimeoutError(PipelineError):
    """The rollout did not reach a final state within ``timeouts.rollout_s``."""


# ----------------------------------------------------------------------------------------- spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """Where the FP32 model comes from: an ONNX file, or one of the lab's demo models (trained now)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Model name in the registry.")
    onnx: Path | None = None
    demo: str | None = None
    preprocessing: Path | dict[str, Any] | None = Field(
        default=None, description="Preprocessing spec (JSON file or inline): the data is raw, the bundle carries it.",
    )
    labels: Path | list[str] | None = Field(default=None, description="Class labels (text file, one a line, or a list).")
    description: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.onnx is None) == (self.demo is None):
            raise ValueError("give exactly one of model.onnx (an ONNX file) or model.demo (" + ", ".join(DEMO_MODELS) + ")")
        if self.demo is not None and self.demo not in DEMO_MODELS:
            raise ValueError(f"model.demo {self.demo!r} is not a demo model; choose one of {', '.join(DEMO_MODELS)}")
        return self


class DatasetSpec(_Strict):
    """Calibration and held-out data: a named data set that ships with a package, or an ``.npz``."""

    name: str | None = Field(default=None, description="digits | digits-features | digits-images | basicmotions")
    npz: Path | None = Field(default=None, description=".npz with x_train, y_train, x_test, y_test (held-out = test).")
    calibration_samples: int = Field(default=128, ge=1)
    eval_samples: int | None = Field(default=None, ge=1, description="Use at most this many held-out samples.")
    seed: int = 0

    @model_validator(mode="after")
    def _one(self) -> "DatasetSpec":
        if self.name is not None and self.npz is not None:
            raise ValueError("give one of dataset.name or dataset.npz, not both")
        if self.name is not None and self.name not in DATASETS:
            raise ValueError(f"dataset.name {self.name!r} is not known; choose one of {', '.join(DATASETS)} or give dataset.npz")
        return self


class HardwareSpec(_Strict):
    """Which hardware classes to build a variant for: listed, or every class present in a group."""

    classes: list[str] = Field(default_factory=list)
    from_group: str | None = Field(default=None, description="Build for every hardware class among this group's devices.")
    profiles: dict[str, str] = Field(
        default_factory=dict, description="hardware class -> lab profile (built-in name or YAML path); default: same name.",
    )

    @model_validator(mode="after")
    def _one(self) -> "HardwareSpec":
        if bool(self.classes) == (self.from_group is not None):
            raise ValueError("give exactly one of hardware.classes (a list) or hardware.from_group (a group name)")
        return self


class OptimizeSpec(_Strict):
    recipes: list[str] | None = Field(default=None, description="Only these optimize recipes (FP32 is always built).")
    max_accuracy_drop: float = Field(default=0.01, ge=0, description="Budget vs FP32 in the metric's units.")
    measure_here: bool | None = None


class GoldenGate(_Strict):
    """Known inputs the variant must get right; they also go into the bundle, so each device re-checks them."""

    npz: Path | None = Field(default=None, description="Raw inputs keyed by input name (or x), optional labels y.")
    from_holdout: int | None = Field(default=8, ge=1, description="Else: this many held-out samples FP32 classifies right.")
    max_mismatches: int = Field(default=0, ge=0, description="Classifiers: golden inputs allowed to get another class.")
    max_abs_diff: float = Field(default=0.01, ge=0, description="Other models: largest output difference from FP32.")
    atol: float | None = Field(default=None, ge=0, description="Device-side golden tolerance (bundle; default 1e-4).")
    latency_budget_ms: float | None = Field(default=None, gt=0, description="Device-side median latency budget per golden sample.")


class Gates(_Strict):
    min_accuracy: float | None = Field(default=None, ge=0, le=1, description="Accuracy on the held-out set, absolute.")
    max_accuracy_drop: float | None = Field(default=None, ge=0, description="Drop vs FP32 (default: optimize.max_accuracy_drop).")
    max_latency_ms: float | Literal["profile"] | None = Field(
        default=None, description="Batch-1 latency limit in ms, or 'profile' for the profile's latency_budget_ms.",
    )
    latency_stat: Literal["median", "p95"] = "p95"
    latency_on_proxy: Literal["enforce", "warn"] = Field(
        default="enforce", description="Figures measured on a machine that is not the target: still enforce, or only warn.",
    )
    max_size_mb: float | None = Field(default=None, gt=0)
    golden: GoldenGate | None = Field(default_factory=GoldenGate)


class BundleSpec(_Strict):
    version: str = Field(pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$", description="Semantic version of this release.")
    key: Path = Field(description="Ed25519 signing key (edgewise keys generate).")
    variant_name: str = Field(default="{hardware_class}", description="Template: {hardware_class}, {recipe}.")
    reference_samples: int | None = Field(default=256, ge=1, description="Held-out samples for drift reference statistics (null: none).")


class Wave(_Strict):
    """One wave of the staged rollout (control plane's POST /api/v1/rollouts)."""

    name: str | None = None
    percent: float | None = Field(default=None, gt=0, le=100, description="Cumulative share of each hardware class.")
    devices: list[str] | None = None
    min_reporting: int | None = Field(default=None, ge=0)
    soak_s: float | None = Field(default=None, ge=0)
    success: str | None = None
    error: str | None = None
    approval: bool | None = None
    shadow_s: float | None = Field(default=None, ge=0)
    shadow_sample_every: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _size(self) -> "Wave":
        if (self.percent is None) == (self.devices is None):
            raise ValueError(f"wave {self.name or ''!r}: give exactly one of percent or devices")
        return self


class RolloutSpec(_Strict):
    group: str | None = None
    tag: str | None = None
    devices: list[str] | None = None
    waves: list[Wave] = Field(min_length=1)
    rate_limit_per_min: int | None = Field(default=None, ge=1)
    start_paused: bool = False


class ControlSpec(_Strict):
    server: str | None = Field(default=None, description="Control plane URL (overridden by --server / $EDGEWISE_SERVER).")
    verify_tls: bool | str = Field(default=True, description="false, or a CA bundle path for a private CA.")


class Timeouts(_Strict):
    http_s: float = Field(default=30.0, gt=0)
    upload_s: float = Field(default=300.0, gt=0)
    rollout_s: float = Field(default=3600.0, gt=0, description="Longest wait for the rollout to complete.")
    poll_s: float = Field(default=5.0, gt=0)


class PipelineSpec(_Strict):
    """PIPELINE.yaml. Unknown keys are errors (a typo must not silently mean a default)."""

    model: ModelSource
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    hardware: HardwareSpec
    optimize: OptimizeSpec = Field(default_factory=OptimizeSpec)
    gates: Gates = Field(default_factory=Gates)
    bundle: BundleSpec
    control: ControlSpec = Field(default_factory=ControlSpec)
    rollout: RolloutSpec | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder relative paths are read from (the YAML's).")

    @field_validator("base_dir")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        return v.resolve()

    def path(self, p: Path) -> Path:
        """``p`` relative to the pipeline file's folder."""
        p = Path(os.path.expandvars(str(p))).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def explain_validation(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc or 'pipeline'}: {msg}" if e.get("type") != "extra_forbidden" else f"{loc}: unknown field (check the spelling)")
    return "; ".join(parts)


def parse_spec(data: Any, base_dir: Path = Path(".")) -> PipelineSpec:
    """Validate an already-loaded pipeline mapping; raises PipelineSpecError naming each bad field."""
    if not isinstance(data, dict):
        raise PipelineSpecError(f"the pipeline must be a mapping of sections (model, hardware, bundle, ...), got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise PipelineSpecError(f"invalid pipeline: {explain_validation(exc)}") from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate PIPELINE.yaml; relative paths in it are relative to its folder."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineSpecError(f"cannot read pipeline {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineSpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    spec = parse_spec(data, path.parent)
    return spec


# ----------------------------------------------------------------------------------------- HTTP client


class ControlPlaneError(PipelineError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ControlClient:
    """The few control-plane calls the pipeline makes, over HTTP with an operator API token."""

    def __init__(self, server: str, token: str, *, timeout: float = 30.0, verify: bool | str = True) -> None:
        import httpx

        self.server = server.rstrip("/")
        if isinstance(verify, str):  # a CA bundle for a private CA
            import ssl

            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        import httpx

        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"cannot reach the control plane at {self.server} ({type(exc).__name__}: {exc}); check control.server / --server") from None
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            detail = body.get("detail", body) if isinstance(body, dict) else body
            if resp.status_code == 401:
                detail = f"{detail} (the API token was refused: set $EDGEWISE_TOKEN or --token to an operator's token)"
            raise ControlPlaneError(f"{method} {path} refused ({resp.status_code}): {detail}", resp.status_code)
        return resp.status_code, body


# ----------------------------------------------------------------------------------------- model + data


@dataclass
class PreparedModel:
    path: Path
    input_name: str
    preprocessing: Any  # PreprocessingSpec | None
    labels: list[str] | None
    default_dataset: str | None


def prepare_model(spec: PipelineSpec, work_dir: Path, progress: Progress | None = None) -> PreparedModel:
    """The FP32 ONNX model the pipeline starts from, its preprocessing and labels."""
    from ..data.preprocessing import PreprocessingSpec

    src = spec.model
    work_dir.mkdir(parents=True, exist_ok=True)
    preprocessing: Any = None
    labels: list[str] | None = None
    default_dataset = None
    if src.demo is not None:
        kind, default_dataset = DEMO_MODELS[src.demo]
        path = work_dir / f"{src.demo}.onnx"
        _say(progress, "model", f"training demo model {src.demo}")
        if kind.startswith("sklearn:"):
            from .demo_model import LABELS, PREPROCESSING, load_digits_split, train_digits_onnx

            path.write_bytes(train_digits_onnx(kind.split(":", 1)[1], load_digits_split(spec.dataset.seed)))
            preprocessing, labels = PREPROCESSING, list(LABELS)
        else:
            from .export import export_onnx
            from .torch_models import example_input, train_builtin

            model, data, _ = train_builtin(kind.split(":", 1)[1])
            export_onnx(model, example_input(data, 4), path)
            labels = list(data.classes)
    else:
        path = spec.path(src.onnx)  # type: ignore[arg-type]
        if not path.is_file():
            raise PipelineSpecError(f"model.onnx: {path} does not exist")
    if src.preprocessing is not None:
        raw = src.preprocessing
        try:
            if isinstance(raw, Path):
                raw = json.loads(spec.path(raw).read_text())
            preprocessing = PreprocessingSpec.model_validate(raw)
        except (OSError, ValueError) as exc:
            raise PipelineSpecError(f"model.preprocessing: {exc}") from None
    if src.labels is not None:
        if isinstance(src.labels, Path):
            try:
                labels = [ln.strip() for ln in spec.path(src.labels).read_text().splitlines() if ln.strip()]
            except OSError as exc:
                raise PipelineSpecError(f"model.labels: cannot read {src.labels}: {exc.strerror}") from None
        else:
            labels = list(src.labels)
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's own exception zoo
        raise PipelineSpecError(f"model: ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from None
    return PreparedModel(path, sess.get_inputs()[0].name, preprocessing, labels, default_dataset)


@dataclass
class Dataset:
    """Raw inputs (before the bundle's preprocessing) for calibration and the held-out evaluation."""

    name: str
    calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_dataset(spec: PipelineSpec, model: PreparedModel) -> Dataset:
    from . import datasets as ds

    d = spec.dataset
    name = d.name or (None if d.npz else model.default_dataset)
    try:
        if d.npz is not None:
            split = ds.load_npz(spec.path(d.npz))
        elif name == "digits":
            from .demo_model import load_digits_split

            raw = load_digits_split(d.seed)
            split = ds.DataSplit(raw.x_train, raw.y_train, raw.x_test, raw.y_test, name="digits")
        elif name == "digits-features":
            split = ds.load_digits_features(d.seed)
        elif name == "digits-images":
            split = ds.load_digits_images(d.seed)
        elif name == "basicmotions":
            split = ds.load_basic_motions()
        else:
            raise PipelineSpecError("dataset: give dataset.name (" + ", ".join(DATASETS) + ") or dataset.npz")
    except (ds.DataError, ds.DatasetNotAvailableError) as exc:
        raise PipelineSpecError(f"dataset: {exc}") from None
    rng = np.random.default_rng(d.seed)
    calib_idx = np.sort(rng.permutation(len(split.x_train))[: d.calibration_samples])
    n_test = min(len(split.x_test), d.eval_samples or len(split.x_test))
    return Dataset(split.name, split.x_train[calib_idx], split.x_test[:n_test], split.y_test[:n_test])


# ----------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    hardware_class: str
    profile: str  # built-in profile name or a YAML path
    devices: int | None = None  # devices of this class in the group, when resolved from one


def _profile_ref(spec: PipelineSpec, cls: str) -> str:
    from .optimize import list_profiles

    ref = spec.hardware.profiles.get(cls, cls)
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        p = spec.path(Path(ref))
        if not p.is_file():
            raise PipelineSpecError(f"hardware.profiles.{cls}: profile file {p} does not exist")
        return str(p)
    if ref not in list_profiles():
        raise PipelineSpecError(
            f"hardware class {cls!r} has no lab profile: map it in hardware.profiles (e.g. {cls}: rpi5, or a YAML path); "
            f"built-in profiles: {', '.join(sorted(list_profiles()))}"
        )
    return ref


def resolve_targets(spec: PipelineSpec, client: ControlClient | None, progress: Progress | None = None) -> list[Target]:
    """The hardware classes to build for. ``from_group`` asks the control plane which classes its devices have."""
    hw = spec.hardware
    if hw.classes:
        return [Target(c, _profile_ref(spec, c)) for c in dict.fromkeys(hw.classes)]
    if client is None:
        raise PipelineSpecError("hardware.from_group needs the control plane: set control.server or --server, and a token")
    try:
        _, devices = client.request("GET", f"/api/v1/groups/{hw.from_group}/devices")
    except ControlPlaneError as exc:
        raise PipelineSpecError(f"hardware.from_group {hw.from_group!r}: {exc}") from None
    counts: dict[str, int] = {}
    unclassed = 0
    for dev in devices or []:
        cls = ((dev or {}).get("hardware") or {}).get("hardware_class")
        if cls:
            counts[cls] = counts.get(cls, 0) + 1
        else:
            unclassed += 1
    if not counts:
        raise PipelineSpecError(
            f"hardware.from_group {hw.from_group!r}: none of its {len(devices or [])} device(s) reports a hardware class; "
            "list hardware.classes instead, or set hardware_class in the agents' config"
        )
    if unclassed:
        _say(progress, "targets", f"{unclassed} device(s) in {hw.from_group} report no hardware class: the control plane picks their variant")
    return [Target(c, _profile_ref(spec, c), n) for c, n in sorted(counts.items())]


# ----------------------------------------------------------------------------------------- optimize + gates


def optimize_target(spec: PipelineSpec, model: PreparedModel, data: Dataset, target: Target, out_dir: Path,
                    progress: Progress | None = None) -> Any:
    """``lab.optimize`` for one hardware class (report.json etc. in ``out_dir``)."""
    from .optimize import OptimizeError
    from .optimize import optimize as run_optimize

    budget = spec.gates.max_accuracy_drop if spec.gates.max_accuracy_drop is not None else spec.optimize.max_accuracy_drop
    try:
        return run_optimize(
            model.path, {"x": data.calibration}, {"x": data.x_test, "y": data.y_test}, target.profile,
            max_accuracy_drop=budget, out_dir=out_dir, measure_here=spec.optimize.measure_here,
            recipes=spec.optimize.recipes, preprocessing=model.preprocessing,
            progress=(lambda m, d, t: _say(progress, "optimize", f"{target.hardware_class}: {m} ({d}/{t})")) if progress else None,
        )
    except OptimizeError as exc:
        raise PipelineSpecError(f"optimize for {target.hardware_class} ({target.profile}): {exc}") from None


@dataclass
class GateCheck:
    gate: str
    passed: bool
    value: Any
    limit: Any
    detail: str = ""
    enforced: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "passed": self.passed, "value": self.value, "limit": self.limit,
                "detail": self.detail, "enforced": self.enforced}


@dataclass
class TargetReport:
    target: Target
    optimize: Any = None  # OptimizeResult
    checks: list[GateCheck] = field(default_factory=list)
    golden: dict[str, np.ndarray] | None = None  # raw golden inputs for the bundle
    bundle: Path | None = None
    variant: str | None = None
    published: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed or not c.enforced for c in self.checks)

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed and c.enforced]

    def to_json(self) -> dict[str, Any]:
        chosen = self.optimize.chosen if self.optimize is not None else None
        return {
            "hardware_class": self.target.hardware_class, "profile": self.target.profile, "devices": self.target.devices,
            "variant": self.variant, "recipe": chosen.recipe if chosen else None,
            "accuracy": chosen.metric_value if chosen else None,
            "latency_ms": chosen.latency.to_json() if chosen and chosen.latency else None,
            "size_bytes": chosen.size_bytes if chosen else None,
            "measured_on_target": self.optimize.measured_on_target if self.optimize is not None else None,
            "report": (self.optimize.files or {}).get("report_json") if self.optimize is not None else None,
            "gates_passed": self.passed, "gates": [c.to_json() for c in self.checks],
            "bundle": str(self.bundle) if self.bundle else None, "published": self.published,
        }


def _run_each(path: Path, inputs: dict[str, np.ndarray]) -> tuple[Any, list[np.ndarray]]:
    """The model's outputs on each sample as a batch of one (as the agent's golden check runs them)."""
    import onnxruntime as ort

    from .optimize.data import ModelIO

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(inputs.values())))
    per: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(n):
        for j, o in enumerate(sess.run(names, {k: v[i : i + 1] for k, v in inputs.items()})):
            per[j].append(np.asarray(o))
    return ModelIO.from_session(sess), [np.concatenate(p) for p in per]


def _classes(path: Path, io: Any, outputs: list[np.ndarray]) -> np.ndarray:
    """Top-1 classes, read as the optimize metrics read them; MetricError for a model that is no classifier."""
    from .optimize.metrics import choose_metric

    metric, _ = choose_metric(io, has_labels=True, override="top1_agreement", model_path=path)
    return metric._classes(outputs)  # type: ignore[attr-defined]


def _run_classes(path: Path, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    io, outputs = _run_each(path, inputs)
    return _classes(path, io, outputs), outputs


def _golden_check(path: Path, fp32: Path, feed: dict[str, np.ndarray], labels: np.ndarray | None, g: "GoldenGate") -> GateCheck:
    """Classifiers: top-1 vs the labels (or FP32's top-1). Other models: every float output within
    ``max_abs_diff`` of FP32's."""
    from .optimize.errors import MetricError

    io, got = _run_each(path, feed)
    try:
        classes = _classes(path, io, got)
    except MetricError:
        if labels is not None:
            raise PipelineSpecError("gates.golden: labels y were given, but the model has no class output") from None
        _, ref = _run_each(fp32, feed)
        diff = max((float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(got, ref)
                    if a.dtype.kind == "f" and a.size), default=0.0)
        return GateCheck("golden", diff <= g.max_abs_diff, diff, g.max_abs_diff,
                         f"largest output difference from FP32 on {len(next(iter(feed.values())))} golden inputs")
    if labels is None:
        labels = _classes(fp32, *_run_each(fp32, feed))
        against = "the FP32 model's answers"
    else:
        against = "their labels"
    wrong = np.flatnonzero(classes != labels)
    detail = f"{len(classes)} golden inputs vs {against}" + (f"; wrong: samples {wrong[:10].tolist()}" if len(wrong) else "")
    return GateCheck("golden", len(wrong) <= g.max_mismatches, int(len(wrong)), g.max_mismatches, detail)


def _golden_inputs(spec: PipelineSpec, model: PreparedModel, data: Dataset, fp32_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Raw golden inputs keyed by the model's input name, and their expected classes (None: agree with FP32)."""
    g = spec.gates.golden
    assert g is not None
    if g.npz is not None:
        p = spec.path(g.npz)
        try:
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise PipelineSpecError(f"gates.golden.npz: cannot read {p}: {exc}") from None
        labels = arrays.pop("y", None)
        if "x" in arrays and model.input_name not in arrays:
            arrays[model.input_name] = arrays.pop("x")
        if not arrays:
            raise PipelineSpecError(f"gates.golden.npz: {p} holds no inputs (one array per model input, or x)")
        return arrays, (labels.astype(np.int64) if labels is not None else None)
    # From the held-out set: samples the FP32 model classifies right (a variant must keep them right).
    x = data.x_test
    feed = model.preprocessing.apply(x) if model.preprocessing else x
    try:
        classes, _ = _run_classes(fp32_path, {model.input_name: feed})
    except Exception as exc:  # noqa: BLE001 - a non-classifier: the held-out labels cannot define golden answers
        raise PipelineSpecError(
            f"gates.golden.from_holdout needs a classifier ({exc}); give gates.golden.npz or set gates.golden: null"
        ) from None
    right = np.flatnonzero(classes == data.y_test)[: g.from_holdout]
    if len(right) == 0:
        raise PipelineSpecError("gates.golden.from_holdout: the FP32 model classifies no held-out sample right")
    return {model.input_name: np.ascontiguousarray(x[right])}, data.y_test[right]


def evaluate_gates(spec: PipelineSpec, model: PreparedModel, data: Dataset, report: TargetReport) -> TargetReport:
    """Check the chosen variant of one hardware class against every configured release gate."""
    res = report.optimize
    gates = spec.gates
    budget = gates.max_accuracy_drop if gates.max_accuracy_drop is not None else spec.optimize.max_accuracy_drop
    checks = report.checks
    chosen = res.chosen
    metric = res.metric.get("name")
    if chosen is None:
        checks.append(GateCheck("accuracy_drop", False, res.closest.drop if res.closest else None, budget,
                                f"no variant meets the optimize budget: {res.reason}"))
        return report
    checks.append(GateCheck("accuracy_drop", chosen.drop is not None and chosen.drop <= budget, chosen.drop, budget,
                            f"{metric} drop vs FP32 on {res.metric.get('eval_samples')} held-out samples ({chosen.name})"))
    if gates.min_accuracy is not None:
        ok = metric == "accuracy" and chosen.metric_value is not None and chosen.metric_value >= gates.min_accuracy
        checks.append(GateCheck("min_accuracy", ok, chosen.metric_value, gates.min_accuracy,
                                f"held-out {metric} of {chosen.name}" if metric == "accuracy" else f"needs labels; the metric is {metric}"))
    if gates.max_latency_ms is not None:
        limit = res.profile.latency_budget_ms if gates.max_latency_ms == "profile" else gates.max_latency_ms
        if limit is None:
            raise PipelineSpecError(f"gates.max_latency_ms: profile {res.profile.name} sets no latency_budget_ms; give a number")
        lat = chosen.latency
        value = (lat.median_ms if gates.latency_stat == "median" else lat.p95_ms) if lat else None
        enforced = res.measured_on_target or gates.latency_on_proxy == "enforce"
        where = "on the target" if res.measured_on_target else f"PROXY on {res.machine.hostname}"
        checks.append(GateCheck("latency", value is not None and value <= limit, value, limit,
                                f"batch-1 {gates.latency_stat} ms of {chosen.name}, {where}", enforced=enforced))
    if gates.max_size_mb is not None:
        size_mb = (chosen.size_bytes or 0) / 2**20
        checks.append(GateCheck("size", size_mb <= gates.max_size_mb, round(size_mb, 4), gates.max_size_mb, f"{chosen.name} file size, MB"))
    if gates.golden is not None:
        inputs, expected = _golden_inputs(spec, model, data, res.baseline.path)
        feed = dict(inputs)
        if model.preprocessing:
            feed[model.input_name] = model.preprocessing.apply(feed[model.input_name])
        try:
            checks.append(_golden_check(chosen.path, res.baseline.path, feed, expected, gates.golden))
        except PipelineSpecError:
            raise
        except Exception as exc:  # noqa: BLE001 - the variant does not run on them: the gate fails with the reason
            checks.append(GateCheck("golden", False, None, gates.golden.max_mismatches, f"golden inputs do not run: {str(exc).splitlines()[0]}"))
        report.golden = inputs
    return report


# ----------------------------------------------------------------------------------------- bundle + publish


def bundle_variant(spec: PipelineSpec, model: PreparedModel, data: Dataset, report: TargetReport, out_dir: Path) -> Path:
    """Sign the chosen variant as ``NAME-VERSION-VARIANT.ewb`` (``bundle create --variant-of`` does the same)."""
    from ..bundle import BundleError, build_bundle
    from ..bundle.variant import variant_from_report
    from ..security import KeyFileError, load_signer

    res = report.optimize
    chosen = res.chosen
    name = spec.bundle.variant_name.format(hardware_class=report.target.hardware_class, recipe=chosen.recipe)
    try:
        signer = load_signer(spec.path(spec.bundle.key))
    except KeyFileError as exc:
        raise PipelineSpecError(f"bundle.key: {exc}") from None
    try:
        variant, runtime = variant_from_report(res.out_dir, chosen.path, name)
        # The control plane prefers, for a device, the variants whose profile is its hardware class
        # (control/variants.py): name the class there, and keep the lab profile it was measured with.
        variant.figures["hardware_class"] = report.target.hardware_class
        variant.figures["lab_profile"] = variant.profile
        variant.profile = report.target.hardware_class
        golden = None
        if report.golden is not None:
            golden = (report.golden, spec.gates.golden.atol, spec.gates.golden.latency_budget_ms)  # type: ignore[union-attr]
        reference = None
        if spec.bundle.reference_samples:
            reference = {model.input_name: data.x_test[: spec.bundle.reference_samples]}
        out = out_dir / f"{spec.model.name}-{spec.bundle.version}-{name}.ewb"
        build_bundle(
            chosen.path, name=spec.model.name, version=spec.bundle.version, signer=signer, out=out,
            labels=model.labels, preprocessing=model.preprocessing, description=spec.model.description,
            variant=variant, runtime=runtime, golden=golden, reference=reference,
            metadata={"pipeline": {"hardware_class": report.target.hardware_class, "profile": report.target.profile}},
        )
    except (BundleError, ValueError) as exc:
        raise PipelineSpecError(f"bundle for {report.target.hardware_class}: {exc}") from None
    report.bundle, report.variant = out, name
    return out


def publish(client: ControlClient, reports: list[TargetReport], *, timeout: float = 300.0,
            progress: Progress | None = None) -> None:
    """Upload every bundle; the registry verifies the signature. Same bytes again: accepted (200)."""
    for r in reports:
        assert r.bundle is not None
        _say(progress, "publish", f"uploading {r.bundle.name}")
        try:
            status, body = client.request(
                "POST", "/api/v1/models", content=r.bundle.read_bytes(), timeout=timeout,
                headers={"Content-Type": "application/octet-stream"},
            )
        except ControlPlaneError as exc:
            hint = "; bump bundle.version (versions are immutable)" if exc.status == 409 else ""
            raise PublishError(f"upload of {r.bundle.name} failed: {exc}{hint}") from None
        r.published = {"status": "stored" if status == 201 else "already stored", "sha256": body.get("sha256"),
                       "variant": body.get("variant", r.variant)}


def rollout_body(spec: PipelineSpec) -> dict[str, Any]:
    """The POST /api/v1/rollouts body: waves as written (unset fields take the server's defaults)."""
    ro = spec.rollout
    assert ro is not None
    body: dict[str, Any] = {"model": spec.model.name, "version": spec.bundle.version}
    targets = {k: v for k, v in (("group", ro.group), ("tag", ro.tag), ("devices", ro.devices)) if v}
    if not targets and spec.hardware.from_group:
        targets = {"group": spec.hardware.from_group}
    if len(targets) != 1:
        raise PipelineSpecError("rollout: give exactly one of rollout.group, rollout.tag or rollout.devices")
    body.update(targets)
    body["waves"] = [w.model_dump(exclude_none=True) for w in ro.waves]
    if ro.rate_limit_per_min is not None:
        body["rate_limit_per_min"] = ro.rate_limit_per_min
    body["start_paused"] = ro.start_paused
    return body


def preflight(client: ControlClient, spec: PipelineSpec, until: str) -> None:
    """Cheap checks against the control plane before minutes of optimizing: reachable, the token works,
    the version is not taken, the rollout's group exists. Raises the error of the stage that would fail."""
    try:
        client.request("GET", "/api/v1/models")
    except ControlPlaneError as exc:
        raise PublishError(f"the registry cannot be used: {exc}") from None
    try:
        client.request("GET", f"/api/v1/models/{spec.model.name}/{spec.bundle.version}")
    except ControlPlaneError as exc:
        if exc.status != 404:
            raise PublishError(f"the registry cannot be used: {exc}") from None
    else:
        raise PublishError(
            f"{spec.model.name} {spec.bundle.version} is already in the registry and versions are immutable "
            "(a rebuild signs different bytes); bump bundle.version or pass --version"
        )
    if until == "rollout" and spec.rollout is not None:
        group = rollout_body(spec).get("group")
        if group:
            try:
                client.request("GET", f"/api/v1/groups/{group}")
            except ControlPlaneError as exc:
                raise RolloutStartError(f"the rollout could not be started: group {group!r}: {exc}") from None


def start_rollout(client: ControlClient, spec: PipelineSpec) -> dict[str, Any]:
    body = rollout_body(spec)
    try:
        _, out = client.request("POST", "/api/v1/rollouts", json=body)
    except ControlPlaneError as exc:
        hint = " (this control plane has no rollout API: upgrade it, or run with --until publish)" if exc.status == 404 and "Not Found" in str(exc) else ""
        raise RolloutStartError(f"the rollout was not started: {exc}{hint}") from None
    if not isinstance(out, dict) or "id" not in out:
        raise RolloutStartError(f"the rollout was not started: unexpected answer {str(out)[:200]}")
    return out


def wait_rollout(client: ControlClient, rollout_id: Any, *, timeout: float, poll: float,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll until completed (return it), halted/aborted (RolloutFailedError) or ``timeout`` (RolloutTimeoutError).

    Paused and waiting-for-approval rollouts keep being waited for: an operator may resume or approve.
    A control plane that is briefly unreachable (restart) is retried until the timeout.
    """
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while True:
        try:
            _, last = client.request("GET", f"/api/v1/rollouts/{rollout_id}")
        except ControlPlaneError as exc:
            if exc.status is not None and exc.status not in (502, 503, 504):
                raise RolloutFailedError(f"rollout {rollout_id}: {exc}") from None
        if on_update and last:
            on_update(last)
        state = last.get("state")
        if state in TERMINAL_OK:
            return last
        if state in TERMINAL_FAILED:
            halted = last.get("halted_cohorts") or []
            where = f" (halted: {', '.join(map(str, halted))})" if halted else ""
            raise RolloutFailedError(f"rollout {rollout_id} {state}{where}: {describe_decision(last)}")
        if time.monotonic() >= deadline:
            raise RolloutTimeoutError(
                f"rollout {rollout_id} still {state or 'unknown'} after {timeout:g} s (timeouts.rollout_s / --timeout); "
                f"it goes on in the control plane: {describe_decision(last)}"
            )
        time.sleep(min(poll, max(0.05, deadline - time.monotonic())))


def describe_decision(rollout: dict[str, Any]) -> str:
    """The latest recorded decision, one line (what the rollout did last and why)."""
    decisions = rollout.get("decisions") or []
    if not decisions:
        return "no decision recorded yet"
    d = decisions[-1]
    wave = d.get("wave_name") or d.get("wave")
    where = "/".join(str(x) for x in (wave, d.get("cohort")) if x is not None and x != "")
    return f"{d.get('decision')}{f' at {where}' if where else ''}: {d.get('reason', '')}".strip()


def describe_target(rollout: dict[str, Any]) -> str:
    t = rollout.get("target") or {}
    return f"{t.get('kind', '?')} {t.get('value', '?')}" + (f" ({rollout['devices']} device(s))" if "devices" in rollout else "")


def describe_progress(rollout: dict[str, Any]) -> str:
    """One line: devices updated, and where each hardware class (cohort) is."""
    cohorts = ", ".join(f"{c.get('cohort')} {c.get('wave_name')} {c.get('phase')}" for c in rollout.get("cohorts") or [])
    counts = f"{rollout.get('updated', '?')}/{rollout.get('devices', '?')} updated" if "devices" in rollout else ""
    return " · ".join(x for x in (counts, cohorts) if x)


# ----------------------------------------------------------------------------------------- the whole run


#: PipelineResult.outcome for each failure (the CLI maps the same types to exit codes).
OUTCOMES: dict[type[PipelineError], str] = {
    PublishError: "publish_failed", RolloutStartError: "rollout_start_failed",
    RolloutFailedError: "rollout_failed", RolloutTimeoutError: "timeout",
}


@dataclass
class PipelineResult:
    name: str
    version: str
    out_dir: Path
    until: str
    targets: list[TargetReport] = field(default_factory=list)
    stage: str = "start"  # the last stage reached
    rollout: dict[str, Any] | None = None
    outcome: str = "running"  # ok | gate_failed | publish_failed | rollout_start_failed | rollout_failed | timeout | error
    error: str | None = None
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)  # wall time per stage (where a CI run spends it)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "edgewise-release/1", "model": self.name, "version": self.version, "until": self.until,
            "outcome": self.outcome, "stage": self.stage, "error": self.error, "out_dir": str(self.out_dir),
            "targets": [t.to_json() for t in self.targets],
            "published": all(t.published for t in self.targets) if self.targets else False,
            "rollout": self.rollout, "elapsed_s": round(self.elapsed_s, 2),
            "stage_s": {k: round(v, 2) for k, v in self.stage_s.items()},
        }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _say(progress: Progress | None, stage: str, message: str) -> None:
    if progress is not None:
        progress(stage, message)


def run_pipeline(
    spec: PipelineSpec, *, out_dir: Path, client: ControlClient | None = None, until: str = "rollout",
    progress: Progress | None = None, on_rollout: Callable[[dict[str, Any]], None] | None = None,
    result: PipelineResult | None = None,
) -> PipelineResult:
    """Run the stages up to ``until`` (optimize | gates | bundle | publish | rollout); raise on the first failure.

    ``result`` (optional) is filled as stages complete, so a caller still has the figures after an exception.
    """
    if until not in STAGES:
        raise PipelineSpecError(f"--until {until!r}: choose one of {', '.join(STAGES)}")
    t0 = time.monotonic()
    res = result or PipelineResult(spec.model.name, spec.bundle.version, out_dir, until)
    res.until, res.out_dir = until, out_dir
    stop = STAGES.index(until)
    needs_control = stop >= STAGES.index("publish") or spec.hardware.from_group is not None
    if needs_control and client is None:
        raise PipelineSpecError("this run talks to the control plane: set control.server (or --server) and a token ($EDGEWISE_TOKEN)")
    if stop >= STAGES.index("rollout") and spec.rollout is None:
        raise PipelineSpecError("the pipeline has no rollout section: add one, or run with --until publish")
    if spec.rollout is not None:
        rollout_body(spec)  # a bad rollout section fails now, not after minutes of optimizing
    out_dir.mkdir(parents=True, exist_ok=True)
    last = [time.monotonic()]

    def mark(stage: str) -> None:
        now = time.monotonic()
        res.stage_s[stage] = res.stage_s.get(stage, 0.0) + now - last[0]
        last[0] = now

    try:
        if client is not None and stop >= STAGES.index("publish"):
            preflight(client, spec, until)
        targets = resolve_targets(spec, client, progress)  # cheap mistakes (an unknown class) before any training
        mark("preflight")
        model = prepare_model(spec, out_dir / "model", progress)
        data = load_dataset(spec, model)
        mark("model")
        _say(progress, "targets", "building for " + ", ".join(f"{t.hardware_class} ({t.profile})" for t in targets))
        res.targets = [TargetReport(t) for t in targets]
        for r in res.targets:
            r.optimize = optimize_target(spec, model, data, r.target, out_dir / "optimize" / r.target.hardware_class, progress)
        res.stage = "optimize"
        mark("optimize")
        if stop < STAGES.index("gates"):
            res.outcome = "ok"
            return res
        for r in res.targets:
            evaluate_gates(spec, model, data, r)
            _say(progress, "gates", f"{r.target.hardware_class}: " + ", ".join(
                f"{c.gate} {'ok' if c.passed else ('FAILED' if c.enforced else 'warn')} ({_fmt(c.value)} vs {_fmt(c.limit)})"
                for c in r.checks))
        res.stage = "gates"
        mark("gates")
        failed = [r for r in res.targets if not r.passed]
        if failed:
            res.outcome = "gate_failed"
            res.error = "release gates failed (nothing published): " + "; ".join(
                f"{r.target.hardware_class}: " + ", ".join(f"{c.gate} {_fmt(c.value)} vs limit {_fmt(c.limit)} ({c.detail})" for c in r.failures())
                for r in failed
            )
            raise GateFailedError(res.error, res)
        if stop < STAGES.index("bundle"):
            res.outcome = "ok"
            return res
        for r in res.targets:
            bundle_variant(spec, model, data, r, out_dir / "bundles")
            _say(progress, "bundle", f"signed {r.bundle.name if r.bundle else '?'}")
        res.stage = "bundle"
        mark("bundle")
        if stop < STAGES.index("publish"):
            res.outcome = "ok"
            return res
        assert client is not None
        publish(client, res.targets, timeout=spec.timeouts.upload_s, progress=progress)
        res.stage = "publish"
        mark("publish")
        if stop < STAGES.index("rollout"):
            res.outcome = "ok"
            return res
        started = start_rollout(client, spec)
        res.rollout = started
        _say(progress, "rollout", f"{started['id']} started ({started.get('state', '?')}): {spec.model.name} {spec.bundle.version} to {describe_target(started)}")

        def seen(r: dict[str, Any]) -> None:
            res.rollout = r
            if on_rollout:
                on_rollout(r)

        res.rollout = wait_rollout(client, started["id"], timeout=spec.timeouts.rollout_s, poll=spec.timeouts.poll_s, on_update=seen)
        res.stage = "rollout"
        mark("rollout")
        res.outcome = "ok"
        return res
    except PipelineError as exc:
        if not isinstance(exc, GateFailedError):  # that one filled in the result (every failing gate) itself
            res.outcome = next((o for t, o in OUTCOMES.items() if isinstance(exc, t)), "error")
            res.error = str(exc)
        raise
    finally:
        res.elapsed_s = time.monotonic() - t0
        try:
            (out_dir / "release.json").write_text(json.dumps(res.to_json(), indent=2, default=str))
        except OSError:
            pass


def resolve_token(given: str | None) -> str | None:
    """--token, else $EDGEWISE_TOKEN, else $EDGEWISE_API_TOKEN (what the other commands read)."""
    for v in (given, *(os.environ.get(e) for e in TOKEN_ENVS)):
        if v and v.strip():
            return v.strip()
    return None


def safe_dir_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)
