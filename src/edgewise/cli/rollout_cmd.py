"""`edgewise rollout`: start a staged rollout from a spec file, watch it, pause/resume/abort/approve it.

Calls the control plane's API (``/api/v1/rollouts``, docs/fleet-rollouts.md) with an API token:
``--api-token`` or ``$EDGEWISE_API_TOKEN`` (operator to change, viewer to read). Every command
prints a table, or with ``--json`` the API's JSON for scripts. ``status --wait`` blocks until the
rollout finishes and exits 0 when it completed, 3 when it halted, 4 when it was aborted, 5 on timeout,
so a CI job can gate on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from ._util import API_TOKEN_ENV, api_call, api_token, fail, print_json

FINAL = ("completed", "halted", "aborted")
EXIT_FOR = {"completed": 0, "halted": 3, "aborted": 4}
EXIT_TIMEOUT = 5
SHOWN_FIGURES = ("reporting", "updated", "failed_fraction", "error_rate", "p95_ratio", "crashes", "shadow_agreement")

app = typer.Typer(help="Staged rollouts gated on model health (docs/fleet-rollouts.md).", no_args_is_help=True)

ServerOpt = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL.", envvar="EDGEWISE_SERVER")
TokenOpt = typer.Option(None, "--api-token", help=f"API token (default: ${API_TOKEN_ENV}).")
JsonOpt = typer.Option(False, "--json", help="Print the API's JSON instead of a table.")


def _token(given: str | None) -> str:
    return api_token(given)


def _call(method: str, server: str, path: str, token: str, body: Any = None) -> Any:
    return api_call(method, server, "/api/v1/rollouts" + path, token, body)


def load_spec(path: str) -> dict[str, Any]:
    """A rollout spec from a YAML or JSON file ("-": standard input)."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read the spec {path}: {exc}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"the spec {path} is not valid YAML/JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"the spec {path} must be a mapping with model, version, a target (group, tag or devices) and waves")
    return data


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def show(r: dict[str, Any]) -> None:
    """The rollout as tables: header, waves × cohorts with progress and figures, last decisions."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    target = r["target"]
    console.print(f"[bold]rollout {r['id']}[/bold]  {r['model']} {r['version']} → {target['kind']} {target['value']}  "
                  f"[bold]{r['state']}[/bold]  {r.get('reason') or ''}")
    console.print(f"devices {r['devices']}, running the candidate {r['updated']}, returned {r['reverted']}"
                  + (f"; halted on {', '.join(r['halted_cohorts'])}" if r.get("halted_cohorts") else ""))
    t = Table("wave", "cohort", "phase", "devices", "started", "updated", *SHOWN_FIGURES, "note")
    for w in r.get("waves", []):
        for c in w["cohorts"]:
            f = c.get("figures") or {}
            t.add_row(w["name"], c["cohort"], c["phase"], str(c["devices"]), str(c["started"]), str(c["updated"]),
                      *(_fmt(f.get(k)) for k in SHOWN_FIGURES), c.get("note") or "")
    console.print(t)
    decisions = r.get("decisions") or []
    if decisions:
        d = Table("at", "wave", "cohort", "decision", "reason")
        for x in decisions[-12:]:
            d.add_row(x["at"][11:19], x.get("wave_name") or "", x.get("cohort") or "", x["decision"], x["reason"])
        console.print(d)


def _list(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "model", "version", "target", "state", "devices", "updated", "halted on", "reason")
    for r in rows:
        t.add_row(str(r["id"]), r["model"], r["version"], f"{r['target']['kind']} {r['target']['value']}", r["state"],
                  str(r["devices"]), str(r["updated"]), ", ".join(r["halted_cohorts"]), r.get("reason") or "")
    Console().print(t)


def _wait(server: str, token: str, rollout_id: int, timeout: float, as_json: bool) -> None:
    deadline = time.monotonic() + timeout
    last_state = None
    while True:
        r = _call("GET", server, f"/{rollout_id}", token)
        if r["state"] != last_state and not as_json:
            typer.echo(f"rollout {rollout_id}: {r['state']} {r.get('reason') or ''}".rstrip(), err=True)
            last_state = r["state"]
        if r["state"] in FINAL or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    print_json(r) if as_json else show(r)
    if r["state"] not in FINAL:
        typer.secho(f"error: rollout {rollout_id} still {r['state']} after {timeout:g} s", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_TIMEOUT)
    raise typer.Exit(EXIT_FOR[r["state"]])


@app.command("start")
def start(
    spec_file: str = typer.Argument(..., metavar="SPEC", help="Rollout spec, YAML or JSON ('-': stdin)."),
    server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt,
    paused: bool = typer.Option(False, "--paused", help="Create it paused (start_paused: true)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until it completes, halts or is aborted (exit 0/3/4)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds (exit 5)."),
) -> None:
    """Create a staged rollout from SPEC (see docs/fleet-rollouts.md for a copy-paste example)."""
    token = _token(api_token)
    body = load_spec(spec_file)
    if paused:
        body["start_paused"] = True
    r = _call("POST", server, "", token, body)
    if wait:
        _wait(server, token, r["id"], timeout, as_json)
    print_json(r) if as_json else show(r)


@app.command("status")
def status(
    rollout_id: int | None = typer.Argument(None, help="Rollout id; none: list the recent rollouts."),
    server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt,
    devices: bool = typer.Option(False, "--devices", help="Include every device's wave, cohort and status (JSON)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until it completes, halts or is aborted (exit 0/3/4)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds (exit 5)."),
    state: str | None = typer.Option(None, "--state", help="When listing: only rollouts in this state."),
) -> None:
    """Show one rollout (waves, cohorts, gate figures, decisions), or list them."""
    token = _token(api_token)
    if rollout_id is None:
        rows = _call("GET", server, "" + (f"?state={state}" if state else ""), token)
        print_json(rows) if as_json else _list(rows)
        return
    if wait:
        _wait(server, token, rollout_id, timeout, as_json)
    r = _call("GET", server, f"/{rollout_id}" + ("?devices=true" if devices else ""), token)
    print_json(r) if as_json else show(r)


def _action(name: str, rollout_id: int, server: str, api_token: str | None, as_json: bool, body: Any = None) -> None:
    r = _call("POST", server, f"/{rollout_id}/{name}", _token(api_token), body)
    print_json(r) if as_json else show(r)


@app.command("pause")
def pause(rollout_id: int, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Hold the rollout: no device starts and no gate is evaluated until resume."""
    _action("pause", rollout_id, server, api_token, as_json)


@app.command("resume")
def resume(rollout_id: int, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Continue a paused rollout (or start one created paused)."""
    _action("resume", rollout_id, server, api_token, as_json)


@app.command("approve")
def approve(rollout_id: int, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt,
            wave: int | None = typer.Option(None, "--wave", help="Approve only this wave (0-based index).")) -> None:
    """Let the cohorts waiting for approval go on to their next wave."""
    _action("approve", rollout_id, server, api_token, as_json, {"wave": wave} if wave is not None else None)


@app.command("abort")
def abort(rollout_id: int, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt,
          rollback: bool = typer.Option(False, "--rollback", help="Also return updated devices to their previous version.")) -> None:
    """Stop the rollout for good (shadows end; with --rollback updated devices go back)."""
    _action("abort", rollout_id, server, api_token, as_json, {"rollback": rollback})


__all__ = ["app", "load_spec", "show"]
