"""Dependencies injected into the routers (override them in tests with ``app.dependency_overrides``)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from ..auth import Principal, current_principal
from ..deployments import Publisher
from ..registry import Registry
from ..services import ControlServices


def get_services(request: Request) -> ControlServices:
    services = getattr(request.app.state, "control", None)
    if services is None:
        raise RuntimeError(
            "the control plane's services are not running: the app's lifespan did not start "
            "(in tests, use `with TestClient(app) as client:`)"
        )
    return services


def get_session(services: ControlServices = Depends(get_services)) -> Iterator[Session]:
    with services.db.session() as session:
        yield session


def get_registry(services: ControlServices = Depends(get_services)) -> Registry:
    return services.registry


def get_publisher(services: ControlServices = Depends(get_services)) -> Publisher | None:
    return services.bus


def get_public_url(services: ControlServices = Depends(get_services)) -> str:
    return services.settings.effective_public_url


def get_principal(request: Request) -> Principal:
    """Who is calling (already authenticated by the route's rule; see ``control.auth``)."""
    return current_principal(request)
