"""Helpers for the adaptation tests (no tests here): a tiny digits CNN with BatchNorm, shifts, bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHIFTS = {
    # raw digit pixels are 0..16; each shift is what a sensor might do to them
    "gain": lambda x: x * 0.4,
    "contrast": lambda x: (x - 8.0) * 0.3 + 8.0,
    "offset": lambda x: x + 8.0,
}


def train_bn_cnn(seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """ONNX bytes of a DigitsCNN (width 0.5, BatchNorm kept) trained on 8x8 digits in ~2 s, and the raw (0..16) data."""
    import torch

    from edgewise.lab.dann import export_keep_batchnorm
    from edgewise.lab.datasets import load_digits_images
    from edgewise.lab.torch_models import DigitsCNN, train

    data = load_digits_images(size=8)
    torch.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = DigitsCNN(width=0.5, size=8)
            train(model, data, epochs=6, lr=5e-3, seed=seed)
            onnx_bytes = export_keep_batchnorm(model, data.x_test[:2])
        finally:
            torch.set_num_threads(threads)
    raw = {"x_train": (data.x_train * 16).astype(np.float32), "y_train": data.y_train,
           "x_test": (data.x_test * 16).astype(np.float32), "y_test": data.y_test}
    return onnx_bytes, raw


def bn_bundle(path: Path, onnx_bytes: bytes, raw: dict[str, np.ndarray], signer, version: str = "2.0.0", golden: int = 32) -> Path:
    from edgewise.bundle import build_bundle
    from edgewise.lab.demo_model import LABELS, PREPROCESSING

    build_bundle(onnx_bytes, name="digits-cnn", version=version, signer=signer, out=path, labels=LABELS,
                 preprocessing=PREPROCESSING, golden=({"x": raw["x_test"][:golden]},))
    return path
