"""`edgewise samples`: export the samples devices captured for one model version as a data set file.

Calls the control plane's API with an operator API token: ``--api-token`` or ``$EDGEWISE_API_TOKEN``
(on the control plane's machine, ``<data_dir>/admin.token`` holds the first admin's token).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ._util import fail

API_TOKEN_ENV = "EDGEWISE_API_TOKEN"

app = typer.Typer(help="Samples captured on devices for retraining (docs/data-capture.md).", no_args_is_help=True)


@app.command("export")
def export(
    model: str = typer.Argument(..., help="Model name, e.g. digits."),
    version: str = typer.Argument(..., help="Model version, e.g. 1.0.0."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (.npz or .parquet)."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL."),
    device_id: str | None = typer.Option(None, "--device-id", help="Only this device's samples."),
    reason: str | None = typer.Option(None, "--reason", help="Only low_confidence, drift or random samples."),
    fmt: str | None = typer.Option(None, "--format", help="npz or parquet (default: from --out's suffix, else npz)."),
    api_token: str | None = typer.Option(None, "--api-token", help=f"Operator API token (default: ${API_TOKEN_ENV})."),
) -> None:
    """Download one model version's captured samples as a data set (npz: numpy.load; keys x:<input>, seq, ...)."""
    import httpx

    token = (api_token or os.environ.get(API_TOKEN_ENV) or "").strip()
    if not token:
        fail(f"this needs an operator API token: pass --api-token or set ${API_TOKEN_ENV}")
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "npz")
    if fmt not in ("npz", "parquet"):
        fail(f"--format must be npz or parquet, not {fmt!r}")
    params = {"format": fmt, **({"device_id": device_id} if device_id else {}), **({"reason": reason} if reason else {})}
    url = f"{server.rstrip('/')}/api/v1/models/{model}/versions/{version}/samples/export"
    try:
        resp = httpx.get(url, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=300.0)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the control plane at {server} ({exc}); check --server")
    if resp.status_code != 200:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        fail(f"export failed (HTTP {resp.status_code}): {detail}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(resp.content)
    typer.echo(f"wrote {out} ({len(resp.content)} bytes)")
