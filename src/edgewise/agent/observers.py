"""What watches the predictions an agent serves: one tiny protocol for drift detection, sample capture and the like.

An observer is called after every successful prediction with the model that
served it, the feed ONNX Runtime got (validated and preprocessed, keyed by input
name) and the outputs. It must be cheap (microseconds: it runs on the serving
path) and must not keep references to the arrays beyond what it needs. An
exception it raises is logged and swallowed: watching the data never fails a
prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

import numpy as np

if TYPE_CHECKING:
    from .runtime import LoadedModel


class PredictionObserver(Protocol):
    def observe(self, model: "LoadedModel", feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None: ...
