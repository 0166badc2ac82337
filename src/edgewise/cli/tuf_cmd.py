"""`edgewise tuf ...`: the control plane's TUF repository (init, status, key rotation, refresh).

The repository lives in ``<data-dir>/tuf``; these commands work on the files directly (under the
repository's file lock), so they may run while the server does.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._util import fail, print_json

app = typer.Typer(help="The TUF repository devices verify updates with: init, status, rotate keys, refresh.", no_args_is_help=True)

DATA_DIR = typer.Option(Path("edgewise-data"), "--data-dir", help="The control plane's data directory (repository in DATA_DIR/tuf).")
ONLINE_KEYS = typer.Option(None, "--online-keys", help="Keystore URL of the online keys (default: file:DATA_DIR/tuf/keys).")


def _repo(data_dir: Path, online_keys: str | None):  # type: ignore[no-untyped-def]
    from ..security.tuf_repo import open_repository

    return open_repository(data_dir / "tuf", online_keys=online_keys)


@app.command("init")
def init(
    data_dir: Path = DATA_DIR,
    root_keys_out: Path = typer.Option(..., "--root-keys-out", help="Folder for the new root private keys (then move it offline)."),
    root_keys: int = typer.Option(3, "--root-keys", help="How many root keys."),
    threshold: int = typer.Option(2, "--threshold", help="How many root keys must sign a new root."),
    online_keys: str | None = ONLINE_KEYS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create the repository before the first server start (the server would create a 1-of-1 one itself)."""
    from ..security.tuf_repo import TufRepoError

    repo = _repo(data_dir, online_keys)
    try:
        repo.init(root_keys_out, root_keys=root_keys, threshold=threshold)
    except (TufRepoError, OSError) as exc:
        fail(str(exc))
    out = {"repository": str(repo.path), "root_keys": str(root_keys_out), "root_json": str(repo.metadata_dir / "1.root.json")}
    if as_json:
        print_json(out)
        return
    typer.echo(f"created TUF repository {repo.path} (root: {threshold} of {root_keys} keys)")
    typer.echo(f"root keys written to {root_keys_out}: MOVE THIS FOLDER OFFLINE (needed only to rotate keys)")
    typer.echo(f"provision devices with {out['root_json']} (edgewise agent --tuf-root FILE)")


@app.command("status")
def status(data_dir: Path = DATA_DIR, online_keys: str | None = ONLINE_KEYS, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each role's version, expiry, keys and threshold."""
    from ..security.tuf_repo import TufRepoError

    try:
        info = _repo(data_dir, online_keys).status()
    except (TufRepoError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print_json(info)
        return
    typer.echo(f"repository {info['path']}  targets: {info['targets']}")
    for role, r in info["roles"].items():
        keys = ", ".join(k[:16] for k in r["keyids"])
        typer.echo(f"  {role:<9} v{r['version']:<5} expires {r['expires']}  {r['threshold']} of [{keys}]{'' if r['online'] else '  (offline)'}")


@app.command("rotate")
def rotate(
    role: str = typer.Option(..., "--role", help="root, targets, snapshot or timestamp."),
    data_dir: Path = DATA_DIR,
    root_keys: list[Path] = typer.Option(..., "--root-keys", help="Folder(s) holding the current root keys (repeatable)."),
    new_root_keys: Path | None = typer.Option(None, "--new-root-keys", help="For --role root: folder for the new root keys."),
    count: int | None = typer.Option(None, "--count", help="For --role root: how many new root keys (default: as now)."),
    threshold: int | None = typer.Option(None, "--threshold", help="New threshold for the role (default: unchanged)."),
    online_keys: str | None = ONLINE_KEYS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replace a role's key(s): a new root version signed by the old (and, for root, the new) root keys."""
    from ..security.tuf_repo import TufRepoError

    try:
        out = _repo(data_dir, online_keys).rotate(
            role, root_keys, new_root_keys_dir=new_root_keys, root_keys=count, threshold=threshold,
        )
    except (TufRepoError, OSError) as exc:
        fail(str(exc))
    except Exception as exc:  # python-tuf refuses a root the old root does not vouch for
        fail(f"rotation refused: {type(exc).__name__}: {exc}")
    if as_json:
        print_json(out)
        return
    typer.echo(f"rotated {role}: root is now version {out['root_version']}, {role} keys {', '.join(k[:16] for k in out['keyids'])}")
    if role == "root":
        typer.echo(f"new root keys in {new_root_keys}: move them offline; the old ones may now be destroyed")


@app.command("refresh")
def refresh(data_dir: Path = DATA_DIR, online_keys: str | None = ONLINE_KEYS) -> None:
    """Re-sign online roles past half their lifetime now (the server does this in the background)."""
    from ..security.tuf_repo import TufRepoError

    try:
        renewed = _repo(data_dir, online_keys).refresh()
    except (TufRepoError, OSError) as exc:
        fail(str(exc))
    typer.echo("renewed: " + (", ".join(renewed) if renewed else "nothing (all fresh)"))
