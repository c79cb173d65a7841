"""The view's ASGI app (Starlette): the page, the model's description and one route that explains.

Routes:

- ``GET /`` — the page (:data:`camserve.view.page.PAGE`; everything inline, nothing external);
- ``GET /api/model`` — the model's :class:`~camserve.view.backend.ModelInfo` as JSON (methods, layers,
  task), which the page builds its checkboxes from;
- ``POST /api/explain`` — a multipart form (``image``, ``reference``, ``method``…, ``layer``…,
  ``layers``, ``target``, ``topk``, ``gallery``): the requests of :meth:`Choices.plan` answered by the
  backend (in a worker thread), laid out by :func:`~camserve.view.results.page_json`.

Every refusal is JSON ``{"error": {"status", "message"}}`` with a 4xx status (502 when the server
behind the view did not answer, 500 for a fault of the view itself), and the app keeps serving.
``allowed_hosts`` (the loopback names when bound to loopback) refuses requests for other host names,
so a web page elsewhere cannot reach the view through DNS rebinding.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from camserve.client import CamserveError
from camserve.view.backend import Backend, ModelInfo
from camserve.view.choices import Choices
from camserve.view.errors import ViewError
from camserve.view.page import PAGE
from camserve.view.results import page_json

logger = logging.getLogger(__name__)

#: the largest image (and reference) the page may upload
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: the host names a loopback-bound view answers to
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


async def _upload(form: FormData, name: str) -> Optional[bytes]:
    """A file field's bytes (``None`` when absent or empty); a text value or a file too large → 4xx."""
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, UploadFile):
        raise ViewError(400, f"{name!r} must be a file upload")
    if value.size is not None and value.size > MAX_UPLOAD_BYTES:
        raise ViewError(413, f"{name} is {value.size / 2**20:.1f} MiB; the view takes up to "
                             f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    data = await value.read()
    return data or None


def build_app(backend: Backend, allowed_hosts: Optional[Sequence[str]] = None) -> Starlette:
    """The view for ``backend`` (the caller closes it); ``allowed_hosts``: the Host names it answers
    (``None``: any)."""

    def describe() -> ModelInfo:
        try:
            return backend.describe()
        except CamserveError as error:
            status = error.status if error.status is not None and 400 <= error.status < 600 else 502
            raise ViewError(status, f"the model could not be described: {error.message}") from None

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def model(request: Request) -> Response:
        return JSONResponse((await run_in_threadpool(describe)).to_json())

    async def explain(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ViewError(415, "send the image as a multipart form (field 'image')")
        info = await run_in_threadpool(describe)
        try:
            async with request.form(max_part_size=MAX_UPLOAD_BYTES) as form:
                fields: Dict[str, List[str]] = {}
                for key, value in form.multi_items():
                    if isinstance(value, str):
                        fields.setdefault(key, []).append(value)
                image, reference = await _upload(form, "image"), await _upload(form, "reference")
        except HTTPException as error:  # a malformed multipart body
            raise ViewError(error.status_code, f"the form could not be read: {error.detail}") from None
        choices = Choices.from_form(info, fields, image, reference)
        planned = choices.plan()
        outcomes = await run_in_threadpool(backend.answer, [p.query for p in planned])
        return JSONResponse(page_json(choices, planned, outcomes))

    async def refused(request: Request, error: ViewError) -> Response:
        return JSONResponse(error.to_json(), status_code=error.status)

    async def failed(request: Request, error: Exception) -> Response:
        logger.exception("camserve view: %s %s failed", request.method, request.url.path, exc_info=error)
        body = ViewError(500, f"the view failed: {type(error).__name__}: {error}").to_json()
        return JSONResponse(body, status_code=500)

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))] if allowed_hosts else []
    routes = [Route("/", page), Route("/api/model", model), Route("/api/explain", explain, methods=["POST"])]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ViewError: refused, Exception: failed})
