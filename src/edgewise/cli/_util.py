"""Shared CLI helpers: one way to print errors and JSON."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def explain(exc: Exception) -> str:
    """One line per problem for pydantic validation errors; str() for anything else."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())) or 'value'}: {str(e.get('msg', '')).removeprefix('Value error, ')}"
                for e in errors()
            )
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return str(exc)


API_TOKEN_ENV = "EDGEWISE_API_TOKEN"


def api_token(given: str | None) -> str:
    """The API token from ``--api-token`` or ``$EDGEWISE_API_TOKEN``; exits saying where to find one."""
    import os

    token = (given or os.environ.get(API_TOKEN_ENV) or "").strip()
    if not token:
        fail(f"this needs an API token: pass --api-token or set ${API_TOKEN_ENV} "
             "(the first admin's is in <data_dir>/admin.token on the control plane)")
    return token


def api_call(method: str, server: str, path: str, token: str | None, body: Any = None, timeout: float = 60.0) -> Any:
    """One control-plane API call (``path`` from the server root, e.g. ``/api/v1/groups``); exits with the
    server's own reason on a refusal (pydantic errors one per field) and says to check --server when unreachable."""
    import httpx

    url = server.rstrip("/") + path
    try:
        resp = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {api_token(token)}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the control plane at {server} ({exc}); check --server")
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg', '')}" for e in detail)
        fail(f"{method} {path} refused (HTTP {resp.status_code}): {detail}")
    return resp.json() if resp.content else None
