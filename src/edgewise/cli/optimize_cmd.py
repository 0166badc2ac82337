"""`edgewise optimize MODEL.onnx --calibration C.npz --eval E.npz --target PROFILE --out DIR`

Exit codes: 0 a variant meets the budget; 1 bad input (model, data, profile, metric);
3 the target is out of reach for ONNX Runtime (microcontroller class); 4 no variant
meets the budget (the report is still written, and names the closest variant).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import fail, print_json

EXIT_OUT_OF_REACH = 3
EXIT_BUDGET = 4


def optimize(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="Trained FP32 ONNX model."),
    calibration: Path = typer.Option(..., "--calibration", "-c", exists=True, dir_okay=False,
                                     help="Calibration .npz: arrays keyed by input name (or x)."),
    eval_data: Path = typer.Option(..., "--eval", "-e", exists=True, dir_okay=False,
                                   help="Eval .npz: inputs keyed by input name (or x), labels y if any."),
    target: str = typer.Option(..., "--target", "-t",
                               help="Device profile: built-in (rpi4, rpi5, jetson-orin-nano, x86-gateway, mcu-cortex-m7) or a YAML file."),
    max_accuracy_drop: float = typer.Option(0.01, "--max-accuracy-drop",
                                            help="Largest allowed drop vs FP32 in the metric's units (accuracy: fraction, 0.01 = 1 point)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: variants, report.json, report.md, pareto.png."),
    metric: str | None = typer.Option(None, "--metric",
                                      help="accuracy | top1_agreement | cosine | max_abs_err (default: chosen from the model and labels)."),
    measure_here: bool | None = typer.Option(None, "--measure-here/--no-measure-here",
                                             help="Declare this machine the target (or not) (default: decided from the profile)."),
    recipe: list[str] | None = typer.Option(None, "--recipe", "-r", help="Only these recipes (repeatable); FP32 is always included."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
) -> None:
    """Build quantized/converted variants, measure them, and keep the fastest within the accuracy budget."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from ..lab.optimize import OptimizeError, TargetOutOfReachError
    from ..lab.optimize import optimize as run_optimize

    err = Console(stderr=True)
    with Progress(
        TextColumn("[bold]optimize[/bold]"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total)

        try:
            result = run_optimize(
                model, calibration, eval_data, Path(target) if target.endswith((".yaml", ".yml")) or "/" in target else target,
                max_accuracy_drop=max_accuracy_drop, out_dir=out, metric=metric, measure_here=measure_here,
                recipes=recipe or None, progress=progress,
            )
        except TargetOutOfReachError as exc:
            if as_json:
                print_json({"ok": False, "error": str(exc), "kind": "TargetOutOfReachError"})
            fail(str(exc), code=EXIT_OUT_OF_REACH)
        except OptimizeError as exc:
            if as_json:
                print_json({"ok": False, "error": str(exc), "kind": type(exc).__name__})
            fail(str(exc))
    if as_json:
        print_json(result.to_json())
    else:
        _print_table(result)
    if not result.ok:
        fail(result.reason + f" (report: {out / 'report.md'})", code=EXIT_BUDGET)


def _print_table(result) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    from ..lab.optimize.report import rows

    pb = result.profile.batch_size
    proxy = "" if result.measured_on_target else " [yellow](PROXY figures)[/yellow]"
    t = Table(title=f"edgewise optimize → {result.profile.name}{proxy}", title_justify="left")
    for col, justify in (("variant", "left"), ("size", "right"), ("b1 median ms", "right"), ("b1 p95 ms", "right"),
                         (f"b{pb} median ms", "right"), ("peak RSS MB", "right"), (result.metric["name"], "right"),
                         ("drop", "right"), ("runtime", "left"), ("status", "left")):
        t.add_column(col, justify=justify, no_wrap=col != "status")  # type: ignore[arg-type]
    for r in rows(result):
        style = "bold green" if r["mark"] == "✓ chosen" else ("yellow" if r["mark"] == "closest" else None)
        t.add_row(r["variant"] + (" ✓" if r["mark"] == "✓ chosen" else ""), r["size"], r["b1_median"], r["b1_p95"],
                  r[f"b{pb}_median"], r["peak_mb"], r["metric"], r["drop"], r["runtime"], r["status"], style=style)
    t.caption = result.measurement["statement"]
    out = Console()
    if not out.is_terminal:  # piped into a file or CI log: do not squeeze the table into 80 columns
        out = Console(width=max(out.width, 150))
    out.print(t)
    out.print(f"[bold]{'chosen' if result.ok else 'no variant meets the budget'}:[/bold] {result.reason}")
    if result.chosen is not None:
        out.print(f"model: {result.chosen.path}   runtime: {result.chosen.runtime.to_runtime() if result.chosen.runtime else '-'}")
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")
    out.print(f"report: {result.files.get('report_md')}  ·  plot: {result.files.get('pareto_png')}  ·  {result.elapsed_s:.1f} s")
