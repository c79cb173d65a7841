"""camserve as a KServe predictor: a ``kserve.Model`` that answers with the TorchServe handlers.

:class:`CamserveModel` holds one :class:`~camserve.serving.classifier.ImageClassifierHandler` or
:class:`~camserve.serving.embedding.EmbeddingHandler` and drives it exactly as a TorchServe worker
does — ``initialize(context)`` once, then ``handle(rows, context)`` per batch — with TorchServe's own
``ts.context.Context`` / ``RequestProcessor`` as the adapter: per request its row (``{"body": …}``,
as TorchServe's worker hands it), its headers (``explain: True`` for ``:explain``, ``X-Camserve-*``
options, the body's content type), its response status and headers, and a metrics sink
(:class:`~camserve.kserve.metrics.PrometheusSink`). Parsing, options, the batched engine call,
envelopes (plain, KServe v1, v2 named tensors) and errors are the handlers' — one request/response
layer for both servers, so the same request gets the same answer bytes.

KServe awaits ``predict``/``explain`` on its event loop; they enqueue the request in a
:class:`~camserve.kserve.batcher.MicroBatcher` (``batchSize`` / ``maxBatchDelay`` of the
model-config, like TorchServe's frontend) whose single engine thread runs ``handle`` for the batch.
A request the handler answers with a non-200 status raises :class:`CamserveReply`, which the server
(:mod:`camserve.kserve.server`) turns into that status and the handler's JSON error body.

:func:`~camserve.serving.local.setup_from_mar` / :func:`~camserve.serving.local.setup_from_spec` read
what to serve: a TorchServe ``.mar`` (its manifest, ``model-config.yaml`` and files, unpacked), or a
model spec (``camserve archive``'s flags or a ``model-config.yaml``) with the working directory as the
base for relative paths; they, the handler choice and the ``handle`` call live in
:mod:`camserve.serving.local` (no KServe import), which ``camserve view`` shares.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import kserve

from camserve.kserve.batcher import MicroBatcher
from camserve.kserve.metrics import PrometheusSink
from camserve.serving.encode import dumps
from camserve.serving.local import ModelSetup, Reply, gpu_id_for, handle_rows, handler_class, worker_context

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # TorchServe's max_request_size in config.properties


class CamserveReply(Exception):
    """A handler answer with a status other than 200: the server sends ``body`` with ``status``."""

    def __init__(self, status: int, body: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(f"{status}: {body[:200]}")
        self.status = int(status)
        self.body = body
        self.headers = dict(headers or {})


def error_reply(status: int, kind: str, message: str) -> CamserveReply:
    """A reply in the handlers' error format (``{"error": {"status", "type", "message"}}``)."""

    return CamserveReply(status, dumps({"error": {"status": status, "type": kind, "message": message}}),
                         {"content-type": "application/json"})


@dataclass
class Incoming:
    """One request for a batch: TorchServe's row and request headers for it."""

    row: Dict[str, Any]
    headers: Dict[str, Any]
    request_id: str
    arrived: float = field(default_factory=time.monotonic)


def looks_like_json(body: bytes, content_type: str) -> bool:
    """JSON content types, or a body that opens like JSON without an image/binary content type (a
    client that sent no content type, or curl's form default)."""
    content_type = (content_type or "").lower()
    if "json" in content_type:
        return True
    if content_type.startswith(("image/", "multipart/")):
        return False
    return body.lstrip()[:1] in (b"{", b"[")


