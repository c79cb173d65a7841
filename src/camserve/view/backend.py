"""What the view asks of whatever answers its requests (a remote server or a model in this process).

A :class:`Backend` describes its model (:class:`ModelInfo`: task, methods, layers) and answers a list
of :class:`Query` (one image, its options) with the typed answers of :mod:`camserve.serving.answer`,
or with a :class:`~camserve.client.CamserveError` per query the server refused — the same for both
kinds of backend, so the page's code path does not depend on which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Union

from camserve.client import CamserveError
from camserve.engine import REGISTRY
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer

Answer = Union[ClassifierAnswer, EmbeddingAnswer]
Outcome = Union[Answer, CamserveError]


@dataclass(frozen=True)
class Query:
    """One request: the ``image`` (encoded bytes), an embedding model's ``reference`` image, and the
    request options as text (``explain``, ``compare``, ``layer``, ``target``, ``topk``, ``method``,
    ``gallery`` …, the names of docs/serving.md)."""

    image: bytes
    options: Dict[str, str]
    reference: Optional[bytes] = None


@dataclass(frozen=True)
class Layer:
    """A layer the page offers: its module path and its stage alias (``stage3``), if it is a stage."""

    name: str
    alias: str = ""

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "alias": self.alias}


@dataclass
class ModelInfo:
    """What the page offers for a model: ``name``, ``task`` (``classify`` | ``embed``), ``source`` (how
    the view reaches it, in words), ``methods`` (the registry's for the task), ``default_methods`` and
    ``default_layer`` (pre-ticked), ``layers`` (the stages, shallow → deep; the page also takes typed
    names) and ``gallery`` (an embedding model's gallery: ``True``/``False``, ``None`` when unknown)."""

    name: str
    task: str
    source: str
    layers: List[Layer] = field(default_factory=list)
    default_methods: List[str] = field(default_factory=list)
    default_layer: Optional[str] = None
    gallery: Optional[bool] = None

    @property
    def methods(self) -> List[str]:
        """The explanation methods of this task, from the one method registry."""
        return REGISTRY.names(task=self.task)

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "task": self.task, "source": self.source, "methods": self.methods,
                "default_methods": list(self.default_methods), "default_layer": self.default_layer,
                "layers": [layer.to_json() for layer in self.layers], "gallery": self.gallery}


def stage_layers(stages: Sequence[str]) -> List[Layer]:
    """Module paths of the stages (shallow → deep) with their aliases ``stage1`` … ``stageN``."""
    return [Layer(name, f"stage{k}") for k, name in enumerate(stages, start=1)]


class Backend(Protocol):
    """Answers the view's requests for one model."""

    def describe(self) -> ModelInfo:
        """The model's :class:`ModelInfo`; a :class:`CamserveError` when the model cannot be reached."""
        ...

    def answer(self, queries: Sequence[Query]) -> List[Outcome]:
        """One typed answer or :class:`CamserveError` per query, in order."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, an unpacked archive)."""
        ...
