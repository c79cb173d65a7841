"""A planned row: one image's validated request, as a method's ``plan`` returns it to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from camserve.engine.core.targets import TargetSpec


@dataclass
class PlannedRow:
    """Image ``index`` explained by ``method`` at ``layer`` (``None``: the input) with canonical
    ``options``, for ``spec_target`` (resolved to ``targets`` from the forward's logits).
    ``own_forwards``: the method runs forwards of its own (Captum) after the shared one, instead of
    reading the shared forward's captured activations and passes (``layers``)."""

    index: int
    method: Any
    layer: Optional[str]
    spec_target: TargetSpec
    options: Dict[str, Any]
    targets: List[int] = field(default_factory=list)
    own_forwards: bool = False
    #: the layers whose activations (and passes) the row reads, decided once by its plan
    layers: Tuple[str, ...] = ()

    @property
    def group(self) -> Tuple:
        """Rows of one group are computed together (same method, layer and options)."""
        return (self.method.name, self.layer, tuple(sorted(self.options.items())))
