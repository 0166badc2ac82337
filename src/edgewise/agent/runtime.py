"""The inference runtime: one ONNX Runtime session built from a verified bundle.

``LoadedModel.predict`` is the hot path of the whole device. It checks the
input against the manifest's tensor specs *before* ONNX Runtime sees it (so a
caller gets "input 'x': expected shape [?, 64], got [1, 63]" instead of an ORT
stack trace), applies the bundle's preprocessing with the one implementation in
``edgewise.data``, and runs the session. Everything that can be computed once
(output names, fixed dimensions, numpy dtypes) is computed at load time; the
per-call work is a few attribute reads and comparisons.

A ``LoadedModel`` is immutable once built, so the agent can swap the live one
by rebinding a single reference while requests in flight finish on the old one.
(The one settable attribute, ``repair_sink``, is where the repair counts of the
preprocessing go: the agent points it at its monitor when it activates the model.)

A spec that validates the raw input itself (a ``check`` step) or changes its
shape (window, resample, resize, reshape) takes raw input of any numeric dtype;
the model's input spec is then checked on the array *after* preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..data.preprocessing import PreprocessingError

if TYPE_CHECKING:
    from ..bundle import Manifest, TensorSpec, VerifiedBundle

from ..bundle.manifest import ORT_TYPES as _ORT_TYPES


class InputError(ValueError):
    """The caller's input does not fit the model; the message names the input, what was expected and what came."""


class ModelLoadError(ValueError):
    """A verified bundle whose model does not load, does not match its manifest, or fails its smoke test."""


class InferenceError(RuntimeError):
    """ONNX Runtime failed on input that passed validation (a model or runtime fault, not the caller's)."""


def _fmt_shape(shape: Any) -> str:
    return "[" + ", ".join("?" if d is None or isinstance(d, str) or (isinstance(d, int) and d < 0) else str(d) for d in shape) + "]"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A manifest TensorSpec compiled for fast checks: numpy dtype, rank, and the fixed dimensions only."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every non-symbolic dimension
    is_string: bool

    @classmethod
    def from_tensor_spec(cls, spec: "TensorSpec") -> "InputSpec":
        is_string = spec.dtype in ("str", "string", "object")
        try:
            dtype = np.dtype(object) if is_string else np.dtype(spec.dtype)
        except TypeError:
            raise ModelLoadError(f"input {spec.name!r}: the manifest names dtype {spec.dtype!r}, which numpy does not know") from None
        shape = tuple(spec.shape)
        fixed = tuple((axis, d) for axis, d in enumerate(shape) if isinstance(d, int) and d >= 0)
        return cls(spec.name, dtype, shape, len(shape), fixed, is_string)

    def matches(self, x: np.ndarray) -> bool:
        if self.is_string:
            if x.dtype.kind not in "UO":
                return False
        elif x.dtype != self.dtype:
            return False
        if x.ndim != self.ndim:
            return False
        shape = x.shape
        for axis, size in self.fixed:
            if shape[axis] != size:
                return False
        return True

    def error(self, x: Any) -> InputError:
        """The InputError for ``x``, naming every mismatch and the fix."""
        if not isinstance(x, np.ndarray):
            return InputError(
                f"input {self.name!r}: expected a numpy.ndarray of {self.dtype_name} with shape {_fmt_shape(self.shape)}, "
                f"got {type(x).__name__}; wrap it with numpy.asarray(value, dtype={self.dtype_name!r})"
            )
        problems = []
        if not self.is_string and x.dtype != self.dtype:
            problems.append(f"expected dtype {self.dtype_name}, got {x.dtype}")
        elif self.is_string and x.dtype.kind not in "UO":
            problems.append(f"expected strings, got {x.dtype}")
        if x.ndim != self.ndim or any(x.shape[a] != s for a, s in self.fixed):
            problems.append(f"expected shape {_fmt_shape(self.shape)}, got {list(x.shape)}")
        hint = ""
        if problems and problems[0].startswith("expected dtype"):
            hint = f"; convert with x.astype({self.dtype_name!r})"
        return InputError(f"input {self.name!r}: " + "; ".join(problems) + hint)

    @property
    def dtype_name(self) -> str:
        return "str" if self.is_string else self.dtype.name

    def zeros(self) -> np.ndarray:
        """A zero tensor of this spec with every free dimension set to 1 (the smoke-test input)."""
        shape = tuple(d if isinstance(d, int) and d >= 0 else 1 for d in self.shape)
        if self.is_string:
            return np.full(shape, "", dtype=object)
        return np.zeros(shape, dtype=self.dtype)


