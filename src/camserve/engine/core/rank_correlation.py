"""How far apart are two explanations? Spearman rank correlation over pixels.

``spearman(a, b) = pearson(rank(a), rank(b))`` over all pixels of two maps of the same size, where
``rank`` gives tied values the average of the ranks they span (so a map with large flat regions,
e.g. a ReLU'd CAM full of zeros, is ranked fairly). Everything stays on the maps' device; the result
is ``None`` when a map is constant (its ranks have no variance, the correlation is undefined).

``camserve.engine.comparison.compare`` puts several methods side by side with these correlations.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from camserve.engine.errors import InvalidInputError
from camserve.engine.imaging.render import upsample


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 … n−1`` of each row of ``values`` (``(n,)`` or ``(N, n)``; float64), ties given the
    mean of the ranks they occupy (as ``scipy.stats.rankdata``, less one)."""
    rows = values.reshape(-1, values.shape[-1]) if values.dim() > 1 else values.reshape(1, -1)
    ranks = torch.empty_like(rows, dtype=torch.float64)
    for row, out in zip(rows, ranks):
        order = torch.argsort(row, stable=True)
        _, inverse, counts = torch.unique_consecutive(row[order], return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).to(torch.float64)           # one past the last rank of each tie group
        group_rank = ends - (counts.to(torch.float64) + 1) / 2      # mean of start … end−1
        out[order] = group_rank[inverse]
    return ranks.reshape(values.shape) if values.dim() > 1 else ranks[0]


def spearman_rows(a: torch.Tensor, b: torch.Tensor, constant: float = float("nan")) -> torch.Tensor:
    """Spearman's ρ per row of ``a`` and ``b`` ``(N, ...)``, over each row's elements; ``constant``
    where a row of either is constant (ρ is undefined there: the serving answer says ``None``, the
    lab's class-sensitivity scores count it as 0 — each caller names its convention)."""
    if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
        raise InvalidInputError(f"maps to correlate must have the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.to(a.device).flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator.clamp_min(1e-300),
                       torch.full_like(denominator, constant))


def spearman(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Spearman's ρ between two maps over their pixels (same number of elements); ``None`` if one is constant."""
    if a.numel() != b.numel():
        raise InvalidInputError(f"maps to correlate must have the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    rho = float(spearman_rows(a.reshape(1, -1), b.reshape(1, -1))[0])
    return None if rho != rho else rho


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
