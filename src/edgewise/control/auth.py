"""Who may do what on the control plane: principals, tokens, passwords, and the per-route rules.

Principals are users (a role: ``viewer`` < ``operator`` < ``admin``), the API tokens and dashboard
sessions that act for them, and devices (a device token today; a client certificate once the
provisioning work terminates mTLS in front of the API). Every route declares one :class:`Rule`
as a dependency, in its own router::

    from ..auth import ADMIN, OPERATOR, VIEWER, VIEWER_OR_OWN_DEVICE, PUBLIC, Rule, rule

    @router.get("/devices/{device_id}/events", dependencies=[VIEWER_OR_OWN_DEVICE])
    @router.post("/enroll", dependencies=[PUBLIC])           # authenticated by its body, not a bearer
    @router.get("/tuf/metadata/{name}", dependencies=[rule(Rule(role="viewer", devices="any"))])

A route without a rule is refused at runtime (403, :func:`enforce_declared_rule`) and fails the
route-table test (``tests/test_security_access_routes.py``), so forgetting one is never silent.

Tokens are 256-bit random strings shown once; only their sha256 is stored (a slow KDF adds nothing
for high-entropy secrets and would cost every request). Passwords are hashed with argon2id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Depends, Request
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..fsutil import atomic_write
from .errors import ConflictError, ControlError, InvalidRequestError, NotFoundError
from .models import ApiToken, User
from .timeutil import utcnow

log = logging.getLogger(__name__)

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each includes the rights of the ones before it
_RANK = {r: i for i, r in enumerate(ROLES)}
TokenKind = Literal["api", "session", "device"]

TOKEN_BYTES = 32
TOKEN_PREFIX = {"api": "ewu_", "session": "ews_", "device": "ewd_"}
SESSION_COOKIE = "edgewise_session"
CSRF_COOKIE = "edgewise_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = timedelta(hours=12)
ADMIN_USERNAME = "admin"
ADMIN_TOKEN_FILE = "admin.token"
ADMIN_PASSWORD_FILE = "initial-admin-password"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_USERNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MIN_PASSWORD_LEN = 10

# argon2id, RFC 9106's second recommended option (64 MiB, 3 passes), 2 lanes for small servers.
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=2)


# -- errors ----------------------------------------------------------------------------------------


class AuthenticationError(ControlError):
    """No credentials, or credentials that are unknown, expired, revoked or disabled."""

    status_code = 401


class PermissionDeniedError(ControlError):
    """Authenticated, but this principal may not do this."""

    status_code = 403


class UserNotFoundError(NotFoundError):
    pass


class TokenNotFoundError(NotFoundError):
    pass


# -- principals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``role`` is None for devices and anonymous callers."""

    kind: Literal["anonymous", "user", "device"]
    name: str = ""  # username or device id
    role: Role | None = None
    token_id: int | None = None
    token_name: str = ""
    via: Literal["none", "bearer", "cookie"] = "none"

    @property
    def actor(self) -> str:
        """How the audit log names this principal, e.g. ``user:alice`` or ``token:ci (user:alice)``."""
        if self.kind == "anonymous":
            return "anonymous"
        base = f"{self.kind}:{self.name}"
        if self.kind == "user" and self.token_name and self.via == "bearer":
            return f"token:{self.token_name} ({base})"
        return base

    def has_role(self, role: Role) -> bool:
        return self.kind == "user" and self.role is not None and _RANK[self.role] >= _RANK[role]


ANONYMOUS = Principal("anonymous")


# -- tokens ----------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token(kind: TokenKind) -> str:
    return TOKEN_PREFIX[kind] + secrets.token_urlsafe(TOKEN_BYTES)


