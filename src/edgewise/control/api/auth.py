"""Sign-in, users, API tokens, device tokens and the audit log.

  curl -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{"username": "ops1", "password": "a long passphrase", "role": "operator"}' http://HOST/api/v1/users
  curl -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{"name": "ci", "expires_in_days": 90}' http://HOST/api/v1/tokens
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import audit
from ..auth import (
    ADMIN, CSRF_COOKIE, OPERATOR, PUBLIC, SESSION_COOKIE, SESSION_TTL, VIEWER, AuthenticationError, PermissionDeniedError,
    Principal, Role, TokenNotFoundError, authenticate_password, check_role, count_admins, create_api_token, create_session, create_user,
    csrf_token_for, current_principal, get_user, hash_token, issue_device_token, revoke_device_tokens, revoke_token,
    set_password,
)
from ..errors import ConflictError
from ..models import ApiToken, AuditEntry, User
from .deps import get_session

router = APIRouter(tags=["access"])


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class LoginOut(BaseModel):
    username: str
    role: str
    csrf_token: str = Field(description=f"Send it back as the X-CSRF-Token header on changes (also in the {CSRF_COOKIE} cookie).")
    expires_at: datetime


class MeOut(BaseModel):
    kind: str
    name: str
    role: str | None
    via: str


class UserIn(BaseModel):
    username: str = Field(examples=["alice"])
    password: str = Field(min_length=1, max_length=1024)
    role: Role = "viewer"


class UserPatch(BaseModel):
    role: Role | None = None
    password: str | None = Field(default=None, max_length=1024)
    disabled: bool | None = None


class PasswordIn(BaseModel):
    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class UserOut(_Out):
    username: str
    role: str
    disabled: bool
    created_at: datetime


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=128, examples=["ci"])
    username: str | None = Field(default=None, description="Owner; default yourself. Only admins create tokens for others.")
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


class TokenOut(_Out):
    id: int
    kind: str
    name: str
    prefix: str
    owner: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself. Shown once: store it now.")


class DeviceTokenOut(BaseModel):
    device_id: str
    token: str = Field(description="Write it to the device's state/keys/device.token (mode 0600). Shown once.")


class RevokedOut(BaseModel):
    device_id: str
    revoked: int


class AuditOut(_Out):
    id: int
    at: datetime
    actor: str
    role: str | None
    action: str
    target: str
    status: int
    remote: str | None
    detail: dict[str, Any]


def _token_out(session: Session, row: ApiToken, cls: type[TokenOut] = TokenOut, **extra: Any) -> Any:
    if row.device_id is not None:
        owner = f"device:{row.device_id}"
    else:
        user = session.get(User, row.user_id) if row.user_id is not None else None
        owner = f"user:{user.username}" if user else "user:?"
    return cls.model_validate({**{c: getattr(row, c) for c in TokenOut.model_fields if c != "owner"}, "owner": owner, **extra})


# -- sign in ---------------------------------------------------------------------------------------


@router.post("/auth/login", response_model=LoginOut, dependencies=[PUBLIC], responses={401: {"description": "Wrong username or password."}})
def login(body: LoginIn, request: Request, response: Response, session: Session = Depends(get_session)) -> LoginOut:
    """Check a password and start a dashboard session: an HttpOnly, SameSite=Strict cookie.

    Changes made with the cookie must carry the returned ``csrf_token`` as the ``X-CSRF-Token`` header.
    Scripts should use an API token instead.
    """
    remote = audit.remote_of(request.scope)
    user = authenticate_password(session, body.username, body.password)
    if user is None:
        audit.record(session, actor=f"user:{body.username[:64]}", action="login.failed", target="/api/v1/auth/login",
                     status=401, remote=remote)
        raise AuthenticationError("wrong username or password")
    token, row = create_session(session, user)
    secure = request.url.scheme == "https"
    max_age = int(SESSION_TTL.total_seconds())
    csrf = csrf_token_for(token)
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, httponly=True, samesite="strict", secure=secure, path="/")
    response.set_cookie(CSRF_COOKIE, csrf, max_age=max_age, httponly=False, samesite="strict", secure=secure, path="/")
    audit.note(request, actor=f"user:{user.username}", target=f"user:{user.username}", action="login")
    assert row.expires_at is not None
    return LoginOut(username=user.username, role=user.role, csrf_token=csrf, expires_at=row.expires_at)


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT, dependencies=[VIEWER])
def logout(request: Request, session: Session = Depends(get_session)) -> Response:
    """End this dashboard session (the cookie stops working at once)."""
    token = getattr(request.state, "session_token", None)
    if token:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
        if row is not None:
            revoke_token(session, row.id)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


@router.get("/auth/me", response_model=MeOut, dependencies=[PUBLIC])
def me(principal: Principal = Depends(current_principal)) -> MeOut:
    """Who the server thinks you are (``anonymous`` without credentials); the dashboard asks this first."""
    return MeOut(kind=principal.kind, name=principal.name, role=principal.role, via=principal.via)


@router.post("/auth/password", status_code=status.HTTP_204_NO_CONTENT, dependencies=[VIEWER])
def change_own_password(
    body: PasswordIn, request: Request, session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> Response:
    """Change your own password (needs the current one); ends your dashboard sessions."""
    user = authenticate_password(session, principal.name, body.current_password)
    if user is None:
        raise PermissionDeniedError("the current password is wrong")
    set_password(session, user, body.new_password)
    audit.note(request, target=f"user:{user.username}", event="password")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- users (admin) ---------------------------------------------------------------------------------


@router.get("/users", response_model=list[UserOut], dependencies=[ADMIN])
def list_users(session: Session = Depends(get_session)) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in session.scalars(select(User).order_by(User.username))]


@router.post("/users", response_model=UserOut, status_code=status.HTTP_201_CREATED, dependencies=[ADMIN])
def add_user(body: UserIn, request: Request, session: Session = Depends(get_session)) -> UserOut:
    user = create_user(session, body.username, body.password, body.role)
    audit.note(request, target=f"user:{user.username}", role=user.role)
    return UserOut.model_validate(user)


@router.patch("/users/{username}", response_model=UserOut, dependencies=[ADMIN])
def change_user(username: str, body: UserPatch, request: Request, session: Session = Depends(get_session)) -> UserOut:
    """Change a user's role, password or disabled flag. The last enabled admin cannot be demoted or disabled."""
    user = get_user(session, username)
    losing_admin = user.role == "admin" and ((body.role is not None and body.role != "admin") or body.disabled)
    if losing_admin and count_admins(session) <= 1:
        raise ConflictError(f"{username!r} is the last enabled admin; make another admin first")
    changed: dict[str, Any] = {}
    if body.role is not None:
        user.role = check_role(body.role)
        changed["role"] = body.role
    if body.disabled is not None:
        user.disabled = body.disabled
        changed["disabled"] = body.disabled
    session.commit()
    if body.password is not None:
        set_password(session, user, body.password)
        changed["password"] = "changed"
    audit.note(request, target=f"user:{username}", **changed)
    return UserOut.model_validate(user)


