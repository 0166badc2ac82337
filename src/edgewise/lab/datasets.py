"""Data for the lab's torch models: sets that ship inside packages, and the user's own (.npz).

Nothing here downloads. ``digits`` is bundled with scikit-learn (1,797 8x8 images,
UCI ML hand-written digits); ``BasicMotions`` (smart-watch accelerometer + gyroscope,
6 channels x 100 steps, 4 activities, 40 train / 40 test series) ships inside the
``aeon`` (or ``sktime``) package as ``.ts`` files, which :func:`parse_ts` reads
without importing either package.

All loaders return a :class:`DataSplit` of numpy arrays (float32 inputs, int64 class
indices), so this module imports without torch.

Example:
    >>> data = load_digits_images(size=32)
    >>> data.x_train.shape[1:], data.num_classes
    ((1, 32, 32), 10)
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

#: Keys a user's ``.npz`` file must hold (``edgewise compress --data file.npz``).
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Environment variable naming a folder that holds ``BasicMotions_TRAIN.ts`` and ``_TEST.ts``.
BASIC_MOTIONS_ENV = "EDGEWISE_BASICMOTIONS_DIR"


class DataError(ValueError):
    """The data given to the lab is malformed (missing keys, shapes that disagree, bad labels)."""


class DatasetNotAvailableError(RuntimeError):
    """A data set that ships inside an optional package is not installed here."""


@dataclass(frozen=True)
class DataSplit:
    """A train/test split: float32 inputs ``(n, ...)`` and int64 class indices ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"
    classes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.ndim < 2:
                raise DataError(f"x_{part} must have shape (n, features...), got {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"y_{part} must have shape ({len(x)},) to match x_{part}, got {y.shape}")
            if len(x) == 0:
                raise DataError(f"x_{part} is empty")
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"y_{part} must hold integer class indices, got dtype {y.dtype}")
            if y.min() < 0:
                raise DataError(f"y_{part} holds negative class indices")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"x_train {self.x_train.shape[1:]} and x_test {self.x_test.shape[1:]} sample shapes differ")
        object.__setattr__(self, "x_train", np.ascontiguousarray(self.x_train, dtype=np.float32))
        object.__setattr__(self, "x_test", np.ascontiguousarray(self.x_test, dtype=np.float32))
        object.__setattr__(self, "y_train", self.y_train.astype(np.int64))
        object.__setattr__(self, "y_test", self.y_test.astype(np.int64))
        if not self.classes:
            object.__setattr__(self, "classes", tuple(str(i) for i in range(self.num_classes)))
        elif len(self.classes) < self.num_classes:
            raise DataError(f"{len(self.classes)} class names for {self.num_classes} classes")

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> DataSplit:
        """A smaller split (random, class-stratified where possible), e.g. for quick tests."""

        def pick(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
            if n is None or n >= len(x):
                return x, y
            from sklearn.model_selection import train_test_split

            try:
                idx, _ = train_test_split(np.arange(len(x)), train_size=n, random_state=seed, stratify=y)
            except ValueError:  # too few samples per class to stratify
                idx = np.random.default_rng(seed).permutation(len(x))[:n]
            idx = np.sort(idx)
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return replace(self, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)

    def preprocessed(self, spec: Any) -> DataSplit:
        """Both parts run through a bundle's preprocessing spec (``PreprocessingSpec`` or its JSON dict) with
        the one implementation the agent serves with, so the lab trains, calibrates and evaluates on exactly
        what the device feeds the model."""
        from ..data.preprocessing import PreprocessingError, PreprocessingSpec

        if not isinstance(spec, PreprocessingSpec):
            spec = PreprocessingSpec.model_validate(spec)
        try:
            return replace(self, x_train=spec.apply(self.x_train), x_test=spec.apply(self.x_test))
        except PreprocessingError as exc:
            raise DataError(f"{self.name}: the preprocessing rejects the data: {exc}") from None

    def save_npz(self, path: str | Path) -> Path:
        """Write the split in the ``.npz`` layout that :func:`load_npz` and the CLI read."""
        path = Path(path)
        np.savez_compressed(
            path, x_train=self.x_train, y_train=self.y_train, x_test=self.x_test, y_test=self.y_test,
            classes=np.array(self.classes),
        )
        return path


def load_npz(path: str | Path, name: str | None = None) -> DataSplit:
    """Read a user's split from ``.npz`` with keys ``x_train, y_train, x_test, y_test`` (optional ``classes``).

    Inputs are cast to float32 and must already be in the form the model takes
    (e.g. ``(n, 1, 32, 32)`` for an image CNN); labels are integer class indices.
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DataError(
                f"{path} lacks {', '.join(missing)}; it holds {', '.join(npz.files) or 'nothing'}. "
                f"Save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
            )
        arrays = {k: npz[k] for k in NPZ_KEYS}
        classes = tuple(str(c) for c in npz["classes"]) if "classes" in npz.files else ()
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            arrays[k] = y.astype(np.int64)
    return DataSplit(**arrays, name=name or path.stem, classes=classes)


# --------------------------------------------------------------------------- digits (scikit-learn)


def load_digits_features(seed: int = 0, test_size: float = 0.3) -> DataSplit:
    """The 64 raw digit pixels scaled to 0..1, same split as the demo (:mod:`.demo_model`)."""
    from .demo_model import load_digits_split

    d = load_digits_split(seed=seed, test_size=test_size)
    return DataSplit(
        d.x_train / 16.0, d.y_train, d.x_test / 16.0, d.y_test, name="digits",
        meta={"source": "sklearn.datasets.load_digits", "scale": "pixels / 16"},
    )


def load_digits_images(seed: int = 0, test_size: float = 0.3, size: int = 32) -> DataSplit:
    """Digits as ``(n, 1, size, size)`` images (bilinear upsampling of the 8x8 originals), 0..1.

    Upsampled so that three conv+pool blocks have room to work; same split as
    :func:`load_digits_features`.
    """
    flat = load_digits_features(seed=seed, test_size=test_size)

    def up(x: np.ndarray) -> np.ndarray:
        img = x.reshape(-1, 8, 8)
        if size == 8:
            return img[:, None]
        # Bilinear, pixel centres aligned (like torch's align_corners=False), edges clamped.
        src = (np.arange(size) + 0.5) * 8 / size - 0.5
        lo = np.clip(np.floor(src).astype(int), 0, 7)
        hi = np.clip(lo + 1, 0, 7)
        w = np.clip(src - lo, 0.0, 1.0).astype(np.float32)
        rows = img[:, lo, :] * (1 - w)[None, :, None] + img[:, hi, :] * w[None, :, None]
        out = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
        return out[:, None].astype(np.float32)

    return replace(
        flat, x_train=up(flat.x_train), x_test=up(flat.x_test), name=f"digits{size}",
        meta={**flat.meta, "upsampled": f"8x8 -> {size}x{size} bilinear"},
    )


# --------------------------------------------------------------------------- BasicMotions (.ts)


def parse_ts(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Parse a ``.ts`` time-series file (the sktime/aeon format) with equal-length series.

    Returns ``(x, labels, header)``: ``x`` float32 ``(n, dimensions, length)``, ``labels``
    the class label strings ``(n,)``, ``header`` the ``@key value`` lines. Lines starting
    with ``#`` are comments; after ``@data`` each line is one case, dimensions separated by
    ``:``, values by ``,``, the class label last. ``?`` (missing) reads as NaN.
    Series with time stamps or unequal lengths are not supported.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    rows: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise DataError(f"{path}:{lineno}: expected an @header line before @data")
                key, _, value = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                    continue
                header[key] = value.strip()
                continue
            parts = line.split(":")
            has_label = header.get("classlabel", "false").split()[0].lower() == "true"
            if has_label:
                labels.append(parts[-1].strip())
                parts = parts[:-1]
            try:
                rows.append([[float("nan") if v.strip() == "?" else float(v) for v in p.split(",")] for p in parts])
            except ValueError:
                raise DataError(
                    f"{path}:{lineno}: cannot parse values (time-stamped .ts series are not supported)"
                ) from None
    if not in_data:
        raise DataError(f"{path}: no @data section")
    if header.get("timestamps", "false").lower() == "true":
        raise DataError(f"{path}: time-stamped .ts series are not supported")
    if not rows:
        raise DataError(f"{path}: no cases after @data")
    shapes = {(len(r), len(r[0])) for r in rows} | {(len(r), len(d)) for r in rows for d in r}
    if len(shapes) != 1:
        raise DataError(f"{path}: series of unequal length or dimension count are not supported")
    x = np.asarray(rows, dtype=np.float32)
    if "dimensions" in header and int(header["dimensions"]) != x.shape[1]:
        raise DataError(f"{path}: header says {header['dimensions']} dimensions, data has {x.shape[1]}")
    header["class_labels"] = header.get("classlabel", "").split()[1:]
    return x, np.asarray(labels), header


def find_basic_motions() -> Path | None:
    """The folder holding ``BasicMotions_TRAIN.ts``: ``$EDGEWISE_BASICMOTIONS_DIR``, else inside aeon or sktime."""
    candidates: list[Path] = []
    if os.environ.get(BASIC_MOTIONS_ENV):
        candidates.append(Path(os.environ[BASIC_MOTIONS_ENV]))
    for pkg in ("aeon", "sktime"):
        try:
            spec = importlib.util.find_spec(pkg)  # locates the package without importing it
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(loc) / "datasets" / "data" / "BasicMotions")
    for d in candidates:
        if (d / "BasicMotions_TRAIN.ts").is_file() and (d / "BasicMotions_TEST.ts").is_file():
            return d
    return None


def load_basic_motions(path: str | Path | None = None) -> DataSplit:
    """BasicMotions as ``(n, 6, 100)`` float32 (3-axis accelerometer, 3-axis gyroscope at 10 Hz), 4 classes.

    Reads the ``.ts`` files from ``path``, ``$EDGEWISE_BASICMOTIONS_DIR``, or an installed
    ``aeon``/``sktime`` package (never downloads). Raises :class:`DatasetNotAvailableError`
    saying how to get them otherwise. Values are left as recorded: the model normalises.
    """
    folder = Path(path) if path is not None else find_basic_motions()
    if folder is None or not (folder / "BasicMotions_TRAIN.ts").is_file():
        where = f" in {folder}" if folder is not None else ""
        raise DatasetNotAvailableError(
            f"BasicMotions .ts files not found{where}. They ship inside the aeon package: "
            f"`pip install aeon` (or sktime), or set {BASIC_MOTIONS_ENV} to a folder holding "
            "BasicMotions_TRAIN.ts and BasicMotions_TEST.ts"
        )
    x_tr, l_tr, header = parse_ts(folder / "BasicMotions_TRAIN.ts")
    x_te, l_te, _ = parse_ts(folder / "BasicMotions_TEST.ts")
    classes = list(header["class_labels"]) or sorted(set(l_tr) | set(l_te))
    index = {c: i for i, c in enumerate(classes)}
    unknown = (set(l_tr) | set(l_te)) - set(index)
    if unknown:
        raise DataError(f"labels {sorted(unknown)} are not among the declared classes {classes}")
    return DataSplit(
        x_tr, np.array([index[c] for c in l_tr]), x_te, np.array([index[c] for c in l_te]),
        name="basicmotions", classes=tuple(classes), meta={"source": str(folder)},
    )