def to_row(payload: Any, headers: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A request body as TorchServe's worker hands it to a handler: ``{"body": value}``, and the
    per-parameter header ``{"body": {"content-type": …}}`` beside the request headers (a JSON body
    stays bytes with a JSON content type, so the handlers' own bounded JSON parsing reads it)."""
    content_type = str(headers.get("content-type") or "")
    if isinstance(payload, (bytes, bytearray)):
        body = bytes(payload)
        part_type = "application/json" if looks_like_json(body, content_type) else (content_type or "application/octet-stream")
    elif hasattr(payload, "to_rest"):  # an InferRequest (KServe's own v2 route or gRPC)
        rest = payload.to_rest()
        body, part_type = (rest[0] if isinstance(rest, tuple) else rest), "application/json"
    else:  # a dict from a CloudEvent or a decoded body
        body, part_type = payload, "application/json"
    request_headers: Dict[str, Any] = {str(k).lower(): v for k, v in (headers or {}).items()}
    request_headers["body"] = {"content-type": part_type}
    return {"body": body}, request_headers


class CamserveModel(kserve.Model):
    """One camserve model on KServe's model server (see the module docstring)."""

    def __init__(self, setup: ModelSetup, device: str = "auto", batch_size: Optional[int] = None,
                 max_batch_delay_ms: Optional[float] = None):
        super().__init__(setup.name)
        self.setup = setup
        self.device_choice = device
        self.max_batch_size = int(batch_size or setup.batch_size)
        self.max_delay_s = float(setup.max_batch_delay_ms if max_batch_delay_ms is None else max_batch_delay_ms) / 1000.0
        self.sink = PrometheusSink(setup.name)
        self.handler = None
        self.gpu_id: Optional[int] = None
        self.batcher: Optional[MicroBatcher] = None

    # -- TorchServe's context -------------------------------------------------------------
    def context(self, batch_size: int):
        return worker_context(self.setup, batch_size, self.gpu_id, self.sink)

    def load(self) -> bool:
        self.gpu_id = gpu_id_for(self.device_choice)
        handler = handler_class(self.setup.task)()
        handler.initialize(self.context(self.max_batch_size))
        module = getattr(handler, "model", None)
        if hasattr(module, "register_forward_pre_hook"):
            module.register_forward_pre_hook(self.sink.forward)
        self.handler = handler
        self.batcher = MicroBatcher(self.run_batch, self.max_batch_size, self.max_delay_s,
                                    on_batch=self.sink.batch)
        logger.info("camserve %s (%s) ready on %s: batches of ≤ %d, ≤ %.0f ms delay", self.name,
                    type(handler).__name__, handler.device, self.max_batch_size, self.max_delay_s * 1000)
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        return bool(self.ready and self.batcher is not None and self.batcher.alive)

    def stop(self):
        if self.batcher is not None:
            self.batcher.close()
        if self.setup.cleanup:
            shutil.rmtree(self.setup.cleanup, ignore_errors=True)
        super().stop()

    # -- metadata (v2 /models/<name>) --------------------------------------------------------
    def get_input_types(self) -> List[Dict]:
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        if self.setup.task == "embed":
            inputs += [{"name": "reference", "datatype": "BYTES", "shape": [-1]},
                       {"name": "reference_embedding", "datatype": "FP32", "shape": [-1, -1]}]
        return inputs

    def get_output_types(self) -> List[Dict]:
        return [{"name": "scores" if self.setup.task == "classify" else "embedding", "datatype": "FP32",
                 "shape": [-1, -1]}]

    # -- requests ---------------------------------------------------------------------------
    async def predict(self, payload, headers: Optional[Dict[str, str]] = None, response_headers=None):
        return await self.answer(payload, headers or {}, explain=False)

    async def explain(self, payload, headers: Optional[Dict[str, str]] = None):
        return await self.answer(payload, headers or {}, explain=True)

    async def answer(self, payload: Any, headers: Dict[str, str], explain: bool) -> str:
        row, request_headers = to_row(payload, headers)
        if explain:
            request_headers["explain"] = "True"  # what TorchServe's :explain routes set
        request_id = str(headers.get("x-request-id") or uuid.uuid4())
        self.sink.set_queued(self.batcher.pending + 1)
        reply: Reply = await self.batcher.submit(Incoming(row, request_headers, request_id))
        self.sink.set_queued(self.batcher.pending)
        if reply.status != 200:
            raise CamserveReply(reply.status, reply.body, reply.headers)
        return reply.body

    def run_batch(self, batch: List[Incoming]) -> List[Reply]:
        """In the engine thread: one ``handle`` call, as a TorchServe worker makes it."""
        return handle_rows(self.handler, self.setup, self.gpu_id, [(i.row, i.headers, i.request_id) for i in batch],
                           self.sink)
