"""/api/v1/tuf: the TUF repository devices verify updates with (metadata and targets, read-only).

  GET /api/v1/tuf/metadata/{name}    timestamp.json, {n}.root.json, {n}.snapshot.json, {n}.targets.json
  GET /api/v1/tuf/targets/{path}     bundles under consistent names: <model>/<sha256>.<version>.ewb

Readable by every role and by devices (their bearer token). Nothing here is trusted for
being served by us: clients verify signatures, versions, expiry and hashes themselves,
so a mirror or CDN may serve the same files.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from ..auth import VIEWER_OR_ANY_DEVICE
from ..errors import NotFoundError
from ..services import ControlServices
from ..tuf_service import TufService
from .deps import get_services

router = APIRouter(prefix="/tuf", tags=["tuf"])

_MUTABLE = {"timestamp.json", "root.json", "snapshot.json", "targets.json"}


def get_tuf(services: ControlServices = Depends(get_services)) -> TufService:
    tuf = getattr(services, "tuf", None)
    if tuf is None:
        raise NotFoundError("this control plane runs without a TUF repository")
    return tuf


@router.get(
    "/metadata/{name}", response_class=FileResponse, dependencies=[VIEWER_OR_ANY_DEVICE],
    responses={200: {"content": {"application/json": {}}}, 404: {"description": "No such metadata file (or version)."}},
)
def tuf_metadata(name: str, tuf: TufService = Depends(get_tuf)) -> FileResponse:
    """One signed metadata file. Versioned names never change (cached for a year); the rest are not cached."""
    try:
        path = tuf.repo.metadata_file(name)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{exc}; TUF clients ask for timestamp.json and versioned root/snapshot/targets files") from None
    cache = "no-cache" if name in _MUTABLE else "public, max-age=31536000, immutable"
    return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})


@router.get(
    "/targets/{path:path}", response_class=FileResponse, dependencies=[VIEWER_OR_ANY_DEVICE],
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "A byte range (resume)."},
               404: {"description": "No such target file."}},
)
def tuf_target(path: str, tuf: TufService = Depends(get_tuf)) -> FileResponse:
    """A target file by its consistent name (``<dir>/<sha256>.<name>``), with Range support for resumed downloads."""
    try:
        file = tuf.repo.target_file(path)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{exc}; target URLs are <model>/<sha256>.<version>.ewb as the signed targets list them") from None
    return FileResponse(file, media_type="application/octet-stream", headers={"Cache-Control": "public, max-age=31536000, immutable"})
