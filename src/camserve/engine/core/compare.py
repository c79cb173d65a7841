"""How far apart are two explanations? Spearman rank correlation over pixels, and ``compare``.

``spearman(a, b) = pearson(rank(a), rank(b))`` over all pixels of two maps of the same size, where
``rank`` gives tied values the average of the ranks they span (so a map with large flat regions,
e.g. a ReLU'd CAM full of zeros, is ranked fairly). Everything stays on the maps' device; the result
is ``None`` when a map is constant (its ranks have no variance, the correlation is undefined).

:func:`compare` runs several method specs on one image — each in its own ``Explainer.explain`` call,
so each explanation's ``seconds`` is set to its whole wall-clock cost (forward included) — and returns them with the
matrix of pairwise Spearman correlations of their maps for the same target class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from camserve.engine.errors import InvalidInputError, InvalidOptionError, InvalidTargetError
from camserve.engine.imaging.render import upsample
from camserve.engine.timing import clock


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 … n−1`` of a 1-D tensor, ties given the mean of the ranks they occupy (float64)."""
    flat = values.reshape(-1)
    order = torch.argsort(flat, stable=True)
    _, inverse, counts = torch.unique_consecutive(flat[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)           # one past the last rank of each tie group
    group_rank = ends - (counts.to(torch.float64) + 1) / 2      # mean of start … end−1
    ranks = torch.empty_like(flat, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Spearman's ρ between two maps over their pixels (same number of elements); ``None`` if one is constant."""
    if a.numel() != b.numel():
        raise InvalidInputError(f"maps to correlate must have the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a), average_ranks(b.to(a.device))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denominator) == 0.0:
        return None
    return float((ra * rb).sum() / denominator)


def spearman_matrix(maps: Sequence[torch.Tensor]) -> List[List[Optional[float]]]:
    """Pairwise Spearman ρ of ``(H, W)`` maps; maps of different sizes are bilinearly resized to the largest."""
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
    resized = [upsample(m.reshape(1, *m.shape[-2:]).float(), size)[0] for m in maps]
    n = len(resized)
    matrix: List[List[Optional[float]]] = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i][j] = matrix[j][i] = spearman(resized[i], resized[j])
    if any(m.min() == m.max() for m in resized):  # a constant map is not even correlated with itself
        for i, m in enumerate(resized):
            if m.min() == m.max():
                matrix[i][i] = None
    return matrix


def parse_methods(value, max_methods: int = 4) -> List[str]:
    """``"shallowcam,captum.integrated_gradients"`` (or a list) → the method names, each known,
    no duplicates, 2 to ``max_methods`` of them."""
    from camserve.engine.methods.captum.catalog import check_name, is_captum
    from camserve.engine.methods import get_method

    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else list(value or []))
             if isinstance(n, str) and n.strip()]
    if not 2 <= len(names) <= max_methods:
        raise InvalidOptionError(f"compare needs 2 to {max_methods} comma-separated methods, got {value!r}")
    if len(set(names)) != len(names):
        raise InvalidOptionError(f"compare lists a method twice: {value!r}")
    for name in names:
        check_name(name) if is_captum(name) else get_method(name)
    return names


def split_options(methods: Sequence[str], options: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Give each method of a comparison the options it accepts (an option several accept goes to
    each); an option no method accepts is an :class:`InvalidOptionError`."""
    from camserve.engine.methods.captum.catalog import accepted_options, is_captum
    from camserve.engine.methods import get_method

    options = dict(options or {})
    accepted = [accepted_options(m, options) if is_captum(m) else set(get_method(m).option_choices) for m in methods]
    stray = sorted(k for k in options if not any(str(k).lower() in a for a in accepted))
    if stray:
        raise InvalidOptionError(f"option(s) {stray} are taken by none of the compared methods {list(methods)}")
    return [{k: v for k, v in options.items() if str(k).lower() in a} for a in accepted]


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
    from camserve.engine.pipeline import ExplainSpec

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
