"""The common TorchServe handler: per-request isolation, envelopes, device, settings.

:class:`CamserveHandler` replaces :meth:`BaseHandler.handle` because TorchServe's own flow decides
"explain or not" from the first request of the batch only and runs inference under
``torch.inference_mode``. Here every request of a batch is parsed and validated on its own; a
failing request gets its own 4xx (``context.set_response_status(code, phrase, idx)``) and a JSON
error, the others go through one batched engine call (:meth:`run_batch`, per subclass), and each
image's typed answer (:mod:`camserve.serving.answer`) is written in the request's own envelope
(plain, KServe v1, KServe v2).

Extension points for other features: :meth:`parse` (request → items), :meth:`run_batch`
(items → per-item results), :meth:`after_batch` (called with every answered request, e.g. for an
audit log), and ``settings.extra`` (unknown ``handler:`` keys of ``model-config.yaml``).

**Server faults stay inside their request.** :meth:`CamserveHandler.run_isolated` runs a batched
engine call and, when it raises (an unexpected exception, an out-of-memory error, or an input error
the per-request validation missed), splits the batch's requests in two halves and runs each again,
recursively, so only the request(s) that fail on their own get the error (a 500 with its message, or
the error's own 4xx); after an out-of-memory error it frees the device's cached memory before the
retry, and a single request that ran out of memory is retried once more after that. ``handle`` uses
the same helper around :meth:`run_batch` itself, so a fault outside the engine call is isolated too.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from ts.torch_handler.base_handler import BaseHandler

from camserve.engine.timing import clock
from camserve.serving.encode import answer_limit, dumps, envelope_body
from camserve.serving.errors import PHRASES, AnswerTooLargeError, RequestError, error_body, is_client_error, status_of
from camserve.ops.metrics import record_counters
from camserve.serving.protocol import IMAGE_FIELDS
from camserve.serving.requests import ParsedRequest, is_json_part, parse_request
from camserve.ops.audit import AuditLog, record_answers
from camserve.ops.process import tune_malloc
from camserve.serving.settings import HandlerSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_FRACTION = 0.8  # a failed batch's retries must end within this part of responseTimeout


def settings_id(model_config: Any) -> str:
    """What the records call the archive's settings: the first 12 hex digits of the SHA-256 of the
    ``handler:`` section of ``model-config.yaml`` as canonical JSON (the same settings, the same id)."""
    handler = (model_config or {}).get("handler") or {}
    text = json.dumps(handler, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class BatchFailedError(RuntimeError):
    """A request of a failed batch that could not be retried on its own before the response timeout
    (HTTP 500; the message names the batch's error)."""


class BatchBudgetExceededError(RequestError):
    """The request is valid but this batch's work budget (``handler.captum.max_batch_evaluations``) is
    spent by the requests before it: answered 503 with ``Retry-After``; sent again it lands in a later
    batch. (A request that alone exceeds a cap is a 400 instead.)"""

    status = 503
    phrase = "Service Unavailable"
    retry_after_s = 1


def is_out_of_memory(error: BaseException) -> bool:
    """A device or host allocation failure (``torch.OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError``)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def free_device_memory(device: Optional[torch.device]) -> None:
    """Drop unreachable tensors and, on CUDA, return the caching allocator's free blocks (after an
    out-of-memory error, before a retry)."""
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def worker_device(gpu_id: Any) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA works, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class CamserveHandler(BaseHandler):
    """Base of the camserve handlers; subclasses implement :meth:`load` and :meth:`run_batch`."""

    payload_fields = IMAGE_FIELDS

    def initialize(self, context) -> None:
        tune_malloc()  # glibc: large tensors mmap-ed, heap trimmed, 2 arenas (ops/process.py, docs/operations.md)
        props = context.system_properties
        self.manifest = context.manifest
        self.model_name = getattr(context, "model_name", None) or self.manifest["model"].get("modelName", "model")
        self.model_dir = props.get("model_dir") or "."
        self.device = worker_device(props.get("gpu_id"))
        self.map_location = self.device.type
        self.settings = HandlerSettings.from_model_config(getattr(context, "model_yaml_config", None))
        # fault retries stop in time for the frontend's responseTimeout (model-config.yaml, default 120 s)
        self.retry_window_s = RETRY_FRACTION * float((getattr(context, "model_yaml_config", None) or {})
                                                     .get("responseTimeout", 120))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.load(context)
        self.audit = AuditLog.from_config(self.settings.extra)  # opt-in: handler.audit_log (H6)
        self.settings_id = settings_id(getattr(context, "model_yaml_config", None))
        self.initialized = True
        logger.info("camserve %s ready on %s with %s", type(self).__name__, self.device, self.settings)

    @property
    def summarising(self) -> bool:
        """Whether answers carry their maps' summaries (:mod:`camserve.engine.imaging.summary`): when the
        audit log records them."""
        return getattr(self, "audit", None) is not None

    # -- fault isolation ----------------------------------------------------------------------
    def run_isolated(self, items: Sequence[T], run: Callable[[List[T]], Dict[Any, Any]],
                     request_of: Callable[[T], int] = lambda item: item.request,
                     deadline: Optional[float] = None) -> Tuple[Dict[Any, Any], Dict[int, Exception]]:
        """``run(items)`` for a batch, isolating failures to the requests that cause them.

        ``run`` takes a list of items (each belonging to the request ``request_of(item)``) and returns
        its results as a dict. If it raises, the items are split by request into two halves and each
        half runs again (recursively): requests that succeed alongside others are answered, a request
        that fails on its own gets the error. An out-of-memory error frees the device cache first
        (:func:`free_device_memory`), and a lone request that ran out of memory gets one more try.
        Returns ``(results, {request index: error})``. Costs nothing when ``run`` succeeds; a single
        poisoned request among ``r`` costs about ``2·log2(r)`` extra runs.

        Retries end in time: ``deadline`` (a :func:`~camserve.engine.timing.clock` reading; default:
        now + ``retry_window_s``, 0.8 × ``responseTimeout``) — a part is retried only if a run as long as
        the one that failed still fits before it; the requests that do not fit get a 500
        (:class:`BatchFailedError` naming the batch's error) instead of a worker killed by the timeout.
        """
        items = list(items)
        if not items:
            return {}, {}
        device = getattr(self, "device", None)
        started = clock(device)
        if deadline is None:
            deadline = started + getattr(self, "retry_window_s", RETRY_FRACTION * 120)
        try:
            return run(items), {}
        except Exception as error:  # noqa: BLE001 - isolated below
            first = error
        spent = clock(device) - started
        requests = list(dict.fromkeys(request_of(item) for item in items))
        oom = is_out_of_memory(first)
        if oom:
            free_device_memory(device)
        record_counters(getattr(self, "context", None), {"BatchRetries": 1},
                        ("Reason", "out_of_memory" if oom else type(first).__name__))
        if len(requests) == 1:
            if oom and clock(device) + spent <= deadline:
                try:
                    return run(items), {}
                except Exception as error:  # noqa: BLE001
                    first = error
            return {}, {requests[0]: self._guard(first)}
        logger.warning("a batch of %d requests failed (%s: %s); splitting it to isolate the failing request",
                       len(requests), type(first).__name__, first)
        half = set(requests[:len(requests) // 2])
        results: Dict[Any, Any] = {}
        failures: Dict[int, Exception] = {}
        for part in ([i for i in items if request_of(i) in half], [i for i in items if request_of(i) not in half]):
            if clock(device) + spent > deadline:  # a retry could outlive responseTimeout: fail these now
                error = BatchFailedError(f"the batch failed ({type(first).__name__}: {first}) and there was no "
                                         f"time left to retry this request on its own before the response timeout")
                logger.error("%s", error)
                failures.update({request_of(i): error for i in part})
                continue
            done, failed = self.run_isolated(part, run, request_of, deadline)
            results.update(done)
            failures.update(failed)
        return results, failures

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
        """``{request index: list of per-item answers | Exception}`` for the parsed requests; an answer is
        typed (:mod:`camserve.serving.answer`: ``to_json``, ``to_v2_tensors``, ``to_audit_record``)."""
        raise NotImplementedError

    def after_batch(self, answered: List[Tuple[int, ParsedRequest, Any]], context) -> None:
        """Hook called after a batch with ``(index, request, results or error)``, before the answers
        leave the worker; default: the audit log's records (one per explained image, queued for its
        writer thread) when it is on, then a wait (``audit_wait_seconds``) until they are in the file,
        and the log's health as metrics (``AuditWriteErrors``, ``AuditDropped``, ``AuditPending``)."""
        audit = getattr(self, "audit", None)
        if audit is None:
            return
        if record_answers(audit, self, answered, context) and not audit.wait_written(audit.wait_seconds):
            logger.error("audit log %s: this batch's records are not written after %.1f s (%d pending); "
                         "answering anyway", audit.path, audit.wait_seconds, audit.pending)
        stats = audit.stats()
        record_counters(context, {}, gauges={"AuditWriteErrors": stats["errors"] + stats["rotation_errors"],
                                             "AuditDropped": stats["dropped"], "AuditPending": stats["pending"]})

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
        start = clock(getattr(self, "device", None))
        self.context = context
        outcomes: Dict[int, Any] = {}
        parsed: List[Tuple[int, ParsedRequest]] = []
        for index, row in enumerate(data):
            try:
                parsed.append((index, self.parse(index, row or {}, context)))
            except Exception as error:  # noqa: BLE001 - isolated per request
                outcomes[index] = self._guard(error)
        if parsed:  # a fault outside the engine call is isolated the same way (per request)
            answered, failed = self.run_isolated(parsed, lambda part: self.run_batch(part, context),
                                                 request_of=lambda pair: pair[0])
            outcomes.update(answered)
            outcomes.update(failed)
        requests = dict(parsed)
        answers: List[str] = []
        for index in range(len(data)):
            outcome = outcomes.get(index, RuntimeError("request was not answered"))
            try:
                context.set_response_content_type(index, "application/json")
            except Exception:  # noqa: BLE001 - no request processor (direct calls)
                pass
            if not isinstance(outcome, Exception):
                request = requests[index]
                text = dumps(envelope_body(request.envelope, outcome, request.explain_route,
                                           self.model_name, request.request_id,
                                           json_output=request.meta.get("json_output", False),
                                           outputs=request.meta.get("outputs")))
                # an answer over the frontend's max_response_size would kill the worker and fail the
                # whole batch ("Worker died."): answer this request alone with a 413 instead
                limit = answer_limit(self.settings)
                if len(text) <= limit:  # ASCII JSON: characters = bytes
                    answers.append(text)
                    continue
                outcome = outcomes[index] = AnswerTooLargeError(
                    f"the answer would be {len(text)} bytes, over this server's limit of {limit} "
                    f"(max_response_size): send fewer images per request, fewer targets, or drop "
                    f"overlay/colormap renderings")
            status = status_of(outcome)
            phrase = getattr(outcome, "phrase", None) or PHRASES.get(status, "Error")
            context.set_response_status(status, phrase, idx=index)
            if getattr(outcome, "retry_after_s", None):
                try:
                    context.set_response_header(index, "Retry-After", str(outcome.retry_after_s))
                except Exception:  # noqa: BLE001 - no request processor (direct calls)
                    pass
            answers.append(dumps(error_body(outcome)))
        try:
            self.after_batch([(i, requests.get(i), outcomes.get(i)) for i in range(len(data))], context)
        except Exception:  # noqa: BLE001 - hooks never fail the batch
            logger.warning("after_batch hook failed", exc_info=True)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((clock(getattr(self, "device", None)) - start) * 1000, 2),
                                     None, "ms")
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
