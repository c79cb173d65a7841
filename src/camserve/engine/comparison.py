"""Several methods side by side on one image: :func:`compare` runs each method spec in its own
``Explainer.explain`` call — so each explanation's ``seconds`` is its whole wall-clock cost, forward
included — and returns them with the matrix of pairwise Spearman correlations of their maps for the
same target class (:mod:`camserve.engine.core.rank_correlation`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from camserve.engine.core.explanation import ExplainSpec
from camserve.engine.core.rank_correlation import spearman_matrix
from camserve.engine.errors import InvalidInputError, InvalidTargetError
from camserve.engine.timing import clock


@dataclass
class Comparison:
    """The explanations of one image by several methods, for one target, and their correlations."""

    logits: torch.Tensor
    target: int
    methods: List[str]
    explanations: list
    seconds: List[float]
    spearman: List[List[Optional[float]]]


def compare(explainer, image: torch.Tensor, specs: Sequence, target=None, output_size=None) -> Comparison:
    """Explain one image ``(1, C, H, W)`` (or ``(C, H, W)``) with each spec and correlate the maps.

    The target (``None`` = the predicted class, or a class index) applies to every spec that names
    none; a spec asking for several targets is refused. Each explanation is timed on its own
    (wall-clock of its ``explain`` call); maps are compared at ``output_size`` (default input size).
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise InvalidInputError(f"compare takes one image, got shape {tuple(image.shape)}")
    if len(specs) < 2:
        raise InvalidInputError(f"compare needs at least two methods, got {len(specs)}")
    specs = [ExplainSpec(s) if isinstance(s, str) else s for s in specs]
    specs = [s if s.target is not None else replace(s, target=target) for s in specs]
    explanations, seconds = [], []
    logits = None
    for spec in specs:
        start = clock(image.device)
        result = explainer.explain(image, [spec], output_size=output_size)
        seconds.append(clock(image.device) - start)
        explanation = replace(result.explanations[0], seconds=seconds[-1], batch_seconds=seconds[-1])
        if len(explanation.targets) != 1:
            raise InvalidTargetError(f"compare explains one target per method; {spec.method} got {explanation.targets}")
        explanations.append(explanation)
        logits = result.logits if logits is None else logits
    targets = {e.targets[0] for e in explanations}
    if len(targets) != 1:
        raise InvalidTargetError(f"compare needs the same target for every method, got {sorted(targets)}")
    matrix = spearman_matrix([e.maps[0] for e in explanations])
    return Comparison(logits, targets.pop(), [e.method for e in explanations], explanations, seconds, matrix)


def comparison_json(comparison: Comparison, digits: int = 4) -> Dict[str, Any]:
    """The response field ``comparison``: methods, target, per-method seconds, Spearman matrix (``null``
    where undefined)."""
    return {"methods": list(comparison.methods), "target": comparison.target,
            "seconds": [round(s, digits) for s in comparison.seconds],
            "spearman": [[None if v is None else round(v, digits) for v in row] for row in comparison.spearman]}
