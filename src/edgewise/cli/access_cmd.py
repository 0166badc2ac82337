"""`edgewise user ...` and `edgewise token ...`: manage the control plane's users and tokens on its host.

These work on the control plane's database directly (same --data-dir / --database-url as `edgewise server`),
so they also recover a lost admin password. Remotely, use the API (docs/security-access.md).
Every change is written to the audit log as ``cli:<os user>``.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer

from ._util import explain, fail, print_json

user_app = typer.Typer(help="Control-plane users (admin, operator, viewer).", no_args_is_help=True)
token_app = typer.Typer(help="Control-plane API tokens and device tokens.", no_args_is_help=True)

DataDir = typer.Option(None, "--data-dir", help="The control plane's data folder (default: ./edgewise-data).")
DatabaseUrl = typer.Option(None, "--database-url", help="SQLAlchemy URL (default: SQLite in DATA_DIR).")


@contextmanager
def _session(data_dir: Path | None, database_url: str | None) -> Iterator[Any]:
    from ..control.db import init_db
    from ..control.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(data_dir=data_dir, database_url=database_url)
    except ValueError as exc:
        fail(explain(exc))
    url = settings.effective_database_url  # SQLite in the data dir unless a URL (or URL template) says otherwise
    if url.startswith("sqlite") and settings.database_url is None and not (settings.data_dir / "edgewise.db").exists():
        fail(f"no control-plane database in {settings.data_dir}: give --data-dir (or --database-url) of the server")
    db = init_db(url)
    try:
        with db.session() as session:
            yield session
    finally:
        db.dispose()


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _audit(session: Any, action: str, target: str, **detail: Any) -> None:
    from ..control.audit import record

    record(session, actor=_actor(), action=action, target=target, status=0, remote="local", detail=detail)


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


def _control_errors() -> tuple[type[Exception], ...]:
    from ..control.errors import ControlError

    return (ControlError,)


@user_app.command("add")
def user_add(
    username: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option("viewer", "--role", help="admin, operator or viewer."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin (scripts)."),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Create a user (the password is asked twice, or read from stdin)."""
    from ..control.auth import create_user

    password = _read_password(password_stdin)
    with _session(data_dir, database_url) as session:
        try:
            user = create_user(session, username, password, role)
        except _control_errors() as exc:
            fail(str(exc))
        _audit(session, "user.create", f"user:{username}", role=role)
    typer.echo(f"user {user.username} created with role {user.role}")


@user_app.command("list")
def user_list(data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """Users, their roles and whether they are disabled."""
    from sqlalchemy import select

    from ..control.models import User

    with _session(data_dir, database_url) as session:
        print_json([{"username": u.username, "role": u.role, "disabled": u.disabled, "created_at": u.created_at}
                    for u in session.scalars(select(User).order_by(User.username))])


@user_app.command("passwd")
def user_passwd(
    username: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the new password from stdin."),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Set a user's password (ends their dashboard sessions). Also the way back in after a lost admin password."""
    from ..control.auth import get_user, set_password

    password = _read_password(password_stdin)
    with _session(data_dir, database_url) as session:
        try:
            set_password(session, get_user(session, username), password)
        except _control_errors() as exc:
            fail(str(exc))
        _audit(session, "user.password", f"user:{username}")
    typer.echo(f"password of {username} changed")


@user_app.command("set")
def user_set(
    username: str = typer.Argument(...),
    role: str | None = typer.Option(None, "--role", help="New role: admin, operator or viewer."),
    disable: bool = typer.Option(False, "--disable", help="Refuse the user's password and tokens."),
    enable: bool = typer.Option(False, "--enable"),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Change a user's role, or disable/enable the user."""
    from ..control.auth import check_role, get_user

    if disable and enable:
        fail("give --disable or --enable, not both")
    with _session(data_dir, database_url) as session:
        try:
            user = get_user(session, username)
            if role is not None:
                user.role = check_role(role)
        except _control_errors() as exc:
            fail(str(exc))
        if disable or enable:
            user.disabled = disable
        session.commit()
        _audit(session, "user.update", f"user:{username}", role=user.role, disabled=user.disabled)
    typer.echo(f"{username}: role {user.role}{', disabled' if user.disabled else ''}")


@token_app.command("create")
def token_create(
    user: str = typer.Option("admin", "--user", help="The token acts as this user, with their role."),
    name: str = typer.Option(..., "--name", help="What uses the token, e.g. ci or grafana."),
    expires_days: float | None = typer.Option(None, "--expires-days", help="Expire after this many days (default: never)."),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Create an API token and print it (once: only its hash is stored)."""
    from ..control.auth import create_api_token, get_user

    with _session(data_dir, database_url) as session:
        try:
            token, row = create_api_token(session, get_user(session, user), name=name,
                                          expires_in=timedelta(days=expires_days) if expires_days else None)
        except _control_errors() as exc:
            fail(str(exc))
        _audit(session, "token.create", f"token:{row.id}", owner=f"user:{user}", name=name)
    typer.echo(token)


@token_app.command("device")
def token_device(
    device_id: str = typer.Argument(..., help="The device the token is for."),
    out: Path | None = typer.Option(None, "--out", help="Write it here (0600), e.g. STATE/keys/device.token."),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Create a device token (for devices without a certificate) and print or write it."""
    from ..fsutil import atomic_write
    from ..control.auth import issue_device_token

    with _session(data_dir, database_url) as session:
        try:
            token = issue_device_token(session, device_id)
        except _control_errors() as exc:
            fail(str(exc))
        _audit(session, "device_token.create", f"device:{device_id}")
    if out is None:
        typer.echo(token)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, (token + "\n").encode(), mode=0o600)
        typer.echo(f"device token for {device_id} written to {out} (0600)")


@token_app.command("list")
def token_list(data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """Every API and device token (never the tokens themselves)."""
    from sqlalchemy import select

    from ..control.models import ApiToken, User

    with _session(data_dir, database_url) as session:
        users = {u.id: u.username for u in session.scalars(select(User))}
        rows = session.scalars(select(ApiToken).where(ApiToken.kind != "session").order_by(ApiToken.id))
        print_json([{
            "id": r.id, "kind": r.kind, "name": r.name, "prefix": r.prefix,
            "owner": f"device:{r.device_id}" if r.device_id else f"user:{users.get(r.user_id or -1, '?')}",
            "expires_at": r.expires_at, "last_used_at": r.last_used_at, "revoked_at": r.revoked_at,
        } for r in rows])


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(..., help="Id from `edgewise token list`."),
    data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl,
) -> None:
    """Revoke a token: it stops working at once."""
    from ..control.auth import revoke_token

    with _session(data_dir, database_url) as session:
        try:
            revoke_token(session, token_id)
        except _control_errors() as exc:
            fail(str(exc))
        _audit(session, "token.revoke", f"token:{token_id}")
    typer.echo(f"token {token_id} revoked")
