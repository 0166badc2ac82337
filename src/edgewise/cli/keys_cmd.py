"""`edgewise keys ...`"""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import fail, print_json

app = typer.Typer(help="Signing keys (Ed25519).", no_args_is_help=True)


@app.command("generate")
def generate(
    out: Path = typer.Option(Path("signing.key"), "--out", "-o", help="Private key file (written 0600)."),
    public: Path | None = typer.Option(None, "--public", help="Public key file (default: OUT with .pub)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate a signing key pair: keep the private key secret, give devices the .pub."""
    from ..security import KeyFileError, generate_keypair

    public = public or out.with_suffix(".pub")
    try:
        kid = generate_keypair(out, public, overwrite=force)
    except KeyFileError as exc:
        fail(str(exc))
    if as_json:
        print_json({"key_id": kid, "private_key": str(out), "public_key": str(public)})
    else:
        typer.echo(f"key {kid}: private {out} (keep secret), public {public} (give to devices and the server)")