def _after_preprocessing(spec: InputSpec, x: np.ndarray) -> InputError:
    """The model's input check failed on what the bundle's preprocessing produced from accepted raw input."""
    return InputError(f"{spec.error(x)} (after the bundle's preprocessing: send raw input the spec turns into that)")


class LoadedModel:
    """An ONNX Runtime session plus what it takes to feed it safely: input specs and preprocessing.

    Build one with :meth:`from_bundle`; never from unverified bytes.
    """

    __slots__ = (
        "name", "version", "manifest", "sha256", "key_id", "inputs", "input_names", "output_names",
        "_session", "_run", "_pre", "_single", "_first", "_raw", "repair_sink",
    )

    def __init__(self, session: Any, manifest: "Manifest", *, sha256: str = "", key_id: str = "") -> None:
        self._session = session
        self.manifest = manifest
        self.name: str = manifest.name
        self.version: str = manifest.version
        self.sha256 = sha256
        self.key_id = key_id
        declared = {s.name: s for s in manifest.model.inputs}
        actual = [i.name for i in session.get_inputs()]
        if set(actual) != set(declared):
            raise ModelLoadError(
                f"{manifest.name} {manifest.version}: the model's inputs {actual} differ from the manifest's {list(declared)}; "
                "rebuild the bundle"
            )
        for arg in session.get_inputs():
            ort_dtype = _ORT_TYPES.get(arg.type)
            if ort_dtype is not None and ort_dtype != declared[arg.name].dtype:
                raise ModelLoadError(
                    f"{manifest.name} {manifest.version}: input {arg.name!r} is {ort_dtype} in the model but "
                    f"{declared[arg.name].dtype} in the manifest; rebuild the bundle"
                )
        self.inputs: dict[str, InputSpec] = {n: InputSpec.from_tensor_spec(declared[n]) for n in actual}
        self.input_names: tuple[str, ...] = tuple(actual)
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        self._run: Callable[..., list[Any]] = session.run
        spec = manifest.preprocessing
        # Preprocessing applies to the primary (first) input; an empty pipeline is skipped entirely.
        self._pre: Callable[[np.ndarray], tuple[np.ndarray, dict[str, int]]] | None = spec.run if spec else None
        self._raw: bool = bool(spec) and spec.checks_raw_input
        # Called with the repairs of each preprocessing run that made any (the agent's Monitor.count_repairs).
        self.repair_sink: Callable[[dict[str, int]], None] | None = None
        self._first = actual[0]
        self._single: InputSpec | None = self.inputs[actual[0]] if len(actual) == 1 else None

    @classmethod
    def from_bundle(cls, bundle: "VerifiedBundle", *, threads: int | None = None) -> "LoadedModel":
        """Load the model of a verified bundle into a fresh ONNX Runtime session."""
        import onnxruntime as ort  # lazy: the agent imports this module before it knows it has a model

        tuned = bundle.manifest.runtime
        so = ort.SessionOptions()
        # The device's own setting wins; else what `edgewise optimize` tuned for the profile; else 1.
        so.intra_op_num_threads = threads or (tuned.intra_op_threads if tuned and tuned.intra_op_threads else 1)
        so.inter_op_num_threads = (tuned.inter_op_threads if tuned and tuned.inter_op_threads else 1)
        if tuned is not None:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, tuned.graph_optimization_level)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # Spinning threads buy microseconds with a busy core; on a battery-powered board that is a bad trade.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        manifest = bundle.manifest
        try:
            model_bytes = bundle.read_model()
            providers = ["CPUExecutionProvider"]
            if tuned is not None and tuned.execution_provider in ort.get_available_providers():
                providers = list(dict.fromkeys([tuned.execution_provider, "CPUExecutionProvider"]))
            session = ort.InferenceSession(model_bytes, so, providers=providers)
        except ModelLoadError:
            raise
        except Exception as exc:  # ORT raises its own exception zoo; BundleError for a changed member
            raise ModelLoadError(f"{manifest.name} {manifest.version}: ONNX Runtime cannot load the model: {exc}") from None
        return cls(session, manifest, sha256=bundle.sha256, key_id=bundle.key_id)

    def predict(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one ndarray (single-input models) or a mapping name -> ndarray.

        Raises :class:`InputError` (before running anything) when an input's name,
        dtype or shape does not fit the manifest, :class:`InferenceError` when
        ONNX Runtime fails on valid input.
        """
        return self.run(inputs)[0]

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``predict``, also returning the feed ONNX Runtime got (inputs after validation and preprocessing):
        what observers of the data (drift, sample capture) look at, exactly as the model saw it."""
        single = self._single
        if single is not None and inputs.__class__ is np.ndarray:  # the hot path: no dict walking
            pre = self._pre
            if not self._raw and not single.matches(inputs):  # type: ignore[arg-type]
                raise single.error(inputs)
            if pre is not None:
                try:
                    inputs, repairs = pre(inputs)  # type: ignore[arg-type]
                except PreprocessingError as exc:
                    raise InputError(f"input {single.name!r}: {exc}") from None
                if repairs:
                    self._repaired(repairs)
                if self._raw and not single.matches(inputs):  # type: ignore[arg-type]
                    raise _after_preprocessing(single, inputs)
            feed = {single.name: inputs}
        else:
            feed = self._feed(inputs)
        try:
            outputs = self._run(self.output_names, feed)
        except Exception as exc:
            raise InferenceError(f"{self.name} {self.version}: ONNX Runtime failed: {exc}") from None
        return dict(zip(self.output_names, outputs)), feed

    def _feed(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, np.ndarray):  # an ndarray subclass (memmap, ...) for a single-input model
            if self._single is None:
                raise InputError(
                    f"{self.name} {self.version} takes {len(self.input_names)} inputs {list(self.input_names)}; "
                    "pass a dict name -> array"
                )
            inputs = {self._single.name: inputs}
        if not isinstance(inputs, Mapping):
            if self._single is not None:
                raise self._single.error(inputs)
            raise InputError(f"expected a dict name -> numpy.ndarray for inputs {list(self.input_names)}, got {type(inputs).__name__}")
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.inputs]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if unknown:
                parts.append(f"unknown input(s) {unknown}")
            raise InputError(f"{'; '.join(parts)}; {self.name} {self.version} takes {list(self.input_names)}")
        feed: dict[str, Any] = {}
        for name in self.input_names:
            x = inputs[name]
            spec = self.inputs[name]
            first = name == self._first and self._pre is not None
            if not isinstance(x, np.ndarray) or (not (first and self._raw) and not spec.matches(x)):
                raise spec.error(x)
            if first:
                try:
                    x, repairs = self._pre(x)  # type: ignore[misc]
                except PreprocessingError as exc:
                    raise InputError(f"input {name!r}: {exc}") from None
                if repairs:
                    self._repaired(repairs)
                if self._raw and not spec.matches(x):
                    raise _after_preprocessing(spec, x)
            feed[name] = x
        return feed

    def _repaired(self, repairs: dict[str, int]) -> None:
        sink = self.repair_sink
        if sink is not None:
            try:
                sink(repairs)
            except Exception:  # counting must never fail a prediction
                pass

    def smoke_test(self) -> None:
        """One predict on zeros (free dimensions = 1): it must run and give finite, well-formed outputs."""
        sample = {name: spec.zeros() for name, spec in self.inputs.items()}
        try:
            if self._raw:  # zeros of the model's shape are not raw input of a reshaping spec: feed the session directly
                try:
                    outputs = dict(zip(self.output_names, self._run(self.output_names, sample)))
                except Exception as exc:
                    raise InferenceError(f"ONNX Runtime failed: {exc}") from None
            else:
                outputs = self.predict(sample)
        except (InputError, InferenceError) as exc:
            raise ModelLoadError(f"{self.name} {self.version}: smoke test failed: {exc}") from None
        declared = [o.name for o in self.manifest.model.outputs]
        if declared and list(outputs) != declared:
            raise ModelLoadError(f"{self.name} {self.version}: smoke test: outputs {list(outputs)} differ from the manifest's {declared}")
        for name, value in outputs.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ModelLoadError(f"{self.name} {self.version}: smoke test: output {name!r} is not finite on zero input")

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.version!r}, inputs={list(self.input_names)}, outputs={self.output_names})"
