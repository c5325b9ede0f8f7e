"""The try page: upload one radiograph and see what the model makes of it; nothing is kept.

The form is parsed in memory: Starlette's own parser spills a file over 1 MB to a temporary
file, which would put the upload on the node's disk; this one keeps it in the request's
memory and stops reading past the size limit. The picture goes back inside the page (a
``data:`` URL), so no URL, cache or file holds it afterwards.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, Awaitable, Callable

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from dicomai.model.grading import Grade
from dicomai.web.auth import csrf_refused
from dicomai.web.demo import MAX_UPLOAD_BYTES, Demo, DemoResult, UploadError
from dicomai.web.pages import Endpoint, render
from dicomai.web.state import Console, account_of

__all__ = ["read_upload", "try_page", "try_upload"]

log = structlog.get_logger("dicomai.web")

_FORM_SLACK = 64 * 1024  # the form's other fields and the multipart framing around the file


async def _limited(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise UploadError(_too_large(limit - _FORM_SLACK), 413)
        yield chunk


def _too_large(limit: int) -> str:
    size = f"{limit / 2**20:.0f} MB" if limit >= 2**20 else f"{limit / 1024:.0f} KB"
    return f"the file is larger than {size}, the most the try page takes"


async def read_upload(request: Request, limit: int) -> FormData:
    """The request's multipart form, its file in memory; UploadError past ``limit`` bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError("send the file with the try page's form (multipart/form-data)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + _FORM_SLACK:
        raise UploadError(_too_large(limit), 413)
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit + _FORM_SLACK),
                             max_files=1, max_fields=4)
    parser.spool_max_size = limit + _FORM_SLACK  # never rolled over to a temporary file
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise UploadError(f"the upload is malformed: {exc.message}") from None


def try_page(console: Console) -> Endpoint:
    def endpoint(request: Request) -> Response:
        return _page(console, request, None, None, 200)

    return endpoint


def _page(console: Console, request: Request, result: DemoResult | None, error: str | None,
          status: int) -> Response:
    picture = None
    if result is not None and result.picture is not None:
        picture = "data:image/png;base64," + base64.b64encode(result.picture).decode("ascii")
    limit = console.demo.max_bytes if console.demo else MAX_UPLOAD_BYTES
    return render(console, request, "try.html", status, available=console.demo is not None, result=result,
                  picture=picture, error=error, max_bytes=limit, max_mb=round(limit / 2**20))


def try_upload(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """Analyse an uploaded DICOM, PNG or JPEG file (CSRF-checked), as the node would grade it."""

    async def endpoint(request: Request) -> Response:
        demo: Demo | None = console.demo
        if demo is None:
            return _page(console, request, None, "No model is loaded on this node.", 503)
        try:
            form = await read_upload(request, demo.max_bytes)
        except UploadError as exc:
            return _page(console, request, None, str(exc), exc.status)
        try:
            refused = csrf_refused(console, request, form)
            if refused is not None:
                return refused
            upload = form.get("file")
            if not isinstance(upload, UploadFile) or not upload.filename:
                return _page(console, request, None, "Choose a file to upload.", 400)
            data = await upload.read()
        finally:
            await form.close()
        try:
            result = await run_in_threadpool(demo.analyse, data)
        except UploadError as exc:
            return _page(console, request, None, str(exc), exc.status)
        # Neither the file's name nor its contents: either may name the patient.
        log.info("web.try", user=account_of(request).name, kind=str(result.kind), grade=str(result.grade),
                 seconds=round(result.seconds, 3))
        return _page(console, request, result, None, 422 if result.grade == Grade.FAILED else 200)

    return endpoint
