"""What a person chose on the page, checked, and the requests that answer it.

:meth:`Choices.from_form` reads the page's form (``method`` and ``layer`` ticked, more layers typed
in ``layers``, ``target``, ``topk``, ``gallery``, the ``image`` and an embedding model's ``reference``)
and refuses, with a :class:`~camserve.view.errors.ViewError` 400, what no server would answer.
:meth:`Choices.plan` turns it into :class:`Planned` requests (the options of docs/serving.md):

- a classifier, per layer: ``compare=<m1>,<m2>…`` when 2–4 methods share the layer and the target is
  one class (``top1`` or an index) — every method's map and their rank correlations in one answer —
  else one ``explain=<method>`` request per method (``topK`` explains K classes: a map each);
- an embedding model, per method: the FAM pair against the reference image (``method=<m>`` with the
  ``reference``), and/or the ``gallery=<k>`` matches; with a reference also a plain request for it,
  whose ``crop_box`` places its map on the photograph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple

from camserve.view.backend import ModelInfo, Query
from camserve.view.errors import ViewError

#: the most requests one page submission may make
MAX_REQUESTS = 32
#: methods one ``compare=`` request takes (docs/serving.md)
COMPARE_METHODS = (2, 4)
MAX_TOPK = 20
MAX_GALLERY = 10
#: the layer label of "the model's own layer for the method" (no ``layer`` option)
DEFAULT_LAYER = "default"
_TARGET = re.compile(r"^(top[1-9]\d*|\d+)$")


@dataclass(frozen=True)
class Planned:
    """One request and what it is for: ``kind`` (``compare``, ``explain``, ``pair``, ``gallery``,
    ``reference``), the ``methods`` it explains and the ``layer`` label of its grid column."""

    query: Query
    kind: str
    methods: Tuple[str, ...] = ()
    layer: str = ""


def _integer(name: str, text: Optional[str], default: int, low: int, high: int) -> int:
    if text in (None, ""):
        return default
    try:
        value = int(str(text).strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ViewError(400, f"{name} must be a whole number from {low} to {high}, got {text!r}")
    return value


@dataclass
class Choices:
    """A checked page submission: the ``image`` (and ``reference``), the ``methods``, the ``layers``
    (labels: names as typed, :data:`DEFAULT_LAYER` for the model's own), the ``target`` (``topK`` or a
    class index), ``topk`` predictions and ``gallery`` matches (0: none)."""

    task: str
    image: bytes
    methods: List[str]
    layers: List[str] = field(default_factory=lambda: [DEFAULT_LAYER])
    target: str = "top1"
    topk: int = 5
    gallery: int = 0
    reference: Optional[bytes] = None

    @classmethod
    def from_form(cls, info: ModelInfo, fields: Mapping[str, Sequence[str]], image: Optional[bytes],
                  reference: Optional[bytes]) -> "Choices":
        """``fields``: each form field's values; ``image``/``reference``: the uploaded files' bytes."""
        if not image:
            raise ViewError(400, "no image: drop or pick a photograph first")

        def one(name: str) -> Optional[str]:
            values = [v for v in fields.get(name, ()) if str(v).strip()]
            return str(values[-1]).strip() if values else None

        methods = list(dict.fromkeys(str(m).strip().lower() for m in fields.get("method", ()) if str(m).strip()))
        if not methods:
            raise ViewError(400, "tick at least one method")
        unknown = [m for m in methods if m not in info.methods]
        if unknown:
            raise ViewError(400, f"unknown method(s) {unknown} for a model that does {info.task!r}; "
                                 f"choose from {info.methods}")
        if info.task == "embed":
            gallery = _integer("gallery", one("gallery"), 0, 0, MAX_GALLERY)
            if not reference and not gallery:
                raise ViewError(400, "an embedding model explains a similarity: add a reference image, "
                                     "or ask for gallery matches")
            return cls("embed", image, methods, [], gallery=gallery, reference=reference or None)
        typed = [n.strip() for v in fields.get("layers", ()) for n in str(v).split(",")]
        layers = list(dict.fromkeys(n for n in [*map(str, fields.get("layer", ())), *typed] if n.strip()))
        target = one("target") or "top1"
        if not _TARGET.match(target.lower()):
            raise ViewError(400, f"target must be top1, top2 … or a class index, got {target!r}")
        return cls("classify", image, methods, layers or [DEFAULT_LAYER], target.lower(),
                   _integer("topk", one("topk"), 5, 1, MAX_TOPK))

    @property
    def one_target(self) -> bool:
        """Whether each map explains one class (``top1`` or an index): comparisons need that."""
        return self.target == "top1" or self.target.isdigit()

    @property
    def compares(self) -> bool:
        """Whether the methods are compared per layer (one ``compare=`` request per layer)."""
        low, high = COMPARE_METHODS
        return self.one_target and low <= len(self.methods) <= high

    def plan(self) -> List[Planned]:
        """The requests, in the order the page lays out their answers; over :data:`MAX_REQUESTS` → 400."""
        planned = self._embedding_plan() if self.task == "embed" else self._classifier_plan()
        if len(planned) > MAX_REQUESTS:
            raise ViewError(400, f"{len(planned)} requests: choose fewer methods or layers "
                                 f"(at most {MAX_REQUESTS} requests per image)")
        return planned

    def _classifier_plan(self) -> List[Planned]:
        planned = []
        for layer in self.layers:
            base = {"target": self.target, "topk": str(self.topk)}
            if layer != DEFAULT_LAYER:
                base["layer"] = layer
            if self.compares:
                query = Query(self.image, {"compare": ",".join(self.methods), **base})
                planned.append(Planned(query, "compare", tuple(self.methods), layer))
                continue
            planned += [Planned(Query(self.image, {"explain": m, **base}), "explain", (m,), layer)
                        for m in self.methods]
        return planned

    def _embedding_plan(self) -> List[Planned]:
        planned = []
        for method in self.methods:
            if self.reference is not None:
                query = Query(self.image, {"method": method, "embedding": "0"}, self.reference)
                planned.append(Planned(query, "pair", (method,)))
            if self.gallery:
                query = Query(self.image, {"method": method, "gallery": str(self.gallery), "embedding": "0"})
                planned.append(Planned(query, "gallery", (method,)))
        if self.reference is not None:
            planned.append(Planned(Query(self.reference, {"embedding": "0"}), "reference"))
        return planned

    def notes(self) -> List[str]:
        """Why the page shows no rank correlations although several methods were ticked."""
        if self.task != "classify" or len(self.methods) < 2 or self.compares:
            return []
        if not self.one_target:
            return [f"rank correlations compare maps of one class: choose target top1 or a class index "
                    f"(target {self.target} explains several)"]
        return [f"rank correlations compare {COMPARE_METHODS[0]}–{COMPARE_METHODS[1]} methods at a time: "
                f"{len(self.methods)} were ticked, so each method was asked on its own"]