def _store_token(
    session: Session, kind: TokenKind, *, user_id: int | None = None, device_id: str | None = None,
    name: str = "", expires_at: datetime | None = None,
) -> tuple[str, ApiToken]:
    token = _new_token(kind)
    row = ApiToken(
        token_hash=hash_token(token), prefix=token[:10], kind=kind, name=name[:128],
        user_id=user_id, device_id=device_id, expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return token, row


def issue_device_token(session: Session, device_id: str) -> str:
    """A new bearer token for ``device_id``; the plaintext is returned once, only its hash is stored.

    Earlier tokens of the device stay valid; to rotate, :func:`revoke_device_tokens` then issue a new one.
    Commits. The agent reads it from ``state/keys/device.token`` and sends it as ``Authorization: Bearer``.
    """
    if not device_id or len(device_id) > 64:
        raise InvalidRequestError(f"device id {device_id!r}: give 1 to 64 characters")
    token, _row = _store_token(session, "device", device_id=device_id, name=f"device {device_id}")
    session.commit()
    return token


def revoke_device_tokens(session: Session, device_id: str) -> int:
    """Revoke every live token of ``device_id`` (at device revocation); returns how many. Commits."""
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.device_id == device_id, ApiToken.kind == "device", ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def create_api_token(
    session: Session, user: User, *, name: str, expires_in: timedelta | None = None
) -> tuple[str, ApiToken]:
    """A bearer token acting as ``user`` (with the user's role, as it is at each request). Commits."""
    if not name.strip():
        raise InvalidRequestError("a token needs a name saying what uses it, e.g. 'ci' or 'grafana'")
    expires_at = utcnow() + expires_in if expires_in is not None else None
    token, row = _store_token(session, "api", user_id=user.id, name=name.strip(), expires_at=expires_at)
    session.commit()
    return token, row


def create_session(session: Session, user: User, ttl: timedelta = SESSION_TTL) -> tuple[str, ApiToken]:
    """A dashboard session token (sent as an HttpOnly cookie). Commits."""
    token, row = _store_token(session, "session", user_id=user.id, name="dashboard session", expires_at=utcnow() + ttl)
    session.commit()
    return token, row


def revoke_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise TokenNotFoundError(f"no token with id {token_id}; list them: GET /api/v1/tokens")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.commit()
    return row


def csrf_token_for(session_token: str) -> str:
    """The CSRF token that goes with a session: derived from it, so only its holder can compute it."""
    return hmac.new(session_token.encode(), b"edgewise-csrf", hashlib.sha256).hexdigest()[:43]


def resolve_token(session: Session, token: str) -> Principal | None:
    """The principal a token stands for, or None if it is unknown, revoked, expired or its user disabled."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.kind == "device":
        principal = Principal("device", row.device_id or "", None, row.id, row.name)
    else:
        user = session.get(User, row.user_id) if row.user_id is not None else None
        if user is None or user.disabled:
            return None
        principal = Principal("user", user.username, user.role, row.id, row.name)  # type: ignore[arg-type]
    if row.last_used_at is None or (now - row.last_used_at) > timedelta(minutes=1):
        row.last_used_at = now  # coarse, so reads do not write on every request
        session.commit()
    return principal


# -- users and passwords ---------------------------------------------------------------------------


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise InvalidRequestError(f"password too short: use at least {MIN_PASSWORD_LEN} characters (a passphrase is fine)")


def check_role(role: str) -> Role:
    if role not in _RANK:
        raise InvalidRequestError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise UserNotFoundError(f"no user named {username!r}; list them: GET /api/v1/users")
    return user


def create_user(session: Session, username: str, password: str, role: str) -> User:
    """A new user with an argon2id password hash. Commits."""
    if not username or len(username) > 64 or not set(username) <= _USERNAME_CHARS:
        raise InvalidRequestError(f"username {username!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
    check_role(role)
    check_password_strength(password)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ConflictError(f"user {username!r} exists; change it with PATCH /api/v1/users/{username}")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.commit()
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """Change a password and end the user's dashboard sessions. Commits."""
    check_password_strength(password)
    user.password_hash = hash_password(password)
    session.execute(
        update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "session", ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    session.commit()


def authenticate_password(session: Session, username: str, password: str) -> User | None:
    """The user if the password matches (and the user is enabled), else None. Constant work either way."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None or user.disabled:
        try:  # spend the same time as a real check so usernames cannot be probed by timing
            _hasher.verify(_DUMMY_HASH, password)
        except VerificationError:
            pass
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
        session.commit()
    return user


_DUMMY_HASH = _hasher.hash("edgewise-dummy-password")


def count_admins(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User).where(User.role == "admin", User.disabled.is_(False))) or 0


# -- bootstrap -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    created: bool
    token_path: Path
    password_path: Path | None = None


def bootstrap(session: Session, data_dir: Path) -> BootstrapResult:
    """On first start (no users at all): create ``admin`` with a random password and an admin API token.

    The token goes to ``<data_dir>/admin.token`` and the password to ``<data_dir>/initial-admin-password``,
    both 0600; the log says where, never what. Does nothing when any user exists.
    """
    token_path = Path(data_dir) / ADMIN_TOKEN_FILE
    if session.scalar(select(func.count()).select_from(User)):
        return BootstrapResult(False, token_path)
    password = secrets.token_urlsafe(18)
    user = create_user(session, ADMIN_USERNAME, password, "admin")
    token, _row = create_api_token(session, user, name="bootstrap")
    password_path = Path(data_dir) / ADMIN_PASSWORD_FILE
    atomic_write(token_path, (token + "\n").encode(), mode=0o600)
    atomic_write(password_path, (password + "\n").encode(), mode=0o600)
    log.warning(
        "first start: created user %r (role admin). Its API token is in %s and its initial password in %s "
        "(both mode 0600); sign in, then change the password (edgewise user passwd admin) and delete that file",
        ADMIN_USERNAME, token_path, password_path,
    )
    return BootstrapResult(True, token_path, password_path)


# -- the per-route rules ---------------------------------------------------------------------------

DeviceAccess = Literal["none", "own", "any"]


@dataclass(frozen=True)
class Rule:
    """Who may call one route.

    ``public``: anyone, no credentials (health, login, enrollment which carries its own token).
    ``role``: the least user role needed (roles include lower ones); None = no user may.
    ``devices``: ``none`` (no device), ``own`` (a device, only where the path's ``device_id`` is its own id),
    ``any`` (every device; for artifacts and TUF files, which are not per-device data).
    """

    role: Role | None = "admin"
    devices: DeviceAccess = "none"
    public: bool = False
    device_param: str = "device_id"

    def allows(self, principal: Principal, path_params: dict[str, Any]) -> bool:
        if self.public:
            return True
        if principal.kind == "user":
            return self.role is not None and principal.has_role(self.role)
        if principal.kind == "device":
            if self.devices == "any":
                return True
            if self.devices == "own":
                return str(path_params.get(self.device_param, "")) == principal.name
        return False

    def describe(self) -> str:
        if self.public:
            return "public"
        parts = [f"{self.role}+" if self.role else "no user"]
        if self.devices != "none":
            parts.append(f"{self.devices} device")
        return ", ".join(parts)


class RuleCheck:
    """The dependency a route declares; holds its :class:`Rule` (the route-table test reads it from here)."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def __call__(self, request: Request) -> Principal:
        if self.rule.public:
            try:
                return current_principal(request)
            except AuthenticationError:  # a stale cookie or old token must not lock anyone out of login/health
                request.state.principal = ANONYMOUS
                return ANONYMOUS
        principal = current_principal(request)
        if principal.kind == "anonymous":
            raise AuthenticationError(
                "authentication required: send 'Authorization: Bearer <token>' (an API token: edgewise token create) "
                "or sign in to the dashboard"
            )
        if not self.rule.allows(principal, dict(request.path_params)):
            who = f"device {principal.name!r}" if principal.kind == "device" else f"{principal.name!r} (role {principal.role})"
            raise PermissionDeniedError(f"{who} may not {request.method} {request.url.path}: this needs {self.rule.describe()}")
        if principal.via == "cookie" and request.method not in SAFE_METHODS:
            _check_csrf(request)
        return principal

    def __repr__(self) -> str:
        return f"RuleCheck({self.rule})"


def rule(r: Rule) -> Any:
    """``Depends`` for a route's ``dependencies=[...]``."""
    return Depends(RuleCheck(r))


PUBLIC = rule(Rule(role=None, public=True))
VIEWER = rule(Rule(role="viewer"))
OPERATOR = rule(Rule(role="operator"))
ADMIN = rule(Rule(role="admin"))
VIEWER_OR_OWN_DEVICE = rule(Rule(role="viewer", devices="own"))  # /devices/{device_id}/... reads
VIEWER_OR_ANY_DEVICE = rule(Rule(role="viewer", devices="any"))  # bundles, TUF metadata and targets


def rule_of(route: Any) -> Rule | None:
    """The rule a route declared (searched through its dependencies), or None."""
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, RuleCheck):
            return dep.call.rule
        stack.extend(dep.dependencies)
    return None


# Non-API routes FastAPI/Starlette add themselves (docs, static files): public, and they hold no fleet data.
PUBLIC_FRAMEWORK_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/dashboard"})


def enforce_declared_rule(request: Request) -> None:
    """App-wide dependency: deny by default a route that declares no rule (a programming error, said plainly)."""
    route = request.scope.get("route")
    if route is not None and rule_of(route) is None:
        raise PermissionDeniedError(
            f"{request.method} {getattr(route, 'path', request.url.path)} declares no access rule, so it is refused; "
            "add dependencies=[VIEWER|OPERATOR|ADMIN|PUBLIC|...] from edgewise.control.auth to the route"
        )


# -- who is calling --------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthenticationError("malformed Authorization header: use 'Authorization: Bearer <token>'")
    return value.strip()


def current_principal(request: Request) -> Principal:
    """Authenticate the request once (bearer token first, then the session cookie) and cache it on the request.

    Invalid credentials are an error (401), not a silent fall back to anonymous.
    """
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    token = _bearer(request)
    via: Literal["bearer", "cookie"] = "bearer"
    if token is None:
        token = request.cookies.get(SESSION_COOKIE)
        via = "cookie"
    principal = ANONYMOUS
    if token:
        services = getattr(request.app.state, "control", None)
        if services is None:
            raise RuntimeError("the control plane's services are not running (use `with TestClient(app)`)")
        with services.db.session() as session:
            found = resolve_token(session, token)
        if found is None:
            if via == "cookie":
                raise AuthenticationError("your session has expired or was ended; sign in again")
            raise AuthenticationError("invalid token: unknown, expired or revoked; create a new one (edgewise token create)")
        principal = Principal(found.kind, found.name, found.role, found.token_id, found.token_name, via)
        if via == "cookie":
            request.state.session_token = token
    request.state.principal = principal
    return principal


def _check_csrf(request: Request) -> None:
    """A cookie-authenticated change must carry the session's CSRF token in a header (double submit, derived)."""
    token = getattr(request.state, "session_token", None) or ""
    sent = request.headers.get(CSRF_HEADER, "")
    if not token or not hmac.compare_digest(sent, csrf_token_for(token)):
        raise PermissionDeniedError(
            f"missing or wrong {CSRF_HEADER} header: the dashboard sends it from the {CSRF_COOKIE} cookie; "
            "scripts should use a bearer token instead of the session cookie"
        )


__all__ = [
    "ADMIN", "ANONYMOUS", "OPERATOR", "PUBLIC", "ROLES", "VIEWER", "VIEWER_OR_ANY_DEVICE", "VIEWER_OR_OWN_DEVICE",
    "AuthenticationError", "PermissionDeniedError", "Principal", "Role", "Rule", "RuleCheck",
    "authenticate_password", "bootstrap", "create_api_token", "create_session", "create_user", "current_principal",
    "enforce_declared_rule", "hash_token", "issue_device_token", "resolve_token", "revoke_device_tokens",
    "revoke_token", "rule", "rule_of", "set_password",
]
