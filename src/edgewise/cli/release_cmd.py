"""`edgewise agent-release build | verify | install | status | upload | deploy`: signed agent releases (.ewr)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import fail, print_json

app = typer.Typer(help="Build, verify and install signed releases of the agent itself (.ewr).", no_args_is_help=True)


@app.command("build")
def build(
    key: Path = typer.Option(..., "--key", help="Private signing key (edgewise keys generate)."),
    source: Path | None = typer.Option(None, "--source", help="edgewise source tree to build the wheel from (offline) (default: .)."),
    wheel: Path | None = typer.Option(None, "--wheel", exists=True, dir_okay=False, help="Use this already-built edgewise wheel instead of building one."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: edgewise-agent-VERSION.ewr)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary and TUF target fields as JSON."),
) -> None:
    """Build one signed file: the edgewise wheel plus a manifest of every installed file's sha256."""
    import tempfile

    from ..bundle.release import ReleaseError, build_release, build_wheel, verify_release
    from ..security import KeyFileError, TrustedKeys, load_signer

    try:
        signer = load_signer(key)
        with tempfile.TemporaryDirectory(prefix="edgewise-release-") as tmp:
            whl = wheel if wheel is not None else build_wheel(source or Path("."), Path(tmp))
            if out is None:
                from ..bundle.release import describe_wheel

                out = Path(f"edgewise-agent-{describe_wheel(whl)[0]}.ewr")
            manifest = build_release(whl, signer=signer, out=out)
        verified = verify_release(out, TrustedKeys([signer.public_key]))
    except (ReleaseError, KeyFileError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"path": str(out), "version": manifest.version, "files": len(manifest.files), "key_id": signer.key_id, "tuf_target": verified.tuf_target()})
    else:
        typer.echo(f"wrote {out} ({verified.size:,} bytes): edgewise agent {manifest.version}, {len(manifest.files)} files, signed by key {signer.key_id}")


@app.command("verify")
def verify(
    release: Path = typer.Argument(..., help="The .ewr file."),
    trust: list[Path] = typer.Option(..., "--trust", help="Trusted public key file or folder (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check the signature and every hash in the manifest; exit 1 naming what failed."""
    from ..bundle.errors import BundleError
    from ..bundle.release import verify_release
    from ..security import KeyFileError, TrustedKeys

    try:
        v = verify_release(release, TrustedKeys.from_paths(trust))
    except (BundleError, KeyFileError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"ok": True, "version": v.version, "key_id": v.key_id, "files": len(v.manifest.files), "requires": v.manifest.requires, "tuf_target": v.tuf_target()})
    else:
        typer.echo(f"ok: edgewise agent {v.version}, {len(v.manifest.files)} files, signed by trusted key {v.key_id}, sha256 {v.sha256}")


def _root(state_dir: Path, releases_dir: Path | None) -> Path:
    return releases_dir or state_dir / "releases"


@app.command("install")
def install(
    release: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .ewr file."),
    state_dir: Path = typer.Option(..., "--state-dir", help="The agent's state directory (its trust/ verifies the release)."),
    releases_dir: Path | None = typer.Option(None, "--releases-dir", help="Release envs (default: STATE/releases)."),
    max_starts: int = typer.Option(3, "--max-starts", min=1, max=100, help="Failed starts on trial before the launcher rolls back."),
    force: bool = typer.Option(False, "--force", help="Install a version that was rolled back on this device before."),
) -> None:
    """Install a release beside the running one, on trial from the launcher's next start (offline seeding, USB)."""
    from .. import __version__
    from ..agent.selfupdate import AgentReleases, SelfUpdateError
    from ..bundle.errors import BundleError
    from ..security import KeyFileError, TrustedKeys

    trust = state_dir / "trust"
    try:
        releases = AgentReleases(_root(state_dir, releases_dir))
        v = releases.install(release, TrustedKeys.from_paths([trust]) if trust.exists() else TrustedKeys(),
                             running_version=__version__, max_starts=max_starts, force=force)
    except (BundleError, SelfUpdateError, KeyFileError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"installed edgewise agent {v.version} in {releases.env_dir(v.version)}; on trial from the next start (systemctl restart edgewise-agent)")


@app.command("status")
def status(
    state_dir: Path = typer.Option(..., "--state-dir"),
    releases_dir: Path | None = typer.Option(None, "--releases-dir"),
) -> None:
    """Print current.json: which env runs, the trial, rolled-back versions and recent history."""
    import dataclasses

    from ..agent.selfupdate import AgentReleases

    print_json(dataclasses.asdict(AgentReleases(_root(state_dir, releases_dir)).state()))


# -- through the control plane ------------------------------------------------------------------------


@app.command("upload")
def upload(
    release: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .ewr file."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL."),
    api_token: str | None = typer.Option(None, "--api-token", help="Operator API token (default: $EDGEWISE_API_TOKEN)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Upload a signed release to the control plane: it verifies it, stores it and signs it as a TUF target."""
    import httpx

    from .device_cmd import _api_token

    token = _api_token(api_token)
    try:
        resp = httpx.post(server.rstrip("/") + "/api/v1/agent-releases", content=release.read_bytes(), timeout=120.0,
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
    except httpx.HTTPError as exc:
        fail(f"cannot reach the control plane at {server} ({exc}); check --server")
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        fail(f"upload refused ({resp.status_code}): {detail}")
    out = resp.json()
    if as_json:
        print_json(out)
    else:
        typer.echo(f"{'stored' if resp.status_code == 201 else 'already stored'}: edgewise agent {out['version']} "
                   f"({out['size']:,} bytes), TUF target {out['target']}")


@app.command("deploy")
def deploy(
    version: str = typer.Argument(..., help="An uploaded release version (edgewise agent-release upload)."),
    device: str | None = typer.Option(None, "--device", help="One device id..."),
    tag: str | None = typer.Option(None, "--tag", help="...or every device that has this tag now."),
    server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Control plane URL."),
    api_token: str | None = typer.Option(None, "--api-token", help="Operator API token (default: $EDGEWISE_API_TOKEN)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make a device or a tag run this agent release (their desired model stays as it is)."""
    from .device_cmd import _api_token, _call

    if (device is None) == (tag is None):
        fail("give exactly one of --device or --tag")
    body: dict[str, object] = {"agent_version": version, **({"device_id": device} if device else {"tag": tag})}
    out = _call("POST", server, "/api/v1/deployments", _api_token(api_token), body)
    if as_json:
        print_json(out)
    else:
        typer.echo(f"deployment {out['id']}: agent {version} to {out['target_kind']} {out['target_value']} "
                   f"({out['device_count']} device(s)); devices install it after TUF and signature checks")
