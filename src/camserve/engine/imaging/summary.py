"""A map's summary: where the model looked, in a few hundred bytes — what audit logs and batch
records keep of each explanation, and what ``camserve drift`` compares over time.

For a map ``m`` (``h × w``, in the model input's frame, [0, 1]) the summary holds

- ``grid``: ``m`` at :data:`GRID` × :data:`GRID` (area mean, or bilinear when the map is smaller),
  8-bit, row-major, base64 (344 characters);
- with ``p = g / Σg`` the grid's mass distribution over cell centres ``(x, y) ∈ (0, 1)²``:
  ``centroid`` ``[Σ p·x, Σ p·y]``; ``spread`` ``√Σ p·‖(x, y) − centroid‖²``; ``entropy``
  ``−Σ p log p / log GRID²`` (1 = uniform, 0 = one cell); ``centre_mass`` (the mass in the central
  half-width square ``[¼, ¾]²``); ``border_mass`` (the mass in the outer ring of cells, ⅛ of the side
  on each edge); ``coverage`` (the grid's mean, how much of the frame is lit); ``peaks`` (local maxima of the grid
  over their 3 × 3 neighbourhood that reach ½ of its maximum, a plateau counted once).

An all-zero map has ``p`` uniform by convention (entropy 1, centroid the centre). Computed on the
maps' device for a whole batch; one small host copy at the end. Size per summary: about 560 bytes as
JSON (stated and checked by the tests).
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
import torch.nn.functional as F

GRID = 16
#: the JSON size bound of one summary (bytes), checked by the tests
MAX_JSON_BYTES = 640
STATISTICS = ("centroid_x", "centroid_y", "spread", "entropy", "centre_mass", "border_mass", "coverage", "peaks")


@dataclass
class MapSummary:
    """One map's summary (see the module docstring)."""

    grid: str
    centroid: List[float]
    spread: float
    entropy: float
    centre_mass: float
    border_mass: float
    coverage: float
    peaks: int

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "MapSummary":
        return cls(str(body["grid"]), [float(v) for v in body["centroid"]], float(body["spread"]),
                   float(body["entropy"]), float(body["centre_mass"]), float(body["border_mass"]),
                   float(body["coverage"]), int(body["peaks"]))

    def grid_array(self) -> np.ndarray:
        """The grid as a ``GRID × GRID`` float array in [0, 1]."""
        raw = np.frombuffer(base64.b64decode(self.grid), dtype=np.uint8)
        return raw.reshape(GRID, GRID).astype(np.float32) / 255.0

    def statistics(self) -> Dict[str, float]:
        """The scalar statistics by name (:data:`STATISTICS`)."""
        return {"centroid_x": self.centroid[0], "centroid_y": self.centroid[1], "spread": self.spread,
                "entropy": self.entropy, "centre_mass": self.centre_mass, "border_mass": self.border_mass,
                "coverage": self.coverage, "peaks": float(self.peaks)}


def to_grid(maps: torch.Tensor) -> torch.Tensor:
    """``(n, h, w)`` maps → ``(n, GRID, GRID)``: area means, or bilinear for maps smaller than the grid."""
    maps = maps.float()[:, None]
    if maps.shape[-2] < GRID or maps.shape[-1] < GRID:
        grid = F.interpolate(maps, size=(GRID, GRID), mode="bilinear", align_corners=False)
    else:
        grid = F.adaptive_avg_pool2d(maps, GRID)
    return grid[:, 0].clamp(0, 1)


def count_peaks(grid: torch.Tensor) -> torch.Tensor:
    """Per ``(n, G, G)`` grid, the cells ≥ each of their 8 neighbours and ≥ ½ of the grid's (positive)
    maximum; on a plateau of equal cells only its first cell in raster order counts (it must be > its
    west, north-west, north and north-east neighbours)."""
    padded = F.pad(grid, (1, 1, 1, 1), value=-1.0)
    g = grid.shape[-1]

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        return padded[:, 1 + dy:1 + dy + g, 1 + dx:1 + dx + g]
    peak = (grid >= 0.5 * grid.amax(dim=(1, 2), keepdim=True)) & (grid > 0)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        peak &= grid > neighbour(dy, dx)
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        peak &= grid >= neighbour(dy, dx)
    return peak.sum(dim=(1, 2))


def summarise(maps: torch.Tensor) -> List[MapSummary]:
    """The summaries of ``(n, h, w)`` maps in [0, 1] (any device), one per map."""
    if maps.dim() == 2:
        maps = maps[None]
    grid = to_grid(maps)
    n = grid.shape[0]
    if n == 0:
        return []
    device = grid.device
    centres = (torch.arange(GRID, device=device, dtype=torch.float32) + 0.5) / GRID
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    total = grid.sum(dim=(1, 2), keepdim=True)
    p = torch.where(total > 0, grid / total.clamp_min(1e-12), torch.full_like(grid, 1.0 / GRID ** 2))
    cx, cy = (p * x).sum(dim=(1, 2)), (p * y).sum(dim=(1, 2))
    spread = (p * ((x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2)).sum(dim=(1, 2)).sqrt()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=(1, 2)) / math.log(GRID ** 2)
    centre = ((x >= 0.25) & (x <= 0.75) & (y >= 0.25) & (y <= 0.75)).float()
    ring = GRID // 8
    border = torch.ones(GRID, GRID, device=device)
    border[ring:GRID - ring, ring:GRID - ring] = 0
    centre_mass, border_mass = (p * centre).sum(dim=(1, 2)), (p * border).sum(dim=(1, 2))
    peaks = count_peaks(grid)
    coverage = grid.mean(dim=(1, 2))
    codes = (grid * 255).round().to(torch.uint8).reshape(n, -1).cpu().numpy()
    stats = torch.stack([cx, cy, spread, entropy, centre_mass, border_mass, coverage, peaks.float()], 1).cpu()
    out = []
    for code, row in zip(codes, stats.tolist()):
        out.append(MapSummary(base64.b64encode(code.tobytes()).decode("ascii"), [round(row[0], 4), round(row[1], 4)],
                              round(row[2], 4), round(row[3], 4), round(row[4], 4), round(row[5], 4),
                              round(row[6], 4), int(row[7])))
    return out
