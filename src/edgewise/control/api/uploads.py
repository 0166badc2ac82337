"""Receiving a signed file (a bundle, an agent release) as a raw body or a multipart field, spooled to disk.

One implementation for every upload route: the size limit is checked against the
declared length before a byte is read (and again by ``Registry.spool`` while
streaming), and only the content types a client can mean are accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile

from ..errors import ControlError, InvalidRequestError, UploadTooLargeError
from ..registry import Registry

UPLOAD_CHUNK = 1 << 20


class UnsupportedUploadError(ControlError):
    status_code = 415


def upload_body(what: str) -> dict:
    """The OpenAPI request body of an upload route (``what``: e.g. "A signed .ewb bundle")."""
    return {
        "requestBody": {
            "required": True,
            "description": f"{what}, as the raw body or as the multipart field `file`.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    }


async def receive_upload(request: Request, registry: Registry, *, what: str, suffix: str) -> Path:
    """Spool the uploaded ``what`` (e.g. "bundle", suffix ".ewb") to a temporary file; raise a clear error otherwise."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > registry.max_upload_bytes + 64 * 1024:
        raise UploadTooLargeError(
            f"upload of {int(declared)} bytes exceeds the {registry.max_upload_bytes // 2**20} MB limit; "
            f"raise max_upload_mb in the server settings if this {what} is legitimate"
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=5)
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise InvalidRequestError(f"multipart upload needs the {what} in a field named 'file'")
            return await registry.spool(_read_upload(file))
        finally:
            await form.close()
    if ctype in ("application/octet-stream", "application/zip", ""):
        return await registry.spool(request.stream())
    raise UnsupportedUploadError(
        f"Content-Type {ctype!r} is not accepted: send the {suffix} as application/octet-stream "
        "or as multipart/form-data field 'file'"
    )


async def _read_upload(file: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(UPLOAD_CHUNK):
        yield chunk
