"""The common TorchServe handler: per-request isolation, envelopes, device, settings.

:class:`CamserveHandler` replaces :meth:`BaseHandler.handle` because TorchServe's own flow decides
"explain or not" from the first request of the batch only and runs inference under
``torch.inference_mode``. Here every request of a batch is parsed and validated on its own; a
failing request gets its own 4xx (``context.set_response_status(code, phrase, idx)``) and a JSON
error, the others go through one batched engine call (:meth:`run_batch`, per subclass), and each
answer is wrapped in the request's own envelope (plain, KServe v1, KServe v2).

Extension points for other features: :meth:`parse` (request → items), :meth:`run_batch`
(items → per-item results), :meth:`after_batch` (called with every answered request, e.g. for an
audit log), and ``settings.extra`` (unknown ``handler:`` keys of ``model-config.yaml``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from ts.torch_handler.base_handler import BaseHandler

from .encode import dumps, envelope_body
from .errors import PHRASES, error_body, is_client_error, status_of
from .requests import IMAGE_FIELDS, ParsedRequest, is_json_part, parse_request
from .audit import AuditLog, record_answers
from .settings import HandlerSettings

logger = logging.getLogger(__name__)


def worker_device(gpu_id: Any) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA works, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class CamserveHandler(BaseHandler):
    """Base of the camserve handlers; subclasses implement :meth:`load` and :meth:`run_batch`."""

    payload_fields = IMAGE_FIELDS

    def initialize(self, context) -> None:
        props = context.system_properties
        self.manifest = context.manifest
        self.model_name = getattr(context, "model_name", None) or self.manifest["model"].get("modelName", "model")
        self.model_dir = props.get("model_dir") or "."
        self.device = worker_device(props.get("gpu_id"))
        self.map_location = self.device.type
        self.settings = HandlerSettings.from_model_config(getattr(context, "model_yaml_config", None))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.load(context)
        self.audit = AuditLog.from_config(self.settings.extra)  # opt-in: handler.audit_log (H6)
        self.initialized = True
        logger.info("camserve %s ready on %s with %s", type(self).__name__, self.device, self.settings)

    def artifact(self, name: Optional[str]) -> Optional[str]:
        """Absolute path of a file shipped in the archive (``None`` if absent)."""
        if not name:
            return None
        path = os.path.join(self.model_dir, name)
        return path if os.path.exists(path) else None

    def serialized_file(self) -> Optional[str]:
        return self.artifact(self.manifest.get("model", {}).get("serializedFile"))

    # -- to implement -------------------------------------------------------------------------
    def load(self, context) -> None:
        raise NotImplementedError

    def run_batch(self, requests: Sequence[Tuple[int, ParsedRequest]], context) -> Dict[int, Any]:
        """``{request index: list of per-item result dicts | Exception}`` for the parsed requests."""
        raise NotImplementedError

    def after_batch(self, answered: List[Tuple[int, ParsedRequest, Any]], context) -> None:
        """Hook called after a batch with ``(index, request, results or error)``; default: the audit
        log's records (one per explained image, queued for its writer thread) when it is on."""
        if getattr(self, "audit", None) is not None:
            record_answers(self.audit, self, answered, context)

    # -- TorchServe entry point ---------------------------------------------------------------
    def parse(self, index: int, row: Dict[str, Any], context) -> ParsedRequest:
        explain_route = str(self.header(context, index, "explain")) == "True"
        json_parts = [str(name).lower() for name in row if is_json_part(self.header(context, index, name))]
        return parse_request(row, self.payload_fields, json_parts, self.settings.max_instances, explain_route,
                             self.header_options(context, index))

    @staticmethod
    def header_options(context, index: int) -> Dict[str, str]:
        """Options sent as ``X-Camserve-<Name>: value`` headers (``X-Camserve-Explain: gradcam``)."""
        try:
            headers = context.get_all_request_header(index) or {}
        except (AttributeError, IndexError, KeyError, TypeError):
            return {}
        prefix = "x-camserve-"
        return {str(k)[len(prefix):].lower().replace("-", "_"): v for k, v in headers.items()
                if isinstance(k, str) and k.lower().startswith(prefix) and isinstance(v, str)}

    @staticmethod
    def header(context, index: int, name: str) -> Any:
        try:
            return context.get_request_header(index, name)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None

    def handle(self, data: List[Dict[str, Any]], context) -> List[str]:
        start = time.perf_counter()
        self.context = context
        outcomes: Dict[int, Any] = {}
        parsed: List[Tuple[int, ParsedRequest]] = []
        for index, row in enumerate(data):
            try:
                parsed.append((index, self.parse(index, row or {}, context)))
            except Exception as error:  # noqa: BLE001 - isolated per request
                outcomes[index] = self._guard(error)
        if parsed:
            outcomes.update(self.run_batch(parsed, context))
        requests = dict(parsed)
        answers: List[str] = []
        for index in range(len(data)):
            outcome = outcomes.get(index, RuntimeError("request was not answered"))
            try:
                context.set_response_content_type(index, "application/json")
            except Exception:  # noqa: BLE001 - no request processor (direct calls)
                pass
            if isinstance(outcome, Exception):
                status = status_of(outcome)
                phrase = getattr(outcome, "phrase", None) or PHRASES.get(status, "Error")
                context.set_response_status(status, phrase, idx=index)
                answers.append(dumps(error_body(outcome)))
            else:
                request = requests[index]
                answers.append(dumps(envelope_body(request.envelope, outcome, request.explain_route,
                                                   self.model_name, request.request_id)))
        try:
            self.after_batch([(i, requests.get(i), outcomes.get(i)) for i in range(len(data))], context)
        except Exception:  # noqa: BLE001 - hooks never fail the batch
            logger.warning("after_batch hook failed", exc_info=True)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return answers

    def prepare_all(self, requests: Sequence[Tuple[int, ParsedRequest]]) -> Tuple[List[Any], Dict[int, Any]]:
        """``self.prepare`` each request; a request that fails gets its error in ``outcomes`` and
        the others go on. Returns (prepared items of all good requests, outcomes)."""
        outcomes: Dict[int, Any] = {}
        items: List[Any] = []
        for index, request in requests:
            try:
                items.extend(self.prepare(index, request))
            except Exception as error:  # noqa: BLE001 - isolated per request
                outcomes[index] = self._guard(error)
        return items, outcomes

    @staticmethod
    def in_request_order(items: Sequence[Any], results: Dict[Tuple[int, int], Any],
                         outcomes: Dict[int, Any]) -> Dict[int, Any]:
        """``outcomes`` with each request not already answered (by an error) given the list of its
        items' ``results[(request, position)]``, in position order; items carry ``request`` and
        ``position``."""
        grouped: Dict[int, List[Tuple[int, Any]]] = defaultdict(list)
        for item in items:
            if item.request not in outcomes:
                grouped[item.request].append((item.position, results[(item.request, item.position)]))
        for index, entries in grouped.items():
            outcomes[index] = [result for _, result in sorted(entries, key=lambda e: e[0])]
        return outcomes

    @staticmethod
    def _guard(error: Exception) -> Exception:
        """Client errors stay as they are; anything else is logged and becomes a 500 for that request."""
        if not is_client_error(error):
            logger.error("unexpected error in a request", exc_info=error)
        return error
