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

:func:`setup_from_mar` / :func:`setup_from_spec` read what to serve: a TorchServe ``.mar`` (its
manifest, ``model-config.yaml`` and files, unpacked), or a model spec (``camserve archive``'s flags
or a ``model-config.yaml``) with the working directory as the base for relative paths.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import kserve
import yaml

from camserve.kserve.batcher import MicroBatcher
from camserve.kserve.metrics import PrometheusSink
from camserve.serving.encode import dumps
from camserve.serving.embedding import EmbeddingHandler
from camserve.serving.classifier import ImageClassifierHandler

logger = logging.getLogger(__name__)

#: model-config keys (TorchServe's) the predictor reads, and their defaults (the archives')
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_DELAY_MS = 100
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
class ModelSetup:
    """What one predictor serves: TorchServe's view of an archive (name, manifest, model dir, config)."""

    name: str
    task: str
    config: Dict[str, Any]
    manifest: Dict[str, Any]
    model_dir: str
    cleanup: Optional[str] = None  # an unpacked archive to remove at exit

    @property
    def batch_size(self) -> int:
        return int(self.config.get("batchSize") or DEFAULT_BATCH_SIZE)

    @property
    def max_batch_delay_ms(self) -> float:
        value = self.config.get("maxBatchDelay")
        return float(DEFAULT_MAX_BATCH_DELAY_MS if value is None else value)


def task_of(config: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    model = ((config.get("handler") or {}).get("model") or {})
    if model.get("task"):
        return str(model["task"])
    handler = str((manifest.get("model") or {}).get("handler") or "")
    return "embed" if "embed" in os.path.basename(handler) else "classify"


def setup_from_mar(path: str, name: Optional[str] = None) -> ModelSetup:
    """Unpack a TorchServe archive as TorchServe does (its files become the model dir)."""
    target = tempfile.mkdtemp(prefix="camserve-kserve-mar-")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(target)
    manifest_file = Path(target) / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {"model": {}}
    config_name = (manifest.get("model") or {}).get("configFile")
    config: Dict[str, Any] = {}
    if config_name and (Path(target) / config_name).exists():
        config = yaml.safe_load((Path(target) / config_name).read_text()) or {}
    model_name = name or (manifest.get("model") or {}).get("modelName") or Path(path).stem
    manifest.setdefault("model", {})["modelName"] = model_name
    return ModelSetup(model_name, task_of(config, manifest), config, manifest, target, cleanup=target)


def setup_from_spec(spec, config: Dict[str, Any], name: Optional[str] = None,
                    model_dir: Optional[str] = None) -> ModelSetup:
    """A model spec (file paths relative to the working directory, as ``camserve archive`` reads
    them) and a model-config mapping (TorchServe keys + ``handler:``); the spec becomes
    ``handler.model`` with absolute paths."""
    from dataclasses import replace

    absolute = {k: os.path.abspath(v) for k, v in (("weights", spec.weights), ("model_file", spec.model_file),
                                                   ("labels", spec.labels), ("path", spec.path)) if v}
    spec = replace(spec, **absolute)
    config = copy.deepcopy(dict(config or {}))
    handler = dict(config.get("handler") or {})
    handler["model"] = spec.to_mapping()
    config["handler"] = handler
    model_name = name or spec.arch or spec.class_name or ("effnet_lite0" + ("_embed" if spec.task == "embed" else ""))
    manifest = {"model": {"modelName": model_name, "modelVersion": "1.0"}}
    return ModelSetup(model_name, spec.task, config, manifest, os.path.abspath(model_dir or os.getcwd()))


def _handler_class(task: str):
    if task == "embed":
        return EmbeddingHandler

    return ImageClassifierHandler


def _gpu_id(device: str) -> Optional[int]:
    """``auto``: GPU 0 when CUDA works; ``cpu``: none; ``cuda`` / ``cuda:N``: that GPU."""
    import torch

    device = (device or "auto").lower()
    if device == "cpu":
        return None
    if device == "auto":
        return 0 if torch.cuda.is_available() else None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine")
        return int(device.split(":", 1)[1]) if ":" in device else 0
    raise SystemExit(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class Incoming:
    """One request for a batch: TorchServe's row and request headers for it."""

    row: Dict[str, Any]
    headers: Dict[str, Any]
    request_id: str
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Reply:
    status: int
    phrase: str
    body: str
    headers: Dict[str, str]


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
        from ts.context import Context

        s = self.setup
        return Context(s.name, s.model_dir, s.manifest, batch_size, self.gpu_id, "camserve-kserve",
                       metrics=self.sink, model_yaml_config=s.config)

    def load(self) -> bool:
        self.gpu_id = _gpu_id(self.device_choice)
        handler = _handler_class(self.setup.task)()
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
        from ts.context import RequestProcessor

        context = self.context(len(batch))
        context.request_processor = [RequestProcessor(i.headers) for i in batch]
        context.request_ids = {n: i.request_id for n, i in enumerate(batch)}
        answers = self.handler.handle([i.row for i in batch], context)
        replies = []
        for n, answer in enumerate(answers):
            status, phrase = context.get_response_status(n)
            response_headers = {str(k).lower(): str(v) for k, v in context.get_response_headers(n).items()}
            response_headers.setdefault("content-type", "application/json")
            replies.append(Reply(int(status or 200), phrase or "", answer, response_headers))
        return replies