@router.delete("/users/{username}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[ADMIN])
def delete_user(username: str, request: Request, session: Session = Depends(get_session)) -> Response:
    """Delete a user and all their tokens and sessions."""
    user = get_user(session, username)
    if user.role == "admin" and not user.disabled and count_admins(session) <= 1:
        raise ConflictError(f"{username!r} is the last enabled admin; make another admin first")
    session.delete(user)
    session.commit()
    audit.note(request, target=f"user:{username}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- API tokens ------------------------------------------------------------------------------------


@router.get("/tokens", response_model=list[TokenOut], dependencies=[VIEWER])
def list_tokens(
    all: bool = Query(default=False, description="Every user's and device's tokens (admin only)."),
    session: Session = Depends(get_session), principal: Principal = Depends(current_principal),
) -> list[TokenOut]:
    """Your API tokens (never the tokens themselves); admins may ask for all of them."""
    q = select(ApiToken).where(ApiToken.kind != "session").order_by(ApiToken.id)
    if all:
        if not principal.has_role("admin"):
            raise PermissionDeniedError("only admins may list every token")
    else:
        q = q.where(ApiToken.user_id == get_user(session, principal.name).id)
    return [_token_out(session, r) for r in session.scalars(q)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, dependencies=[VIEWER])
def add_token(
    body: TokenIn, request: Request, session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> TokenCreated:
    """An API token acting as you (or, for admins, as another user), with that user's role. Shown once."""
    username = body.username or principal.name
    if username != principal.name and not principal.has_role("admin"):
        raise PermissionDeniedError("only admins may create tokens for other users")
    user = get_user(session, username)
    expires = timedelta(days=body.expires_in_days) if body.expires_in_days else None
    token, row = create_api_token(session, user, name=body.name, expires_in=expires)
    audit.note(request, target=f"token:{row.id}", event="token.create", owner=f"user:{username}", name=row.name)
    return _token_out(session, row, TokenCreated, token=token)


@router.delete("/tokens/{token_id}", response_model=TokenOut, dependencies=[VIEWER])
def delete_token(
    token_id: int, request: Request, session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> TokenOut:
    """Revoke a token: your own, or (admins) anyone's, including device tokens."""
    row = session.get(ApiToken, token_id)
    if row is None or row.kind == "session":
        raise TokenNotFoundError(f"no token with id {token_id}; list yours: GET /api/v1/tokens")
    mine = row.user_id is not None and row.user_id == get_user(session, principal.name).id
    if not mine and not principal.has_role("admin"):
        raise PermissionDeniedError(f"token {token_id} is not yours; only admins revoke other principals' tokens")
    row = revoke_token(session, token_id)
    audit.note(request, target=f"token:{token_id}", event="token.revoke")
    return _token_out(session, row)


# -- device tokens (operator) ----------------------------------------------------------------------


@router.post("/devices/{device_id}/token", response_model=DeviceTokenOut, status_code=status.HTTP_201_CREATED,
             dependencies=[OPERATOR])
def add_device_token(device_id: str, request: Request, session: Session = Depends(get_session)) -> DeviceTokenOut:
    """A bearer token for a device that is not enrolled with a certificate (shown once)."""
    token = issue_device_token(session, device_id)
    audit.note(request, target=f"device:{device_id}", event="device_token.create")
    return DeviceTokenOut(device_id=device_id, token=token)


@router.delete("/devices/{device_id}/token", response_model=RevokedOut, dependencies=[OPERATOR])
def delete_device_tokens(device_id: str, request: Request, session: Session = Depends(get_session)) -> RevokedOut:
    """Revoke every token of the device."""
    n = revoke_device_tokens(session, device_id)
    audit.note(request, target=f"device:{device_id}", event="device_token.revoke", revoked=n)
    return RevokedOut(device_id=device_id, revoked=n)


# -- audit log (operator, admin) -------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditOut], dependencies=[OPERATOR])
def list_audit(
    limit: int = Query(default=100, ge=1, le=audit.MAX_LIMIT),
    actor: str | None = Query(default=None, description="Only entries whose actor contains this."),
    action: str | None = Query(default=None, description="Only entries whose action contains this, e.g. deployments."),
    before_id: int | None = Query(default=None, description="Page backwards: entries older than this id."),
    session: Session = Depends(get_session),
) -> list[AuditOut]:
    """Newest first."""
    rows: list[AuditEntry] = audit.recent(session, limit=limit, actor=actor, action=action, before_id=before_id)
    return [AuditOut.model_validate(r) for r in rows]
