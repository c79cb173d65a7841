"""Map summaries (``camserve.engine.imaging.summary``): the statistics of maps whose answer is known,
the grid's round trip, and the size bound of one summary as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from camserve.engine.imaging.summary import GRID, MAX_JSON_BYTES, MapSummary, summarise


def blob(cx: float, cy: float, size: int = 64, sigma: float = 4.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((x - cx * size) ** 2 + (y - cy * size) ** 2) / (2 * sigma ** 2))


def test_statistics_of_known_maps():
    maps = torch.stack([blob(0.5, 0.5), blob(0.1, 0.9), torch.ones(64, 64), torch.zeros(64, 64),
                        blob(0.25, 0.25) + blob(0.75, 0.75)])
    centre, corner, flat, empty, two = summarise(maps)
    assert centre.centroid == pytest.approx([0.5, 0.5], abs=0.01) and corner.centroid == pytest.approx([0.1, 0.9], abs=0.02)
    assert centre.centre_mass > 0.95 and corner.border_mass > 0.5 and centre.border_mass < 0.01
    assert centre.peaks == 1 and corner.peaks == 1 and two.peaks == 2 and flat.peaks == 1 and empty.peaks == 0
    assert flat.entropy == pytest.approx(1.0) and empty.entropy == pytest.approx(1.0) and centre.entropy < 0.6
    assert flat.coverage == pytest.approx(1.0) and empty.coverage == 0.0
    assert centre.spread < two.spread < flat.spread


def test_round_trip_and_size():
    maps = torch.rand(3, 7, 7)  # a last feature map: smaller than the grid, upsampled
    for summary in summarise(maps):
        body = summary.to_json()
        assert len(json.dumps(body)) <= MAX_JSON_BYTES
        again = MapSummary.from_json(json.loads(json.dumps(body)))
        assert again == summary and again.grid_array().shape == (GRID, GRID)
        assert set(again.statistics()) >= {"centroid_x", "entropy", "peaks"}
    big = torch.rand(1, 224, 224)
    (summary,) = summarise(big)
    pooled = torch.nn.functional.adaptive_avg_pool2d(big[None], GRID)[0, 0].numpy()
    assert np.abs(summary.grid_array() - pooled).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
