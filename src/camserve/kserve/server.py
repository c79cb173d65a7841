"""KServe's model server for camserve: its FastAPI app, routes and health, on the host you choose.

:class:`CamserveModelServer` is ``kserve.ModelServer`` with four changes, each small:

* **Host**: KServe binds ``0.0.0.0``; here the host is a parameter (``127.0.0.1`` by default, the
  container passes ``0.0.0.0``). gRPC is off (camserve answers JSON).
* **Raw bodies** (:class:`CamserveDataPlane`): a JSON body reaches the model as bytes, so the
  handlers' own bounded JSON parsing and error messages apply (KServe would parse it with orjson
  first); bodies larger than ``max_request_bytes`` are a 413 (TorchServe's ``max_request_size``).
  ``:explain`` answers carry only the model's headers (KServe's dataplane echoes the request's).
* **v2 routes**: ``POST /v2/models/{name}/infer`` (and ``/explain``, which TorchServe also has) read
  the raw body and call the same dataplane → ``model(...)`` path as the v1 routes; KServe's own
  ``/infer`` would first validate and re-encode the body with its pydantic model, so TorchServe's
  answers and 400 messages could not be reproduced. Registered ahead of KServe's, same paths.
* **Per-request status**: :class:`~camserve.kserve.predictor.CamserveReply` → the handler's status,
  JSON body and headers (``Retry-After`` for a 503).

Everything else is KServe's: ``/`` and ``/v2/health/live`` (liveness), ``/v2/health/ready`` and
``/v1/models/{name}``, ``/v2/models/{name}/ready`` (readiness: the model loaded and its batcher
alive), ``/v2/models/{name}`` (metadata), ``/metrics`` (Prometheus: KServe's request histograms and
camserve's series, see :mod:`camserve.kserve.metrics`), the v1 ``:predict`` / ``:explain`` routes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional

from cloudevents.sdk.converters.util import has_binary_headers
from fastapi import Request, Response
from kserve import ModelServer
from kserve.model import InferenceVerb
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from camserve.kserve.predictor import DEFAULT_MAX_REQUEST_BYTES, CamserveReply, error_reply

logger = logging.getLogger(__name__)


class CamserveDataPlane(DataPlane):
    """KServe's dataplane, passing request bodies through unparsed (see the module docstring)."""

    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES

    def decode(self, body, headers, protocol_version: str = "v1", model_name: str = None):
        if isinstance(body, (bytes, bytearray)):
            if len(body) > self.max_request_bytes:
                raise error_reply(413, "RequestTooLargeError",
                                  f"request body of {len(body)} bytes; this server accepts at most "
                                  f"{self.max_request_bytes} bytes (--max-request-mb)")
            if not (headers and has_binary_headers(headers)):  # a binary CloudEvent: KServe's decoding
                return bytes(body), {}
        return super().decode(body, headers, protocol_version, model_name)

    async def infer(self, model_name: str, request, headers: Optional[Dict[str, str]] = None):
        response, response_headers = await super().infer(model_name, request, headers)
        response_headers.setdefault("content-type", "application/json")
        return response, response_headers

    async def explain(self, model_name: str, request, headers: Optional[Dict[str, str]] = None):
        model = await self.get_model(model_name)
        response, response_headers = await model(request, verb=InferenceVerb.EXPLAIN, headers=headers)
        response_headers = dict(response_headers or {})
        response_headers.setdefault("content-type", "application/json")
        return response, response_headers


async def reply_handler(_request: Request, reply: CamserveReply) -> Response:
    headers = {k: v for k, v in reply.headers.items() if k.lower() not in ("content-type", "content-length")}
    return Response(content=reply.body, status_code=reply.status, headers=headers,
                    media_type=reply.headers.get("content-type", "application/json"))


def register_routes(app, dataplane: CamserveDataPlane) -> None:
    """The v2 ``/infer`` and ``/explain`` routes (raw bodies) and the reply handler, on ``app``
    before KServe adds its own (the first matching route wins)."""
    from kserve.errors import ModelNotReady

    async def call(model_name: str, request: Request, verb: InferenceVerb) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        headers = dict(request.headers.items())
        body, _ = dataplane.decode(await request.body(), headers, "v2", model_name)
        run = dataplane.explain if verb == InferenceVerb.EXPLAIN else dataplane.infer
        response, response_headers = await run(model_name, body, headers)
        response_headers = {k: v for k, v in response_headers.items() if k.lower() != "content-length"}
        media_type = response_headers.pop("content-type", "application/json")
        return Response(content=response, headers=response_headers, media_type=media_type)

    async def v2_infer(model_name: str, request: Request) -> Response:
        return await call(model_name, request, InferenceVerb.PREDICT)

    async def v2_explain(model_name: str, request: Request) -> Response:
        return await call(model_name, request, InferenceVerb.EXPLAIN)

    for path, endpoint in (("/v2/models/{model_name}/infer", v2_infer),
                           ("/v2/models/{model_name}/explain", v2_explain),
                           ("/v2/models/{model_name}/versions/{model_version}/infer", v2_infer)):
        app.add_api_route(path, endpoint, methods=["POST"], response_model=None, include_in_schema=True)
    app.add_exception_handler(CamserveReply, reply_handler)


class CamserveModelServer(ModelServer):
    """``kserve.ModelServer`` on a chosen host, with camserve's dataplane and v2 routes, one process."""

    def __init__(self, http_port: int, host: str = "127.0.0.1", max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 grace_period: int = 30, **kwargs):
        kwargs.setdefault("enable_grpc", False)
        kwargs.setdefault("workers", 1)
        kwargs.setdefault("enable_docs_url", False)
        super().__init__(http_port=http_port, grace_period=grace_period, **kwargs)
        self.host = host
        self.dataplane = CamserveDataPlane(model_registry=self.registered_models)
        self.dataplane.max_request_bytes = int(max_request_bytes)

    def start(self, models: List) -> None:
        from kserve import model_server

        if self.workers != 1:
            raise ValueError("camserve's KServe predictor runs one process per replica (workers=1); "
                             "scale with replicas")
        self._register_and_check_atleast_one_model_is_ready(models)
        register_routes(model_server.app, self.dataplane)
        self._rest_server = RESTServer(
            "kserve.model_server:app", self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        self._rest_server.config.host = self.host  # KServe hard-codes 0.0.0.0
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        logger.info("camserve KServe predictor on http://%s:%d (models: %s)", self.host, self.http_port,
                    ", ".join(m.name for m in models))
        asyncio.run(self._serve())
