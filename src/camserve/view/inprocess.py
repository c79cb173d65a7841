"""The view's requests answered in this process: the serving handler of a model spec or ``.mar``.

:class:`InProcessBackend` loads the handler as a TorchServe worker does (``initialize`` with
TorchServe's own context, :mod:`camserve.serving.local`) and hands it the queries as TorchServe hands
multipart requests (a row ``{"data": image, "reference": …, option: value}`` each), up to the
model-config's ``batchSize`` per ``handle`` call. Each request's JSON body is read back with the
answer types' ``from_json`` (a refused one becomes a :class:`~camserve.client.CamserveError` with the
handler's status and message) — exactly what a server would have answered.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from typing import Any, Dict, List, Sequence

from camserve.client import CamserveError
from camserve.client.wire import answer_from_json, error_message
from camserve.serving.local import ModelSetup, Reply, gpu_id_for, handle_rows, handler_class, worker_context
from camserve.view.backend import ModelInfo, Outcome, Query, stage_layers


def read_reply(reply: Reply) -> Outcome:
    """A handler's reply read as the client reads a server's: the typed answer, or the refusal as a
    :class:`CamserveError` with the handler's status and message."""
    try:
        body: Any = json.loads(reply.body)
    except ValueError:
        body = None
    if reply.status != 200:
        return CamserveError(reply.status, error_message(body, reply.body), body)
    if not isinstance(body, dict):
        return CamserveError(reply.status, f"an answer that is not a JSON object: {reply.body[:200]!r}")
    try:
        return answer_from_json(body)
    except CamserveError as error:
        return error


class InProcessBackend:
    """The handler of ``setup`` on ``device`` (``auto``, ``cpu``, ``cuda[:N]``); one batch at a time."""

    def __init__(self, setup: ModelSetup, device: str = "auto"):
        self.setup = setup
        self.gpu_id = gpu_id_for(device)
        self.handler = handler_class(setup.task)()
        self.handler.initialize(worker_context(setup, setup.batch_size, self.gpu_id))
        self._lock = threading.Lock()  # the handler runs one batch at a time, as in a worker

    def describe(self) -> ModelInfo:
        """The handler's own view: its profile's stages and its configured defaults."""
        handler, settings = self.handler, self.handler.settings
        source = f"in-process ({handler.device})"
        if self.setup.task == "embed":
            return ModelInfo(self.setup.name, "embed", source, gallery=handler.gallery is not None)
        return ModelInfo(self.setup.name, "classify", source, stage_layers(handler.profile.stages),
                         default_methods=[settings.default_method],
                         default_layer=settings.default_layer or handler.profile.default_layer)

    @staticmethod
    def row(query: Query) -> Dict[str, Any]:
        """The query as TorchServe's worker hands a multipart request: one bytes value per field."""
        row: Dict[str, Any] = {"data": query.image}
        if query.reference is not None:
            row["reference"] = query.reference
        row.update({name: str(value).encode("utf-8") for name, value in query.options.items()})
        return row

    def answer(self, queries: Sequence[Query]) -> List[Outcome]:
        """The queries in batches of the model-config's ``batchSize``; answers in order."""
        outcomes: List[Outcome] = []
        size = max(1, self.setup.batch_size)
        for start in range(0, len(queries), size):
            batch = [(self.row(q), {}, str(uuid.uuid4())) for q in queries[start:start + size]]
            with self._lock:
                replies = handle_rows(self.handler, self.setup, self.gpu_id, batch)
            outcomes += [read_reply(reply) for reply in replies]
        return outcomes

    def close(self) -> None:
        if self.setup.cleanup:
            shutil.rmtree(self.setup.cleanup, ignore_errors=True)
