"""/api/v1: enrollment tokens, device enrollment, revocation, the fleet CA certificate and CRL.

Access: creating and listing enrollment tokens needs ``operator``; revoking a device needs
``admin``; ``POST /enroll`` is public because the enrollment token in its body is the credential;
the CA certificate and the CRL are public (they are meant to be distributed).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from .. import provisioning as prov
from ..auth import ADMIN, OPERATOR, PUBLIC, VIEWER_OR_OWN_DEVICE, current_principal
from ..errors import ControlError
from ..services import ControlServices
from .deps import get_services, get_session

router = APIRouter(tags=["provisioning"])


class EnrollmentTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field(default_factory=list, description="Tags the enrolled device gets.")
    ttl_s: float = Field(default=prov.DEFAULT_TOKEN_TTL.total_seconds(), gt=0,
                         le=prov.MAX_TOKEN_TTL.total_seconds(), description="Lifetime in seconds (default 24 h).")
    device_id: str | None = Field(default=None, description="If set, only this device id may enroll with the token.")


class EnrollmentTokenOut(BaseModel):
    id: int
    prefix: str
    tags: list[str]
    device_id: str | None
    created_at: datetime
    created_by: str | None
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None


class EnrollmentTokenCreated(EnrollmentTokenOut):
    token: str = Field(description="The secret, shown only now: give it to the device (edgewise device enroll --token).")


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    device_id: str = Field(min_length=1, max_length=64)
    csr: str = Field(min_length=1, max_length=16_384, description="PEM certificate request, CN = device_id, ECDSA P-256.")


class EnrollResponse(BaseModel):
    device_id: str
    certificate: str
    ca_certificate: str
    broker_url: str
    device_token: str
    tags: list[str]
    serial: str
    not_after: str
    tuf_root: str | None = Field(default=None, description="The current TUF root metadata (JSON): the device's update trust anchor.")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=256)


class RevokeResponse(BaseModel):
    device_id: str
    serials: list[str]
    tokens_revoked: int
    broker_reloaded: bool


class CertificateOut(BaseModel):
    serial: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None


def _provisioning(services: ControlServices = Depends(get_services)) -> prov.Provisioning:
    p = services.provisioning
    if p is None:
        raise ControlError("provisioning is not configured on this control plane")
    return p


def _token_out(row: object, **extra: object) -> dict[str, object]:
    fields = EnrollmentTokenOut.model_fields
    return {**{k: getattr(row, k) for k in fields}, **extra}


@router.post("/enrollment-tokens", response_model=EnrollmentTokenCreated, status_code=status.HTTP_201_CREATED,
             dependencies=[OPERATOR])
def create_enrollment_token(body: EnrollmentTokenCreate, request: Request, session: Session = Depends(get_session)) -> dict[str, object]:
    """A single-use enrollment token (the secret is in this response only)."""
    who = current_principal(request)
    created = prov.create_enrollment_token(
        session, ttl=timedelta(seconds=body.ttl_s), tags=body.tags, device_id=body.device_id,
        created_by=f"{who.kind}:{who.name}" if who.name else who.kind,
    )
    return _token_out(created.row, token=created.token)


@router.get("/enrollment-tokens", response_model=list[EnrollmentTokenOut], dependencies=[OPERATOR])
def list_enrollment_tokens(session: Session = Depends(get_session)) -> list[dict[str, object]]:
    """Every enrollment token (never the secret): who made it, when it expires, who used it."""
    return [_token_out(r) for r in prov.list_enrollment_tokens(session)]


@router.post("/enroll", response_model=EnrollResponse, status_code=status.HTTP_201_CREATED, dependencies=[PUBLIC],
             responses={401: {"description": "Unknown token."}, 403: {"description": "Token bound to another device."},
                        409: {"description": "Token already used."}, 410: {"description": "Token expired."},
                        422: {"description": "Malformed CSR, bad signature, or CN is not the device id."}})
def enroll(body: EnrollRequest, session: Session = Depends(get_session),
           p: prov.Provisioning = Depends(_provisioning),
           services: ControlServices = Depends(get_services)) -> EnrollResponse:
    """A device exchanges its enrollment token and CSR for a client certificate, the CA, the broker URL and a device token."""
    e = prov.enroll(session, p, token=body.token, device_id=body.device_id, csr_pem=body.csr)
    tuf = services.tuf
    return EnrollResponse(
        device_id=e.device_id, certificate=e.certificate_pem, ca_certificate=e.ca_certificate_pem, broker_url=e.broker_url,
        device_token=e.device_token, tags=e.tags, serial=e.serial, not_after=e.not_after,
        tuf_root=tuf.current_root_json().decode() if tuf is not None else None,
    )


@router.post("/devices/{device_id}/revoke", response_model=RevokeResponse, dependencies=[ADMIN])
def revoke_device(device_id: str, body: RevokeRequest | None = None, session: Session = Depends(get_session),
                  p: prov.Provisioning = Depends(_provisioning)) -> RevokeResponse:
    """Revoke the device's certificates (CRL rewritten, broker reloaded) and its API tokens."""
    r = prov.revoke_device(session, p, device_id, reason=body.reason if body else "")
    return RevokeResponse(device_id=r.device_id, serials=r.serials, tokens_revoked=r.tokens_revoked,
                          broker_reloaded=r.broker_reloaded)


@router.get("/devices/{device_id}/certificates", response_model=list[CertificateOut], dependencies=[VIEWER_OR_OWN_DEVICE])
def device_certificates(device_id: str, session: Session = Depends(get_session)) -> list[CertificateOut]:
    return [CertificateOut.model_validate(c, from_attributes=True) for c in prov.device_certificates(session, device_id)]


@router.get("/ca.pem", dependencies=[PUBLIC], response_class=Response,
            responses={200: {"content": {"application/x-pem-file": {}}}})
def ca_certificate(p: prov.Provisioning = Depends(_provisioning)) -> Response:
    """The fleet CA certificate (compare its fingerprint out of band before trusting it)."""
    return Response(p.ca.certificate_pem, media_type="application/x-pem-file")


@router.get("/crl.pem", dependencies=[PUBLIC], response_class=Response,
            responses={200: {"content": {"application/x-pem-file": {}}}})
def crl(session: Session = Depends(get_session), p: prov.Provisioning = Depends(_provisioning)) -> Response:
    """The current certificate revocation list, signed by the fleet CA."""
    return Response(prov.current_crl(session, p.ca), media_type="application/x-pem-file")
