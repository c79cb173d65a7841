"""A camserve handler outside TorchServe: what to serve, and driving the handler as a worker does.

The KServe predictor (:mod:`camserve.kserve.predictor`) and ``camserve view``'s in-process mode both
run the TorchServe handlers without TorchServe's frontend. What they share lives here, with no
KServe import:

- :class:`ModelSetup` — TorchServe's view of an archive (name, task, model-config, manifest, model
  dir), read by :func:`setup_from_mar` (a ``.mar``, unpacked) or :func:`setup_from_spec` (a model
  spec and a model-config mapping, paths made absolute);
- :func:`task_of` / :func:`handler_class` — which handler serves it (classifier or embedding model);
- :func:`gpu_id_for` — a ``--device`` choice as TorchServe's ``gpu_id``;
- :func:`worker_context` — TorchServe's own ``ts.context.Context`` for a batch;
- :class:`Reply` and :func:`handle_rows` — one ``handler.handle(rows, context)`` call, as a TorchServe
  worker makes it (a ``RequestProcessor`` with each request's headers), and each request's status,
  JSON body and response headers back.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import yaml
from ts.context import Context, RequestProcessor

from camserve.serving.base import CamserveHandler
from camserve.serving.classifier import ImageClassifierHandler
from camserve.serving.embedding import EmbeddingHandler

#: model-config keys (TorchServe's) read here, and their defaults (the archives')
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_DELAY_MS = 100
#: the ``server_version`` a handler sees in its context
SERVER_VERSION = "camserve-kserve"


@dataclass
class ModelSetup:
    """What one in-process handler serves: TorchServe's view of an archive (name, manifest, model dir,
    config); ``cleanup``: an unpacked archive to remove at exit."""

    name: str
    task: str
    config: Dict[str, Any]
    manifest: Dict[str, Any]
    model_dir: str
    cleanup: Optional[str] = None

    @property
    def batch_size(self) -> int:
        """``batchSize`` of the model-config (default 8)."""
        return int(self.config.get("batchSize") or DEFAULT_BATCH_SIZE)

    @property
    def max_batch_delay_ms(self) -> float:
        """``maxBatchDelay`` of the model-config in ms (default 100)."""
        value = self.config.get("maxBatchDelay")
        return float(DEFAULT_MAX_BATCH_DELAY_MS if value is None else value)


def task_of(config: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    """``classify`` or ``embed``: the spec's ``task``, else the archive handler file's name."""
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


def handler_class(task: str) -> Type[CamserveHandler]:
    """The handler that serves a model of ``task``."""
    if task == "embed":
        return EmbeddingHandler
    return ImageClassifierHandler


def gpu_id_for(device: str) -> Optional[int]:
    """``auto``: GPU 0 when CUDA works; ``cpu``: none; ``cuda`` / ``cuda:N``: that GPU."""
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


def worker_context(setup: ModelSetup, batch_size: int, gpu_id: Optional[int], metrics: Any = None) -> Context:
    """TorchServe's context for ``initialize`` or one batch: model name, dir, manifest, config, GPU
    and a metrics sink (``None``: the handlers record no metrics)."""
    return Context(setup.name, setup.model_dir, setup.manifest, batch_size, gpu_id, SERVER_VERSION,
                   metrics=metrics, model_yaml_config=setup.config)


@dataclass
class Reply:
    """One request's answer from the handler: HTTP status and phrase, body (JSON text), headers."""

    status: int
    phrase: str
    body: str
    headers: Dict[str, str]


def handle_rows(handler: CamserveHandler, setup: ModelSetup, gpu_id: Optional[int],
                requests: Sequence[Tuple[Dict[str, Any], Dict[str, Any], str]], metrics: Any = None) -> List[Reply]:
    """One ``handle`` call for a batch of ``(row, request headers, request id)``, as a TorchServe
    worker makes it; each request's :class:`Reply` in order."""
    context = worker_context(setup, len(requests), gpu_id, metrics)
    context.request_processor = [RequestProcessor(headers) for _row, headers, _id in requests]
    context.request_ids = {n: request_id for n, (_row, _headers, request_id) in enumerate(requests)}
    answers = handler.handle([row for row, _headers, _id in requests], context)
    replies = []
    for n, answer in enumerate(answers):
        status, phrase = context.get_response_status(n)
        response_headers = {str(k).lower(): str(v) for k, v in context.get_response_headers(n).items()}
        response_headers.setdefault("content-type", "application/json")
        replies.append(Reply(int(status or 200), phrase or "", answer, response_headers))
    return replies
