"""Calibration and evaluation data: ``.npz`` files keyed by input name (or ``x``), plus optional ``y`` labels.

``load_npz`` reads the file as it is; ``bind_inputs`` checks it against the model
(names, ranks, fixed dimensions, sample counts) and casts to the model's dtypes,
so a wrong key or shape fails early with the expected names and shapes.

Example:
    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "eval.npz")
    >>> np.savez(p, x=np.zeros((4, 64), np.float64), y=np.arange(4))
    >>> arrays, labels = load_npz(p)
    >>> sorted(arrays), labels.tolist()
    (['x'], [0, 1, 2, 3])
    >>> io = ModelIO(inputs=[TensorInfo("input", "float32", [None, 64])], outputs=[])
    >>> bound = bind_inputs(arrays, io, what="eval")
    >>> list(bound), bound["input"].dtype.name
    (['input'], 'float32')
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import DataError

LABEL_KEY = "y"
GENERIC_INPUT_KEY = "x"

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy name
    shape: list[int | str | None]

    @property
    def batch_dim(self) -> int | None:
        """The fixed first dimension, or None when it is free (symbolic)."""
        d = self.shape[0] if self.shape else None
        return d if isinstance(d, int) and d > 0 else None


@dataclass(frozen=True)
class ModelIO:
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @classmethod
    def from_session(cls, sess: Any) -> ModelIO:
        def info(a: Any) -> TensorInfo:
            return TensorInfo(a.name, _ORT_DTYPES.get(a.type, a.type), list(a.shape))

        return cls([info(i) for i in sess.get_inputs()], [info(o) for o in sess.get_outputs()])

    @property
    def fixed_batch(self) -> int | None:
        """The model's fixed batch size if any input has one (then batches must be exactly that)."""
        for i in self.inputs:
            if i.batch_dim is not None:
                return i.batch_dim
        return None


@dataclass
class EvalSet:
    """Evaluation inputs (by model input name, or ``x``) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | EvalSet) -> EvalSet:
        if isinstance(data, EvalSet):
            return data
        arrays = {k: np.asarray(v) for k, v in data.items() if k != LABEL_KEY}
        labels = np.asarray(data[LABEL_KEY]) if LABEL_KEY in data else None
        return cls(arrays, labels)

    @classmethod
    def from_npz(cls, path: str | Path) -> EvalSet:
        arrays, labels = load_npz(path)
        return cls(arrays, labels)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0


def load_npz(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``(inputs, labels)`` from an ``.npz``: every array but ``y`` is an input, ``y`` (if any) the labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz of plain arrays (np.savez): {exc}") from None
    labels = arrays.pop(LABEL_KEY, None)
    if not arrays:
        raise DataError(f"{path} holds no input arrays (expected keys: the model's input names, or 'x'; 'y' is labels)")
    return arrays, labels


def bind_inputs(arrays: Mapping[str, np.ndarray], io: ModelIO, *, what: str = "data") -> dict[str, np.ndarray]:
    """Map ``arrays`` onto the model's inputs, check shapes and sample counts, cast dtypes."""
    names = [i.name for i in io.inputs]
    arrays = {k: v for k, v in arrays.items() if k != LABEL_KEY}
    if set(arrays) == {GENERIC_INPUT_KEY} and GENERIC_INPUT_KEY not in names:
        if len(names) != 1:
            raise DataError(f"{what}: key 'x' is ambiguous, the model has {len(names)} inputs {names}; key the arrays by input name")
        arrays = {names[0]: arrays[GENERIC_INPUT_KEY]}
    unknown = sorted(set(arrays) - set(names))
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        hint = " (or 'x' for a single-input model)" if len(names) == 1 else ""
        raise DataError(
            f"{what}: keys {sorted(arrays)} do not match the model's inputs {names}{hint}"
            + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
        )
    out: dict[str, np.ndarray] = {}
    n = None
    for info in io.inputs:
        a = np.asarray(arrays[info.name])
        if a.ndim != len(info.shape):
            raise DataError(
                f"{what}: input {info.name!r} has shape {list(a.shape)}, the model expects rank {len(info.shape)} "
                f"{_shape_str(info.shape)} (first axis = samples)"
            )
        for axis, (got, want) in enumerate(zip(a.shape, info.shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                raise DataError(
                    f"{what}: input {info.name!r} has shape {list(a.shape)}, the model expects {_shape_str(info.shape)} "
                    f"(axis {axis} is {got}, should be {want})"
                )
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise DataError(f"{what}: inputs have different sample counts ({n} and {a.shape[0]} for {info.name!r})")
        try:
            out[info.name] = np.ascontiguousarray(a.astype(info.dtype, copy=False))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{what}: input {info.name!r} ({a.dtype}) cannot be cast to {info.dtype}: {exc}") from None
    if not n:
        raise DataError(f"{what}: no samples")
    return out


def check_labels(labels: np.ndarray | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"eval: labels 'y' have shape {list(np.shape(labels))}, expected ({n},): one class label per sample")
    if y.dtype.kind == "f":
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError("eval: labels 'y' are not class indices (non-integer floats); remove 'y' to use a fidelity metric")
        y = y.astype(np.int64)
    return y


def _shape_str(shape: list[int | str | None]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?" for i, d in enumerate(shape)) + "]"


def batches(inputs: Mapping[str, np.ndarray], batch: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch):
        yield {k: v[start:start + batch] for k, v in inputs.items()}


def take(inputs: Mapping[str, np.ndarray], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A reproducible subsample of ``n`` rows (all rows if there are fewer)."""
    total = len(next(iter(inputs.values())))
    if total <= n:
        return dict(inputs)
    idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return {k: v[idx] for k, v in inputs.items()}


def repeat_to(inputs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Exactly ``n`` rows: the first ``n``, repeated if there are fewer."""
    total = len(next(iter(inputs.values())))
    idx = np.arange(n) % total
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


@dataclass
class CalibrationSet:
    """Calibration inputs bound to the model, and a folder for calibration caches shared by recipes.

    Static recipes with the same calibration method reuse one cache (ORT's
    ``calibration_cache_path``), so per-channel/per-tensor/QOperator variants calibrate once.
    """

    inputs: dict[str, np.ndarray]
    batch: int = 16
    cache_dir: Path | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def reader(self, max_samples: int | None = None, seed: int = 0) -> Any:
        """An ``onnxruntime.quantization.CalibrationDataReader`` over (a subsample of) the data."""
        from onnxruntime.quantization import CalibrationDataReader

        data = take(self.inputs, max_samples, seed) if max_samples else self.inputs
        batch = self.batch

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = batches(data, batch)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

            def __len__(self) -> int:
                return -(-len(next(iter(data.values()))) // batch)

        return _Reader()

    def cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir / f"calibration-{key}.json"
