"""Fit the statistics a preprocessing spec needs from training data, in the lab, and freeze them in.

``fit_spec(spec, x_train)`` walks the steps in order: each step that still lacks its statistics
(``standardize`` without mean/std, ``minmax`` without bounds, ``impute`` by median or last value
without fill values, ``clip`` with quantiles but no bounds) is fitted on the training data *as it
arrives at that step* (after the steps before it), exactly as it will see data on the device.
Statistics already in the spec are kept. numpy only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .preprocessing import PreprocessingError, PreprocessingSpec
from .steps import Tally


def fit_spec(spec: PreprocessingSpec | Mapping[str, Any], x: np.ndarray, *, refit: bool = False) -> PreprocessingSpec:
    """A copy of ``spec`` with every missing statistic fitted on training data ``x`` (samples on axis 0).

    ``refit=True`` recomputes statistics already present too. Raises ``PreprocessingError`` when the
    training data itself does not pass a step (naming the step and problem).
    """
    if not isinstance(spec, PreprocessingSpec):
        spec = PreprocessingSpec.model_validate(spec)
    x = np.asarray(x)
    if x.size == 0:
        raise PreprocessingError(f"fit: the training data is empty (shape {list(x.shape)})")
    steps = []
    cur = x
    for i, step in enumerate(spec.steps):
        if refit or not step.fitted:
            step = step.fit(cur, spec.features)
        try:
            cur = PreprocessingSpec(steps=[step], features=spec.features, require_finite=False).apply(cur)
        except PreprocessingError as exc:
            raise PreprocessingError(f"fit: training data fails step {i} ({step.op}): {exc}") from None
        steps.append(step)
    return spec.model_copy(update={"steps": steps})


def load_training_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """The training inputs in an ``.npz``: ``key`` if given, else ``x_train``, ``x``, or its only array."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PreprocessingError(f"cannot read training data {path}: {exc}") from None
    with npz:
        names = list(npz.files)
        for k in ([key] if key else ["x_train", "x"]):
            if k in names:
                return npz[k]
        if key is None and len(names) == 1:
            return npz[names[0]]
    want = f"an array named {key!r}" if key else "an array named 'x_train' or 'x' (or exactly one array)"
    raise PreprocessingError(f"{path} holds {names}; it needs {want}")


def fit_report(spec: PreprocessingSpec, x: np.ndarray) -> dict[str, int]:
    """Repairs the fitted spec makes on the training data itself (a quick sanity figure for the lab)."""
    tally = Tally(spec.features)
    spec._run(np.asarray(x), tally)
    return tally.counts
