"""`edgewise device`: enroll a device, create enrollment tokens, revoke a device.

``enroll`` runs on the device and needs only the enrollment token. ``token`` (operator) and
``revoke`` (admin) call the control plane's API with an API token: ``--api-token`` or
``$EDGEWISE_API_TOKEN`` (on the control plane's machine, ``<data_dir>/admin.token`` holds the
first admin's token).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import API_TOKEN_ENV, api_call, api_token, fail, print_json

app = typer.Typer(help="Device identity: enrollment tokens, enrollment, revocation.", no_args_is_help=True)



def _api_token(given: str | None) -> str:
    return api_token(given)


def _call(method: str, server: str, path: str, token: str, body: dict[str, object] | None = None) -> dict[str, object]:
    return api_call(method, server, path, token, body, timeout=30.0)


def _duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        fail(f"--ttl {text!r}: give a duration such as 90s, 30m, 24h or 7d")


@app.command("enroll")
def enroll(
    server: str = typer.Option(..., "--server", help="Control plane URL, e.g. https://control:8000."),
    token: str = typer.Option(..., "--token", help="The enrollment token an operator created (single use)."),
    state_dir: Path = typer.Option(..., "--state-dir", help="The agent's state directory (keys go to STATE_DIR/keys)."),
    device_id: str | None = typer.Option(None, "--device-id", help="(default: the configured id, else hostname-xxxxxx)"),
    keystore: str | None = typer.Option(None, "--keystore", help="Keystore URL for the identity key (default: file:STATE_DIR/keys)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate this device's key, send a CSR with the token, store the certificate, CA, broker URL and device token."""
    from ..agent.enroll import EnrollError, enroll as do_enroll

    try:
        r = do_enroll(server, token, state_dir, device_id=device_id, keystore_url=keystore)
    except (EnrollError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"device_id": r.device_id, "broker_url": r.broker_url, "certificate": str(r.certificate),
                    "ca_certificate": str(r.ca_certificate), "token_file": str(r.token_file), "serial": r.serial,
                    "not_after": r.not_after, "tags": r.tags})
        return
    typer.echo(f"enrolled {r.device_id}: certificate {r.certificate} (serial {r.serial}, valid until {r.not_after})")
    typer.echo(f"broker {r.broker_url}; start the agent with: edgewise agent --state-dir {state_dir}")


@app.command("token")
def token(
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL."),
    tag: list[str] = typer.Option([], "--tag", help="Tag the enrolled device gets (repeatable)."),
    ttl: str = typer.Option("24h", "--ttl", help="Lifetime: 90s, 30m, 24h, 7d (at most 30d)."),
    device_id: str | None = typer.Option(None, "--device-id", help="Only this device id may use the token."),
    api_token: str | None = typer.Option(None, "--api-token", help=f"Operator API token (default: ${API_TOKEN_ENV})."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a single-use enrollment token (needs the operator role). Prints the token once."""
    body = {"tags": list(tag), "ttl_s": _duration(ttl), "device_id": device_id}
    out = _call("POST", server, "/api/v1/enrollment-tokens", _api_token(api_token), body)
    if as_json:
        print_json(out)
        return
    typer.echo(out["token"])
    typer.echo(f"expires {out['expires_at']}; tags {out['tags'] or '-'}; device {out['device_id'] or 'any'}", err=True)


@app.command("revoke")
def revoke(
    device_id: str = typer.Argument(..., help="The device to revoke."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL."),
    reason: str = typer.Option("", "--reason", help="Recorded with the revocation."),
    api_token: str | None = typer.Option(None, "--api-token", help=f"Admin API token (default: ${API_TOKEN_ENV})."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Revoke a device: its certificates go on the CRL, the broker reloads, its API tokens stop working (admin)."""
    out = _call("POST", server, f"/api/v1/devices/{device_id}/revoke", _api_token(api_token), {"reason": reason})
    if as_json:
        print_json(out)
        return
    typer.echo(f"revoked {device_id}: certificates {', '.join(out['serials'])}; {out['tokens_revoked']} token(s); "  # type: ignore[arg-type]
               f"broker {'reloaded' if out['broker_reloaded'] else 'not reloaded (not managed here: reload it, kill -HUP)'}")
