"""The audit log: who changed what, when, from where.

Two ways in: :class:`AuditMiddleware` records every state-changing request (POST/PUT/PATCH/DELETE)
that succeeded, with the authenticated principal; and :func:`record` for events that are not
successful changes (failed logins) or that happen outside HTTP (CLI). Routers enrich the
middleware's entry with :func:`note` (e.g. a deployment's model, version and target; an enrollment's
device id), never with secrets.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .models import AuditEntry

log = logging.getLogger(__name__)

CHANGE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_LIMIT = 1000


def record(
    session: Session, *, actor: str, action: str, target: str = "", status: int = 0, role: str | None = None,
    remote: str | None = None, detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry. Commits."""
    entry = AuditEntry(
        actor=actor[:160], role=role, action=action[:64], target=target[:512], status=status,
        remote=(remote or None) and remote[:64], detail=detail or {},
    )
    session.add(entry)
    session.commit()
    return entry


def note(
    request: Request, *, actor: str | None = None, target: str | None = None, action: str | None = None, **detail: Any
) -> None:
    """Add to the entry the middleware will write for this request (call from a route handler).

    ``actor`` overrides the authenticated principal (enrollment: the device the token enrolled); ``action``
    replaces the default ``METHOD /route/template`` (e.g. ``login``);
    ``target`` names what changed; keyword arguments go into ``detail`` (JSON-serialisable, no secrets).
    """
    audit = request.scope.setdefault("state", {}).setdefault("audit", {})
    if actor is not None:
        audit["actor"] = actor
    if target is not None:
        audit["target"] = target
    if action is not None:
        audit["action"] = action
    audit.setdefault("detail", {}).update(detail)


def remote_of(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def route_template(scope: Scope) -> str:
    """The request path with its path parameters put back as ``{name}`` (e.g. ``/api/v1/users/{username}``),
    so one kind of change reads the same in every entry."""
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    return "/".join("{%s}" % params[seg] if seg in params else seg for seg in scope["path"].split("/"))


def recent(
    session: Session, *, limit: int = 100, actor: str | None = None, action: str | None = None, before_id: int | None = None
) -> list[AuditEntry]:
    """Newest first; ``actor``/``action`` filter by substring; ``before_id`` pages backwards."""
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(min(limit, MAX_LIMIT))
    if actor:
        q = q.where(AuditEntry.actor.contains(actor))
    if action:
        q = q.where(AuditEntry.action.contains(action))
    if before_id is not None:
        q = q.where(AuditEntry.id < before_id)
    return list(session.scalars(q))


class AuditMiddleware:
    """Pure ASGI (streams uploads and downloads untouched): after a change request answers 2xx/3xx,
    write who did it. The principal is the one the route's rule authenticated (``scope['state']``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in CHANGE_METHODS:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if 200 <= status < 400:
                await self._write(scope, status)

    async def _write(self, scope: Scope, status: int) -> None:
        app = scope.get("app")
        services = getattr(getattr(app, "state", None), "control", None)
        if services is None:
            return
        state = scope.get("state") or {}
        principal = state.get("principal")
        audit = state.get("audit") or {}
        actor = audit.get("actor") or (principal.actor if principal is not None else "anonymous")
        role = principal.role if principal is not None else None
        action = audit.get("action") or f"{scope['method']} {route_template(scope)}"
        target = audit.get("target") or scope["path"]

        def write() -> None:
            with services.db.session() as session:
                record(session, actor=actor, role=role, action=action, target=target, status=status,
                       remote=remote_of(scope), detail=audit.get("detail"))

        try:
            await run_in_threadpool(write)
        except Exception:  # noqa: BLE001 - the change is done; a lost audit line is logged, not raised at the client
            log.exception("could not write the audit entry for %s %s by %s", scope["method"], scope["path"], actor)
