"""`edgewise compress | prune | distill`: the torch side of the lab, on a built-in example or the user's model.

A command line cannot take torch code, so the model comes from one of:

* ``--model digits-cnn|digits-mlp|basicmotions-cnn``: a shipped example, trained on its own
  bundled data first (seconds), or loaded with ``--weights state_dict.pt``;
* ``--module pkg.module:factory --data file.npz``: ``factory()`` returns the user's
  ``nn.Module`` (trained, or give ``--weights`` / ``--train-epochs``); the ``.npz`` holds
  ``x_train, y_train, x_test, y_test`` in the model's input layout.

From Python, call ``edgewise.lab.compress.compress(model, data, ...)`` (and ``run_prune``,
``run_distill``) with any ``nn.Module`` directly. torch is imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._util import fail, print_json

_MODEL_HELP = "Built-in example: digits-cnn, digits-mlp or basicmotions-cnn (default: digits-cnn)."
_MODULE_HELP = "Your model: pkg.module:factory, a callable returning an nn.Module (needs --data)."
_DATA_HELP = ".npz with x_train, y_train, x_test, y_test (inputs in the model's layout, integer labels)."


def _lab_errors() -> tuple[type[BaseException], ...]:
    from ..lab.datasets import DatasetNotAvailableError, DataError
    from ..lab.export import ExportMismatchError

    return (DataError, DatasetNotAvailableError, ExportMismatchError, ValueError, TypeError, OSError)


def _fraction(value: float | None, option: str) -> None:
    if value is not None and not 0 < value < 1:
        fail(f"{option} must be between 0 and 1 (exclusive), got {value}")


def _resolve(model: str | None, module: str | None, data: Path | None, weights: Path | None,
             train_epochs: int | None, seed: int, say: Any, threads: int | None = None) -> Any:
    from ..lab.compress import resolve_model

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    if model is None and module is None:
        model = "digits-cnn"
    return resolve_model(model, module=module, data=data, weights=weights, train_epochs=train_epochs, seed=seed, progress=say)


def _progress() -> tuple[Any, Any]:
    from rich.console import Console

    err = Console(stderr=True)
    return err, (lambda msg: err.log(msg))


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        print_json(report.to_json())
        return
    from rich.console import Console
    from rich.table import Table

    base = report.stages[0]
    t = Table(title=f"edgewise {report.command}: {report.name}", title_justify="left")
    for col in ("stage", "params", "MACs", "ONNX size", "latency ms (b=1)", "accuracy", "Δ accuracy"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in report.stages:
        t.add_row(s.stage, f"{s.params:,}", f"{s.macs:,}", f"{s.size_bytes / 1024:.1f} KiB",
                  f"{s.latency_ms:.3f}" if s.latency_ms is not None else "-", f"{s.accuracy:.2%}",
                  "" if s is base else f"{(s.accuracy - base.accuracy) * 100:+.1f} pt")
    out = Console()
    out.print(t)
    for s in report.stages:
        if s.note:
            out.print(f"[bold]{s.stage}[/bold]: {s.note}")
    for n in report.notes:
        out.print(f"[yellow]note:[/yellow] {n}")
    out.print(f"final model {report.final_onnx} · report {report.out_dir / 'report.md'} · {report.seconds:.1f} s")


def compress(
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    module: str | None = typer.Option(None, "--module", help=_MODULE_HELP),
    data: Path | None = typer.Option(None, "--data", help=_DATA_HELP),
    weights: Path | None = typer.Option(None, "--weights", help="state_dict file (torch.save) to load into the model."),
    train_epochs: int | None = typer.Option(None, "--train-epochs", min=0, help="Train the model first [built-in: its schedule unless --weights]."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of channels to remove from each layer, 0 < r < 1."),
    target_macs: float | None = typer.Option(None, "--target-macs", help="Instead of --ratio: keep at most this fraction (<1) or count (>=1) of MACs."),
    steps: int = typer.Option(1, "--steps", min=1, help="Iterative pruning steps (fine-tuned in between)."),
    recover: str = typer.Option("distill", "--recover", help="distill (original teaches pruned), finetune, or none."),
    epochs: int | None = typer.Option(None, "--epochs", min=0, help="Epochs of recovery after pruning (default: half the model's training schedule)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of recovery."),
    temperature: float = typer.Option(4.0, "--temperature", help="Distillation temperature T."),
    alpha: float = typer.Option(0.7, "--alpha", help="Weight of the distillation term (1-alpha: cross-entropy)."),
    global_pruning: bool = typer.Option(False, "--global", help="Rank channels of all layers together."),
    skip_optimize: bool = typer.Option(False, "--skip-optimize", help="Stop after export (no ONNX Runtime optimization)."),
    profile: str | None = typer.Option(None, "--profile", help="Device profile for the optimize step (name or file)."),
    max_accuracy_drop: float = typer.Option(0.01, "--max-accuracy-drop", help="Optimize: largest accepted accuracy drop."),
    recipe: list[str] | None = typer.Option(None, "--recipe", help="Optimize: recipe to try (repeatable) (default: all)."),
    out_dir: Path | None = typer.Option(None, "--out-dir", "-o", help="Where ONNX files and report.json/.md go (default: NAME-compressed)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Training batch size (default: the model's)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for training (default: torch's choice)."),
    latency_runs: int = typer.Option(200, "--latency-runs", min=1, help="ONNX Runtime calls timed per stage."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prune -> distill/fine-tune -> export -> optimize; measure every stage (params, MACs, size, latency, accuracy)."""
    _fraction(ratio, "--ratio")
    if target_macs is not None and not target_macs > 0:
        fail(f"--target-macs must be > 0, got {target_macs}")
    if recover not in ("distill", "finetune", "none"):
        fail(f"--recover must be distill, finetune or none, got {recover!r}")
    from ..lab.compress import CompressError, compress as run

    _, say = _progress()
    try:
        resolved = _resolve(model, module, data, weights, train_epochs, seed, say, threads)
        report = run(
            resolved.model, resolved.data, out_dir=out_dir or Path(f"{resolved.name}-compressed"), name=resolved.name,
            ratio=ratio, target_macs=target_macs, steps=steps, recover=recover,
            epochs=resolved.recovery_epochs if epochs is None else epochs, lr=lr,
            batch_size=batch_size or resolved.config.batch_size,
            temperature=temperature, alpha=alpha, seed=seed, global_pruning=global_pruning,
            optimize=not skip_optimize, profile=profile, max_accuracy_drop=max_accuracy_drop, recipes=recipe or None,
            latency_runs=latency_runs, progress=say,
        )
    except (CompressError, *_lab_errors()) as exc:
        fail(str(exc))
    _print_report(report, as_json)


