"""The view's requests sent to a running server (TorchServe or ``camserve kserve``) by the client.

The server does not list its model's layers, but it names them when refused one: a layer it does not
know is a 400 whose message lists the stages (``stages (alias = module path): stage1 = '_blocks.0',
…``). :meth:`RemoteBackend.describe` therefore asks twice with a small probe image: a plain
prediction (its answer's type says classifier or embedding model), then, for a classifier, an
explanation at the layer ``stage0`` (none has that alias), whose message gives the stages. When the
message has none, the bundled model's stages are offered for ``effnet_lite0``; the page always takes
typed layer names.
"""

from __future__ import annotations

import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from PIL import Image

from camserve.client import CamserveError, Client
from camserve.serving.answer import EmbeddingAnswer
from camserve.view.backend import Layer, ModelInfo, Outcome, Query, stage_layers

#: requests in flight at once (the server batches them)
CONCURRENCY = 4
#: offered for the bundled classifier when the server's message names no stages
EFFNET_LITE0_LAYERS = ("_blocks.1", "_blocks.4", "_blocks.10", "_conv_head")
_STAGE = re.compile(r"stage(\d+) = '([^']+)'")


def probe_image() -> bytes:
    """A small grey PNG: enough for the server to validate a request against its model."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def stages_in(message: str) -> List[str]:
    """The stages (module paths, in alias order) an unknown-layer message lists."""
    found = {int(k): name for k, name in _STAGE.findall(message)}
    return [found[k] for k in sorted(found)]


class RemoteBackend:
    """Model ``model`` on the server ``client`` talks to."""

    def __init__(self, client: Client, model: str):
        self.client, self.model = client, model
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="camserve-view")
        self._info: Optional[ModelInfo] = None
        self._lock = threading.Lock()

    def describe(self) -> ModelInfo:
        """Asked of the server once (the probes of the module docstring), then remembered."""
        with self._lock:
            if self._info is None:
                self._info = self._probe()
            return self._info

    def _probe(self) -> ModelInfo:
        image = probe_image()
        source = f"{self.client.url} ({self.client.protocol})"
        if isinstance(self.client.predict(self.model, image), EmbeddingAnswer):
            return ModelInfo(self.model, "embed", source)
        try:
            self.client.predict(self.model, image, explain="gradcam", layer="stage0")
            stages: List[str] = []
        except CamserveError as error:
            if error.status is None:
                raise
            stages = stages_in(error.message)
        layers = stage_layers(stages)
        if not layers and self.model.startswith("effnet_lite0"):
            layers = [Layer(name) for name in EFFNET_LITE0_LAYERS]
        return ModelInfo(self.model, "classify", source, layers)

    def _one(self, query: Query) -> Outcome:
        options = dict(query.options)
        if query.reference is not None:
            options["reference"] = query.reference
        try:
            return self.client.predict(self.model, query.image, **options)
        except CamserveError as error:
            return error

    def answer(self, queries: Sequence[Query]) -> List[Outcome]:
        """The queries sent ``CONCURRENCY`` at a time; answers in order."""
        return list(self.pool.map(self._one, queries))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
