"""`edgewise release PIPELINE.yaml`: a trained model to the fleet, unattended (optimize → gates → bundle → publish → rollout).

Exit codes (one per way a release fails, so a CI job can tell them apart):

====  ==========================================================================
0     done (up to ``--until``; the rollout completed)
1     invalid pipeline or input (the message names the field or file)
3     a release gate failed (accuracy, latency, size, golden inputs): nothing was published
4     an upload to the registry failed (refused, or the control plane unreachable)
5     the rollout halted (an error condition held: devices went back) or was aborted
6     timeout: the rollout did not finish within ``timeouts.rollout_s`` / ``--timeout``
7     the rollout could not be started (refused by the control plane)
====  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._util import fail, print_json

EXIT_INVALID = 1
EXIT_GATE = 3
EXIT_PUBLISH = 4
EXIT_ROLLOUT = 5
EXIT_TIMEOUT = 6
EXIT_ROLLOUT_START = 7


def release(
    pipeline: Path = typer.Argument(..., help="PIPELINE.yaml (see docs/release-pipeline.md)."),
    server: str | None = typer.Option(None, "--server", help="Control plane URL (default: control.server, else $EDGEWISE_SERVER)."),
    token: str | None = typer.Option(None, "--token", help="Operator API token (default: $EDGEWISE_TOKEN, else $EDGEWISE_API_TOKEN)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Work folder: variants, reports, bundles, release.json (default: ./release-NAME-VERSION)."),
    until: str = typer.Option("rollout", "--until", help="Stop after this stage: optimize | gates | bundle | publish | rollout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Optimize, gate and sign, then stop before publishing (= --until bundle)."),
    version: str | None = typer.Option(None, "--version", help="Override bundle.version (e.g. from the CI tag)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Override timeouts.rollout_s: the longest wait for the rollout, seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (release.json) to stdout as JSON."),
) -> None:
    """Run the release pipeline; exit 3 gate, 4 upload, 5 rollout halted/aborted, 6 timeout, 7 rollout refused."""
    import os

    from rich.console import Console

    from ..lab import pipeline as pl

    err = Console(stderr=True)
    if not err.is_terminal:  # a CI log: one line per event, not wrapped at 80 columns
        err = Console(stderr=True, width=max(err.width, 200))
    try:
        spec = pl.load_spec(pipeline)
        if version is not None:
            try:
                spec.bundle = pl.BundleSpec.model_validate({**spec.bundle.model_dump(), "version": version})
            except pl.ValidationError as exc:
                raise pl.PipelineSpecError(f"--version: {pl.explain_validation(exc)}") from None
        if timeout is not None:
            spec.timeouts.rollout_s = timeout
    except pl.PipelineError as exc:
        _finish_error(as_json, str(exc), "invalid", EXIT_INVALID)
    if dry_run:
        if until not in ("rollout", "bundle", "gates", "optimize"):
            fail("--dry-run stops before publishing; it cannot be combined with --until publish", code=EXIT_INVALID)
        until = "bundle" if until == "rollout" else until
    if until not in pl.STAGES:
        fail(f"--until {until!r}: choose one of {', '.join(pl.STAGES)}", code=EXIT_INVALID)
    out_dir = out or Path(f"release-{pl.safe_dir_name(spec.model.name)}-{pl.safe_dir_name(spec.bundle.version)}")
    url = server or spec.control.server or os.environ.get(pl.SERVER_ENV)
    needs_control = pl.STAGES.index(until) >= pl.STAGES.index("publish") or spec.hardware.from_group is not None
    client = None
    if needs_control:
        if not url:
            fail("this run talks to the control plane: set control.server in the pipeline, --server or $EDGEWISE_SERVER", code=EXIT_INVALID)
        tok = pl.resolve_token(token)
        if not tok:
            fail("this run needs an operator API token: --token, $EDGEWISE_TOKEN or $EDGEWISE_API_TOKEN", code=EXIT_INVALID)
        verify = spec.control.verify_tls
        client = pl.ControlClient(url, tok, timeout=spec.timeouts.http_s,
                                  verify=str(spec.path(Path(verify))) if isinstance(verify, str) else verify)

    result = pl.PipelineResult(spec.model.name, spec.bundle.version, out_dir, until)
    code = 0
    try:
        with _Display(err, enabled=True) as show:
            try:
                pl.run_pipeline(spec, out_dir=out_dir, client=client, until=until, progress=show.progress,
                                on_rollout=show.rollout, result=result)
            except pl.GateFailedError:
                code = EXIT_GATE
            except pl.PublishError:
                code = EXIT_PUBLISH
            except pl.RolloutStartError:
                code = EXIT_ROLLOUT_START
            except pl.RolloutFailedError:
                code = EXIT_ROLLOUT
            except pl.RolloutTimeoutError:
                code = EXIT_TIMEOUT
            except pl.PipelineError as exc:
                result.outcome, result.error = "error", result.error or str(exc)
                code = EXIT_INVALID
            except OSError as exc:  # an unwritable --out, a full disk: say which file
                result.outcome, result.error = "error", f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
                code = EXIT_INVALID
    finally:
        if client is not None:
            client.close()
    summary = result.to_json()
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)
    if code:
        fail(result.error or result.outcome, code=code)


def _finish_error(as_json: bool, message: str, outcome: str, code: int) -> None:
    if as_json:
        print_json({"format": "edgewise-release/1", "outcome": outcome, "error": message})
    fail(message, code=code)


class _Display:
    """Live progress on stderr: the current stage's last message, then the rollout's state and latest decision."""

    def __init__(self, console: Any, enabled: bool = True) -> None:
        self.console = console
        self.status = None
        self.enabled = enabled
        self._last: tuple[Any, int] | None = None

    def __enter__(self) -> "_Display":
        if self.enabled and self.console.is_terminal:
            self.status = self.console.status("release: starting")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def progress(self, stage: str, message: str) -> None:
        line = f"[bold]{stage}[/bold] {message}"
        if self.status is not None:
            self.status.update(line)
        # optimize reports every build/score/timing step: those only animate the spinner; the log keeps one line a class
        if stage != "optimize" or "reports written" in message:
            self.console.print(line, highlight=False)

    def rollout(self, r: dict[str, Any]) -> None:
        from ..lab.pipeline import describe_decision, describe_progress

        if self.status is not None:
            self.status.update(f"[bold]rollout[/bold] {r.get('id')} {r.get('state')}: {describe_progress(r)}")
        key = (r.get("state"), len(r.get("decisions") or []))
        if key != self._last:  # a CI log gets one line per state change or new decision, not one per poll
            self._last = key
            self.console.print(f"[bold]rollout[/bold] {r.get('id')} {r.get('state')} ({describe_progress(r)}): "
                               f"{describe_decision(r)}", highlight=False)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 150))
    t = Table(title=f"edgewise release {s['model']} {s['version']} → {s['outcome']}", title_justify="left")
    for col in ("hardware class", "variant", "recipe", "accuracy", "latency p95 ms", "gates", "bundle", "published"):
        t.add_column(col, no_wrap=col != "gates")
    for tg in s["targets"]:
        gates = ", ".join(
            f"{g['gate']} {'ok' if g['passed'] else ('FAILED' if g['enforced'] else 'warn')}" for g in tg["gates"]
        ) or "-"
        lat = (tg.get("latency_ms") or {}).get("p95_ms")
        acc = tg.get("accuracy")
        t.add_row(
            tg["hardware_class"], tg.get("variant") or "-", tg.get("recipe") or "-",
            f"{acc:.4f}" if isinstance(acc, float) else "-", f"{lat:.3f}" if isinstance(lat, float) else "-",
            gates, Path(tg["bundle"]).name if tg.get("bundle") else "-",
            (tg.get("published") or {}).get("status", "-"),
        )
    out.print(t)
    ro = s.get("rollout")
    if ro:
        from ..lab.pipeline import describe_decision, describe_progress

        out.print(f"rollout {ro.get('id')}: {ro.get('state')} ({describe_progress(ro)}) — {describe_decision(ro)}")
    if s.get("error"):
        out.print(f"[red]{s['error']}[/red]")
    out.print(f"summary: {Path(s['out_dir']) / 'release.json'}  ·  {s['elapsed_s']:.1f} s")