def prune(
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    module: str | None = typer.Option(None, "--module", help=_MODULE_HELP),
    data: Path | None = typer.Option(None, "--data", help=_DATA_HELP),
    weights: Path | None = typer.Option(None, "--weights", help="state_dict file (torch.save) to load into the model."),
    train_epochs: int | None = typer.Option(None, "--train-epochs", min=0, help="Train the model first [built-in: its schedule unless --weights]."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of channels to remove from each layer, 0 < r < 1."),
    target_macs: float | None = typer.Option(None, "--target-macs", help="Instead of --ratio: keep at most this fraction (<1) or count (>=1) of MACs."),
    steps: int = typer.Option(1, "--steps", min=1, help="Iterative pruning steps, each followed by fine-tuning."),
    epochs: int | None = typer.Option(None, "--epochs", min=0, help="Fine-tuning epochs after each step (default: half the model's training schedule)."),
    lr: float = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate."),
    importance: str = typer.Option("l2", "--importance", help="Channel ranking: l2 or l1 group magnitude."),
    global_pruning: bool = typer.Option(False, "--global", help="Rank channels of all layers together."),
    unstructured: float | None = typer.Option(None, "--unstructured", help="Also zero this fraction of weights (l1, unstructured) to compare."),
    out_dir: Path | None = typer.Option(None, "--out-dir", "-o", help="Where ONNX files and report.json/.md go (default: NAME-pruned)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Training batch size (default: the model's)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for training (default: torch's choice)."),
    latency_runs: int = typer.Option(200, "--latency-runs", min=1, help="ONNX Runtime calls timed per stage."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Remove whole channels (a smaller dense network), fine-tune, export to ONNX; compare with unstructured zeros."""
    _fraction(ratio, "--ratio")
    _fraction(unstructured, "--unstructured")
    if target_macs is not None and not target_macs > 0:
        fail(f"--target-macs must be > 0, got {target_macs}")
    if importance not in ("l1", "l2"):
        fail(f"--importance must be l1 or l2, got {importance!r}")
    from ..lab.compress import CompressError, run_prune

    _, say = _progress()
    try:
        resolved = _resolve(model, module, data, weights, train_epochs, seed, say, threads)
        report = run_prune(
            resolved.model, resolved.data, out_dir=out_dir or Path(f"{resolved.name}-pruned"), name=resolved.name,
            ratio=ratio, target_macs=target_macs, steps=steps, epochs=resolved.recovery_epochs if epochs is None else epochs,
            lr=lr, batch_size=batch_size or resolved.config.batch_size, seed=seed,
            global_pruning=global_pruning, importance=importance, unstructured=unstructured,
            latency_runs=latency_runs, progress=say,
        )
    except (CompressError, *_lab_errors()) as exc:
        fail(str(exc))
    _print_report(report, as_json)


def distill(
    model: str | None = typer.Option(None, "--model", "-m", help="Teacher: " + _MODEL_HELP),
    module: str | None = typer.Option(None, "--module", help="Teacher: " + _MODULE_HELP),
    data: Path | None = typer.Option(None, "--data", help=_DATA_HELP),
    weights: Path | None = typer.Option(None, "--weights", help="Teacher state_dict file (torch.save)."),
    train_epochs: int | None = typer.Option(None, "--train-epochs", min=0, help="Train the teacher first [built-in: its schedule unless --weights]."),
    student: str | None = typer.Option(None, "--student", help="Student: pkg.module:factory (default: the teacher's family at --student-width)."),
    student_width: float = typer.Option(0.5, "--student-width", help="Width multiplier of the default student (factory must take width=)."),
    temperature: float = typer.Option(4.0, "--temperature", help="Softening temperature T (> 0)."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the distillation term, 0..1 (1-alpha: cross-entropy)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Student training epochs, both runs (default: the model's schedule)."),
    lr: float | None = typer.Option(None, "--lr", help="Student learning rate (default: the model's)."),
    out_dir: Path | None = typer.Option(None, "--out-dir", "-o", help="Where ONNX files and report.json/.md go (default: NAME-distilled)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=2, help="Training batch size (default: the model's)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for training (default: torch's choice)."),
    latency_runs: int = typer.Option(200, "--latency-runs", min=1, help="ONNX Runtime calls timed per stage."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train a smaller student from the teacher (Hinton loss) and, for comparison, without it."""
    if not temperature > 0:
        fail(f"--temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        fail(f"--alpha must be between 0 and 1, got {alpha}")
    if not student_width > 0:
        fail(f"--student-width must be > 0, got {student_width}")
    import torch

    from ..lab.compress import CompressError, load_factory, run_distill
    from ..lab.torch_models import width_scaled

    _, say = _progress()
    try:
        resolved = _resolve(model, module, data, weights, train_epochs, seed, say, threads)
        torch.manual_seed(seed)
        if student is not None:
            net = load_factory(student)()
        elif resolved.factory is not None:
            net = width_scaled(resolved.factory, student_width)
        else:  # pragma: no cover - resolve_model always sets a factory
            fail("give --student pkg.module:factory")
        report = run_distill(
            resolved.model, net, resolved.data, out_dir=out_dir or Path(f"{resolved.name}-distilled"), name=resolved.name,
            temperature=temperature, alpha=alpha, epochs=epochs or resolved.config.epochs, lr=lr or resolved.config.lr,
            batch_size=batch_size or resolved.config.batch_size, seed=seed, latency_runs=latency_runs, progress=say,
        )
    except (CompressError, *_lab_errors()) as exc:
        fail(str(exc))
    _print_report(report, as_json)
