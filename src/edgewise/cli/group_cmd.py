"""`edgewise group`: saved device queries (groups) on the control plane, and per-device variant overrides.

Calls the control plane's API with an API token: ``--api-token`` or ``$EDGEWISE_API_TOKEN``
(operator to write, viewer to read). See docs/fleet-targeting.md.

    edgewise group create site-a-pis --tag-all site-a --where 'hardware.hardware_class in ["rpi4","rpi5"]' \\
        --where 'hardware.ram_mb >= 1024' --window 'sat,sun 22:00-04:00' --rate 30
    edgewise group devices site-a-pis
"""

from __future__ import annotations

import json
import re
from typing import Any

import typer

from ._util import API_TOKEN_ENV, api_call, fail, print_json

SERVER = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL.")
TOKEN = typer.Option(None, "--api-token", help=f"API token (default: ${API_TOKEN_ENV}).")
_WHERE = re.compile(r"^\s*([A-Za-z_.]+)\s*(==|!=|<=|>=|<|>|\bin\b|\bcontains\b)\s*(.+?)\s*$")
_WINDOW = re.compile(r"^\s*(?:([a-z,]+)\s+)?(\d{2}:\d{2})\s*-\s*(\d{2}:\d{2})\s*$")

app = typer.Typer(help="Groups: saved device queries with maintenance windows (docs/fleet-targeting.md).",
                  no_args_is_help=True)


def parse_where(text: str) -> dict[str, Any]:
    """``'hardware.ram_mb >= 1024'`` -> a query condition; the value is JSON when it parses, else a string.

    >>> parse_where('hardware.ram_mb >= 1024')
    {'field': 'hardware.ram_mb', 'op': '>=', 'value': 1024}
    >>> parse_where('hardware.isa contains avx2')
    {'field': 'hardware.isa', 'op': 'contains', 'value': 'avx2'}
    """
    m = _WHERE.match(text)
    if not m:
        raise ValueError(f"--where {text!r}: write FIELD OP VALUE, e.g. 'hardware.ram_mb >= 1024' "
                         "(ops: == != < <= > >= in contains)")
    field, op, raw = m.groups()
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw.strip("'\"")
    return {"field": field, "op": op, "value": value}


def parse_window(text: str) -> dict[str, Any]:
    """``'sat,sun 22:00-04:00'`` (UTC; days optional) -> a maintenance window.

    >>> parse_window('sat,sun 22:00-04:00')
    {'days': ['sat', 'sun'], 'start': '22:00', 'end': '04:00'}
    """
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"--window {text!r}: write [DAYS ]HH:MM-HH:MM in UTC, e.g. 'sat,sun 22:00-04:00' or '01:00-03:00'")
    days, start, end = m.groups()
    return {"days": [d for d in (days or "").split(",") if d], "start": start, "end": end}


def _call(method: str, server: str, path: str, token: str | None, body: Any = None) -> Any:
    return api_call(method, server, "/api/v1" + path, token, body)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Group name (1-64 letters, digits, . _ -)."),
    tag_all: list[str] = typer.Option([], "--tag-all", help="Devices must have this tag (repeatable)."),
    tag_any: list[str] = typer.Option([], "--tag-any", help="Devices must have at least one of these (repeatable)."),
    device: list[str] = typer.Option([], "--device", help="Only these device ids (repeatable)."),
    where: list[str] = typer.Option([], "--where", help="Condition FIELD OP VALUE, e.g. 'hardware.ram_mb >= 1024' (repeatable)."),
    window: list[str] = typer.Option([], "--window", help="Maintenance window '[DAYS ]HH:MM-HH:MM' in UTC (repeatable)."),
    rate: int | None = typer.Option(None, "--rate", help="Devices a rollout may start per minute."),
    description: str = typer.Option("", "--description"),
    replace: bool = typer.Option(False, "--replace", help="Replace the group if it exists (PUT)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored group as JSON."),
    server: str = SERVER,
    api_token: str | None = TOKEN,
) -> None:
    """Save a group (dynamic: evaluated whenever it is used)."""
    try:
        body = {"name": name, "description": description, "rate_limit_per_min": rate,
                "query": {"tags_all": tag_all, "tags_any": tag_any, "devices": device, "where": [parse_where(w) for w in where]},
                "maintenance": [parse_window(w) for w in window]}
    except ValueError as exc:
        fail(str(exc))
    out = _call("PUT", server, f"/groups/{name}", api_token, body) if replace else _call("POST", server, "/groups", api_token, body)
    if as_json:
        print_json(out)
    else:
        typer.echo(f"group {out['name']}: {out['devices']} devices match now"
                   + ("" if out["in_window"] else " (outside its maintenance windows now)"))


@app.command("list")
def list_groups(as_json: bool = typer.Option(False, "--json"), server: str = SERVER, api_token: str | None = TOKEN) -> None:
    """Every group with how many devices it matches now."""
    out = _call("GET", server, "/groups", api_token)
    if as_json:
        print_json(out)
        return
    for grp in out:
        typer.echo(f"{grp['name']}\t{grp['devices']} devices\t{'in window' if grp['in_window'] else 'outside window'}"
                   f"\t{json.dumps(grp['query'], separators=(',', ':'))}")


@app.command("devices")
def devices(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json"), server: str = SERVER,
            api_token: str | None = TOKEN) -> None:
    """The devices the group matches now."""
    out = _call("GET", server, f"/groups/{name}/devices", api_token)
    if as_json:
        print_json(out)
        return
    for d in out:
        hw = d.get("hardware") or {}
        typer.echo(f"{d['id']}\t{d['status']}\t{d.get('version') or '-'}\t{hw.get('hardware_class') or '-'}\t{hw.get('ram_mb') or '-'} MB")


@app.command("delete")
def delete(name: str = typer.Argument(...), server: str = SERVER, api_token: str | None = TOKEN) -> None:
    """Delete a group (rollouts already started keep the devices they resolved)."""
    _call("DELETE", server, f"/groups/{name}", api_token)
    typer.echo(f"deleted group {name}")

