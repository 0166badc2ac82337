"""/api/v1/agent-releases: upload a signed agent release (.ewr), list them, download one.

  curl --data-binary @edgewise-agent-0.1.1.ewr -H 'Content-Type: application/octet-stream' \\
       -H "Authorization: Bearer $TOKEN" http://HOST/api/v1/agent-releases
  curl -H "Authorization: Bearer $TOKEN" http://HOST/api/v1/agent-releases

Deploying one is a deployment: ``POST /api/v1/deployments {"agent_version": "0.1.1", "device_id": ...}``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from .. import audit
from .. import releases as rel
from ..auth import OPERATOR, VIEWER, VIEWER_OR_ANY_DEVICE
from ..models import AgentRelease
from ..registry import Registry
from ..services import ControlServices
from .deps import get_public_url, get_registry, get_services, get_session
from .uploads import receive_upload, upload_body

router = APIRouter(prefix="/agent-releases", tags=["agent-releases"])


class AgentReleaseOut(BaseModel):
    version: str
    sha256: str
    size: int
    key_id: str = Field(description="The key that signed the release.")
    target: str = Field(description="Its TUF target name (agent/edgewise-agent-<version>.ewr).")
    url: str = Field(description="Download URL (devices use it through their desired state).")
    requires_python: str | None = None
    requires: list[str] = Field(default_factory=list, description="Requires-Dist of the wheel: the device's base environment must satisfy it.")
    uploaded_at: datetime

    @classmethod
    def of(cls, row: AgentRelease, public_url: str) -> "AgentReleaseOut":
        m: dict[str, Any] = row.manifest or {}
        return cls(
            version=row.version, sha256=row.sha256, size=row.size, key_id=row.key_id, target=row.target,
            url=public_url.rstrip("/") + rel.release_url(row.version), requires_python=m.get("requires_python"),
            requires=list(m.get("requires") or []), uploaded_at=row.uploaded_at,
        )


_UPLOAD_BODY = upload_body("A signed .ewr agent release (`edgewise agent-release build`)")


@router.post(
    "",
    response_model=AgentReleaseOut,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"description": "The identical release was already stored.", "model": AgentReleaseOut},
        409: {"description": "This version is stored with different content."},
        413: {"description": "Larger than the server's max_upload_mb."},
        415: {"description": "Neither application/octet-stream nor multipart/form-data."},
        422: {"description": "The release does not verify against the server's trusted keys; the message names what failed."},
    },
    dependencies=[OPERATOR],
)
async def upload_release(request: Request, response: Response, services: ControlServices = Depends(get_services)) -> AgentReleaseOut:
    """Verify a signed agent release against the server's trusted keys, store it and publish its TUF target.

    Versions are immutable: the same bytes again are accepted (200), other bytes under the same version refused (409).
    """
    upload = await receive_upload(request, services.registry, what="agent release", suffix=".ewr")
    out, created = await run_in_threadpool(_store, services, upload)
    audit.note(request, target=f"agent-release:{out.version}", sha256=out.sha256, created=created)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return out


def _store(services: ControlServices, upload: Path) -> tuple[AgentReleaseOut, bool]:
    with services.db.session() as session:
        result = rel.store_release(session, services.registry, upload)
        return AgentReleaseOut.of(result.release, services.settings.effective_public_url), result.created


@router.get("", response_model=list[AgentReleaseOut], dependencies=[VIEWER])
def list_releases(session: Session = Depends(get_session), public_url: str = Depends(get_public_url)) -> list[AgentReleaseOut]:
    """Every stored agent release, oldest to newest."""
    return [AgentReleaseOut.of(r, public_url) for r in rel.list_releases(session)]


@router.get(
    "/{version}", response_model=AgentReleaseOut, responses={404: {"description": "Unknown version."}}, dependencies=[VIEWER],
)
def show_release(version: str, session: Session = Depends(get_session), public_url: str = Depends(get_public_url)) -> AgentReleaseOut:
    """One stored agent release."""
    return AgentReleaseOut.of(rel.get_release(session, version), public_url)


@router.get(
    "/{version}/artifact",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The signed release."},
        206: {"description": "The requested byte range (resume an interrupted download)."},
        404: {"description": "Unknown version."},
    },
    dependencies=[VIEWER_OR_ANY_DEVICE],
)
def download_release(version: str, session: Session = Depends(get_session), registry: Registry = Depends(get_registry)) -> FileResponse:
    """The release's bytes with Range support. Devices check them against the signed TUF target and the release signature."""
    row = rel.get_release(session, version)
    session.close()  # the connection goes back to the pool before the bytes go out (see api/models.download_bundle)
    return FileResponse(
        rel.release_path(registry, row), media_type="application/octet-stream", filename=f"edgewise-agent-{row.version}.ewr",
        headers={"ETag": f'"{row.sha256}"', "X-Content-SHA256": row.sha256, "Cache-Control": "public, max-age=31536000, immutable"},
    )
