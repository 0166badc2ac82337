"""`edgewise fl`: start a federated job from a JOB.toml, watch it, stop it (docs/learn.md).

Calls the control plane's API (``/api/v1/fl/jobs``) with an API token: ``--api-token`` or ``$EDGEWISE_API_TOKEN``.
``status --wait`` blocks until the job finishes and exits 0 when it completed, 3 when it was stopped (budget spent
or by an operator), 4 when it failed, 5 on timeout.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import typer

from ._util import api_call, fail, print_json

EXIT_FOR = {"completed": 0, "stopped": 3, "failed": 4}
EXIT_TIMEOUT = 5

app = typer.Typer(help="Federated learning over the fleet (docs/learn.md).", no_args_is_help=True)

ServerOpt = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL.", envvar="EDGEWISE_SERVER")
TokenOpt = typer.Option(None, "--api-token", help="API token (default: $EDGEWISE_API_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print the API's JSON instead of a table.")


def _call(method: str, server: str, path: str, token: str | None, body: Any = None) -> Any:
    return api_call(method, server, "/api/v1/fl/jobs" + path, token, body, timeout=120.0)


def _show(job: dict[str, Any]) -> None:
    eps = f", ε={job['epsilon']:.3f} of {job['epsilon_budget']}" if job.get("epsilon") is not None else ""
    typer.echo(f"{job['id']} {job['state']}: {job['model']} {job['base_version']} -> {job.get('result_version') or '-'}"
               f" (accuracy {job.get('base_accuracy') or 0:.3f} -> {job.get('accuracy') or 0:.3f}{eps}) {job.get('reason', '')}")
    for r in job.get("rounds", []):
        eps_r = f" ε={r['epsilon']:.3f}" if r.get("epsilon") is not None else ""
        acc = f" acc={r['accuracy']:.3f}" if r.get("accuracy") is not None else ""
        typer.echo(f"  round {r['number']:>3} {r['state']:<8} cohort={len(r['cohort'])} used={r['used']} late={r['late']} "
                   f"rejected={r['rejected']}{acc}{eps_r}")


@app.command("start")
def start(job_file: Path = typer.Argument(..., help="JOB.toml (docs/learn.md, 'Job file')."),
          server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Start a federated job; prints its id."""
    try:
        spec = tomllib.loads(job_file.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {job_file}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        fail(f"{job_file} is not valid TOML: {exc}")
    job = _call("POST", server, "", api_token, spec.get("job", spec))
    print_json(job) if as_json else _show(job)


@app.command("status")
def status(job_id: str, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt,
           wait: bool = typer.Option(False, "--wait", help="Block until the job finishes."),
           timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds.")) -> None:
    """Show a job with its rounds (participants, rejected updates, accuracy, ε)."""
    token = api_token
    deadline = time.monotonic() + timeout
    job = _call("GET", server, f"/{job_id}", token)
    while wait and job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(2.0)
        job = _call("GET", server, f"/{job_id}", token)
    print_json(job) if as_json else _show(job)
    if wait:
        raise typer.Exit(EXIT_FOR.get(job["state"], EXIT_TIMEOUT))


@app.command("list")
def list_jobs(server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    jobs = _call("GET", server, "", api_token)
    if as_json:
        print_json(jobs)
    for j in [] if as_json else jobs:
        _show(j)


@app.command("stop")
def stop(job_id: str, server: str = ServerOpt, api_token: str | None = TokenOpt) -> None:
    """Stop a job now (it registers no version)."""
    _show(_call("POST", server, f"/{job_id}/stop", api_token, {}))
