"""/api/v1/models: upload a signed bundle, list versions, download.

Upload either way:
  curl --data-binary @digits-1.0.0.ewb -H 'Content-Type: application/octet-stream' http://HOST/api/v1/models
  curl -F file=@digits-1.0.0.ewb http://HOST/api/v1/models
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from .. import audit
from ..auth import OPERATOR, VIEWER, VIEWER_OR_ANY_DEVICE
from ..errors import ModelNotFoundError
from ..registry import Registry
from ..schemas import ModelSummary, ModelVersionDetail, ModelVersionOut
from ..variants import VariantInfo
from ..services import ControlServices
from .deps import get_public_url, get_registry, get_services, get_session
from .uploads import receive_upload, upload_body

router = APIRouter(prefix="/models", tags=["models"])

_UPLOAD_BODY = upload_body("A signed .ewb bundle")


@router.post(
    "",
    response_model=ModelVersionDetail,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"description": "The identical bundle was already stored.", "model": ModelVersionDetail},
        409: {"description": "This name and version is stored with different content."},
        413: {"description": "Larger than the server's max_upload_mb."},
        415: {"description": "Neither application/octet-stream nor multipart/form-data."},
        422: {"description": "The bundle does not verify; the message names what failed."},
    },
    dependencies=[OPERATOR],
)
async def upload_model(
    request: Request, response: Response, services: ControlServices = Depends(get_services)
) -> ModelVersionDetail:
    """Verify a signed bundle against the server's trusted keys and store it.

    Versions are immutable: re-uploading the same bytes is accepted (200), different
    bytes under the same name and version are refused (409).
    """
    upload = await receive_upload(request, services.registry, what="bundle", suffix=".ewb")
    detail, created = await run_in_threadpool(_store, services, upload)
    audit.note(request, target=f"model:{detail.name}/{detail.version}", sha256=detail.sha256, created=created,
               variant=detail.variant)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return detail


def _store(services: ControlServices, upload: Path) -> tuple[ModelVersionDetail, bool]:
    with services.db.session() as session:
        result = services.registry.store(session, upload)
        return ModelVersionDetail.of(result.version, services.settings.effective_public_url), result.created


@router.get("", response_model=list[ModelSummary], dependencies=[VIEWER])
def list_models(session: Session = Depends(get_session)) -> list[ModelSummary]:
    """Every model name with its versions."""
    by_name: dict[str, list[str]] = {}
    for mv in Registry.all_versions(session):
        versions = by_name.setdefault(mv.name, [])
        if not versions or versions[-1] != mv.version:  # one entry per version, however many variants it has
            versions.append(mv.version)
    return [ModelSummary(name=n, versions=v, latest=v[-1]) for n, v in sorted(by_name.items())]


@router.get(
    "/{name}", response_model=list[ModelVersionOut], responses={404: {"description": "Unknown model."}},
    dependencies=[VIEWER],
)
def list_versions(
    name: str, session: Session = Depends(get_session), public_url: str = Depends(get_public_url)
) -> list[ModelVersionOut]:
    """The versions of one model, oldest to newest (one entry per variant)."""
    versions = Registry.versions(session, name)
    if not versions:
        raise ModelNotFoundError(f"no model named {name!r}; upload one: POST /api/v1/models")
    return [ModelVersionOut.of(mv, public_url) for mv in versions]


@router.get(
    "/{name}/{version}", response_model=ModelVersionDetail, responses={404: {"description": "Unknown version."}},
    dependencies=[VIEWER],
)
def show_version(
    name: str, version: str, variant: str | None = Query(default=None, description="Default: the \"default\" variant, else the first uploaded."),
    session: Session = Depends(get_session), public_url: str = Depends(get_public_url),
) -> ModelVersionDetail:
    """One version (variant) with its full manifest."""
    return ModelVersionDetail.of(Registry.get(session, name, version, variant), public_url)


@router.get(
    "/{name}/{version}/variants", responses={404: {"description": "Unknown version."}}, dependencies=[VIEWER],
)
def list_variants(
    name: str, version: str, session: Session = Depends(get_session), public_url: str = Depends(get_public_url)
) -> list[dict[str, Any]]:
    """Every variant of one version with what the control plane's choice uses: profile, RAM and runtime needs,
    measured latency and size (see docs/fleet-targeting.md)."""
    rows = Registry.variants(session, name, version)
    if not rows:
        Registry.get(session, name, version)  # 404 naming the known versions
    out = []
    for mv in rows:
        info = VariantInfo.of(mv)
        variant = (mv.manifest or {}).get("variant") or {}
        out.append({
            **ModelVersionOut.of(mv, public_url).model_dump(mode="json"),
            "profile": info.profile, "recipe": info.recipe, "min_ram_mb": info.min_ram_mb, "providers": info.providers,
            "requires_isa": info.requires_isa, "latency_ms": info.latency_ms, "figures": variant.get("figures") or {},
            "measured_on": variant.get("measured_on"),
        })
    return out


@router.get(
    "/{name}/{version}/bundle",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The signed bundle."},
        206: {"description": "The requested byte range (resume an interrupted download)."},
        404: {"description": "Unknown version."},
        416: {"description": "Range not satisfiable."},
    },
    dependencies=[VIEWER_OR_ANY_DEVICE],
)
def download_bundle(
    name: str, version: str, variant: str | None = Query(default=None, description="Default: the \"default\" variant, else the first uploaded."),
    session: Session = Depends(get_session), registry: Registry = Depends(get_registry),
) -> FileResponse:
    """The bundle's bytes, with HTTP Range support so devices resume interrupted downloads.

    The ETag is the file's sha256, so ``If-Range`` only resumes against the same bytes.
    """
    mv = Registry.get(session, name, version, variant)
    path = registry.path(session, name, version, variant)
    # Give the connection back before the bytes go out: a slow download must not hold a pooled connection (and an
    # open transaction) for its whole duration — 15 concurrent downloads used to exhaust the pool (issue 9 sim).
    session.close()
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{mv.name}-{mv.version}.ewb" if mv.variant == "default" else f"{mv.name}-{mv.version}-{mv.variant}.ewb",
        headers={
            "ETag": f'"{mv.sha256}"',
            "X-Content-SHA256": mv.sha256,
            "Cache-Control": "public, max-age=31536000, immutable",
        },
    )
