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
