"""A small, real classifier trained in about a second on data that ships with scikit-learn.

scikit-learn's bundled ``digits`` set (1,797 8x8 images of handwritten digits,
UCI ML hand-written digits, in ``sklearn/datasets/data``): no download, no torch.
Version 1.0.0 is a logistic regression, 1.1.0 a small MLP retrained on the same
split, both exported to ONNX with skl2onnx. Scaling (pixels 0..16 -> 0..1) is a
preprocessing step carried in the bundle, not baked into the graph, so the
device runs the same code the lab trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.preprocessing import Cast, PreprocessingSpec, Scale

PREPROCESSING = PreprocessingSpec(steps=[Cast(dtype="float32"), Scale(offset=0.0, factor=1.0 / 16.0)])
LABELS = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DemoData:
    x_train: np.ndarray  # raw pixels, float32, shape (n, 64)
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_size: float = 0.3) -> DemoData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=test_size, random_state=seed, stratify=y
    )
    return DemoData(x_tr, y_tr, x_te, y_te)


def train_digits_onnx(kind: str = "logreg", data: DemoData | None = None, seed: int = 0) -> bytes:
    """Train ``kind`` ("logreg" or "mlp") on scaled digits; return the ONNX model bytes.

    The ONNX graph takes scaled float32 input ``x`` of shape (N, 64) and returns
    ``label`` (N,) and ``probabilities`` (N, 10).
    """
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    data = data or load_digits_split(seed)
    x = PREPROCESSING.apply(data.x_train)
    if kind == "logreg":
        clf = LogisticRegression(max_iter=500)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    else:
        raise ValueError(f"unknown demo model kind {kind!r}; use 'logreg' or 'mlp'")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, data.y_train)
    onx = to_onnx(
        clf,
        x[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
        final_types=None,
    )
    # Name the input "x" so the agent's API and the docs agree.
    onx.graph.input[0].name, old = "x", onx.graph.input[0].name
    for node in onx.graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = "x"
    return onx.SerializeToString()
