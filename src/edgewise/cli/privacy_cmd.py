"""`edgewise privacy`: privatize telemetry histograms on a device, tag or group, or stop (docs/learn.md, "Privacy of telemetry").

Calls ``PUT/GET /api/v1/privacy`` with an API token: ``--api-token`` or ``$EDGEWISE_API_TOKEN`` (operator to set, viewer to show).
"""

from __future__ import annotations

from typing import Any

import typer

from ._util import api_call, fail, print_json

app = typer.Typer(help="Local differential privacy for telemetry histograms, per device/tag/group (docs/learn.md).",
                  no_args_is_help=True)

ServerOpt = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL.", envvar="EDGEWISE_SERVER")
TokenOpt = typer.Option(None, "--api-token", help="API token (default: $EDGEWISE_API_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print the API's JSON.")
GroupOpt = typer.Option(None, "--group", help="A saved group (evaluated now).")
TagOpt = typer.Option(None, "--tag", help="Every device with this tag.")
DeviceOpt = typer.Option(None, "--device", help="One device id.")


def _target(group: str | None, tag: str | None, device: str | None) -> dict[str, str]:
    given = {k: v for k, v in (("group", group), ("tag", tag), ("device_id", device)) if v is not None}
    if len(given) != 1:
        fail("give exactly one of --group, --tag or --device")
    return given


def _put(server: str, token: str | None, body: dict[str, Any], as_json: bool) -> None:
    out = api_call("PUT", server, "/api/v1/privacy", token, body)
    if as_json:
        print_json(out)
        return
    p = out["privacy"]
    what = f"{p['mechanism']}, ε={p['epsilon_per_report']} per report, {p['budget_per_day']} per day" if p else "off (as counted)"
    typer.echo(f"telemetry privacy {what} for {len(out['devices'])} device(s): {', '.join(out['devices'])}")


@app.command("set")
def set_privacy(mechanism: str = typer.Option("laplace", "--mechanism", help="laplace | gaussian | randomized_response"),
                epsilon: float = typer.Option(..., "--epsilon", help="ε one report spends (split over its histograms)."),
                budget: float = typer.Option(..., "--budget", help="ε a device may spend per UTC day; then histograms are left out."),
                delta: float = typer.Option(1e-5, "--delta", help="δ per report (gaussian only)."),
                group: str | None = GroupOpt, tag: str | None = TagOpt, device: str | None = DeviceOpt,
                server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Privatize class and confidence histograms on these devices before they leave them."""
    setting = {"mechanism": mechanism, "epsilon_per_report": epsilon, "budget_per_day": budget, "delta": delta}
    _put(server, api_token, {**_target(group, tag, device), "privacy": setting}, as_json)


@app.command("off")
def off(group: str | None = GroupOpt, tag: str | None = TagOpt, device: str | None = DeviceOpt,
        server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Send histograms as counted again on these devices."""
    _put(server, api_token, {**_target(group, tag, device), "privacy": None}, as_json)


@app.command("show")
def show(tag: str | None = TagOpt, server: str = ServerOpt, api_token: str | None = TokenOpt, as_json: bool = JsonOpt) -> None:
    """Every device's recorded setting (optionally only those with --tag)."""
    rows = api_call("GET", server, "/api/v1/privacy" + (f"?tag={tag}" if tag else ""), api_token)
    if as_json:
        print_json(rows)
        return
    for r in rows:
        p = r["privacy"]
        typer.echo(f"{r['device_id']}: " + (f"{p['mechanism']} ε={p['epsilon_per_report']}/report {p['budget_per_day']}/day" if p else "off"))
