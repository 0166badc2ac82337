"""`edgewise dann`: domain-adversarial training of the lab's digits CNN on labelled source + unlabeled target data.

The source is an ``.npz`` with ``x_train, y_train, x_test, y_test`` (or the built-in digits when omitted);
the target an ``.npz`` of unlabeled inputs (``--target-key``, default ``x``), e.g. samples the devices
captured, preprocessed like the source. Writes an ONNX model with BatchNorm kept (the device can still
run AdaBN on it). For another architecture call ``edgewise.lab.dann`` from Python with your own
feature extractor and classifier. torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import fail, print_json


def dann(
    target: Path = typer.Option(..., "--target", help=".npz of unlabeled target-domain inputs, shaped like the source's."),
    out: Path = typer.Option(..., "--out", help="Where to write the trained ONNX model."),
    source: Path = typer.Option(None, "--source", help=".npz with x_train, y_train, x_test, y_test; default: scikit-learn digits (8x8 images, 0..1)."),
    target_key: str = typer.Option("x", "--target-key", help="Array of the target .npz to use."),
    width: float = typer.Option(0.5, "--width", help="Channel multiplier of the DigitsCNN."),
    epochs: int = typer.Option(15, "--epochs"),
    lr: float = typer.Option(3e-3, "--lr"),
    lambda_max: float = typer.Option(1.0, "--lambda-max", help="Final weight of the reversed domain gradient (0: no adversary)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a digits CNN with DANN (gradient reversal) so it works on the target domain without its labels."""
    import numpy as np

    from ..lab.dann import DANN, export_keep_batchnorm, train_dann
    from ..lab.datasets import DataError, load_digits_images, load_npz

    try:
        data = load_npz(source) if source is not None else load_digits_images(size=8)
    except DataError as exc:
        fail(str(exc))
    try:
        with np.load(target, allow_pickle=False) as npz:
            if target_key not in npz.files:
                fail(f"{target} has no array {target_key!r}; it holds {', '.join(npz.files) or 'nothing'} (pick one with --target-key)")
            tx = npz[target_key].astype(np.float32)
    except (OSError, ValueError) as exc:
        fail(f"{target}: not a readable .npz file ({exc})")
    shape = data.x_train.shape[1:]
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2] or shape[1] % 8:
        fail(f"source samples have shape {list(shape)}; `edgewise dann` trains the digits CNN on (1, S, S) images with S a "
             "multiple of 8. For other models use edgewise.lab.dann.DANN from Python")
    model = DANN.from_digits_cnn(width=width, size=shape[1], num_classes=int(max(data.y_train.max(), data.y_test.max())) + 1)
    try:
        result = train_dann(model, data, tx, epochs=epochs, lr=lr, lambda_max=lambda_max, seed=seed,
                            progress=None if as_json else typer.echo)
    except ValueError as exc:
        fail(str(exc))
    export_keep_batchnorm(model, data.x_test[:2], out)
    summary = {**result.to_json(), "out": str(out)}
    summary.pop("history")
    if as_json:
        print_json(summary)
    else:
        typer.echo(f"wrote {out}: source test accuracy {result.test_accuracy:.3f}, final domain accuracy {result.domain_accuracy:.3f}")
