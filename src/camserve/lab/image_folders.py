"""The labelled image folders the evaluation and bench CLIs read.

Two layouts: a ``LABELS.tsv`` (tab-separated, columns ``file`` and ``class_index``; the shared
``imagenet-samples``), or one sub-folder per class (``<class>/<image>``, ImageFolder's convention:
class index = position of the folder name in sorted order; the shared ``cifar10-test``). Class
folders are listed interleaved — every class's first image, then every class's second … — so that
``stride``/``limit`` take a balanced sample.
"""

from __future__ import annotations

import csv
import os
from itertools import zip_longest
from pathlib import Path
from typing import List, Optional, Tuple

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def default_data_dir() -> Path:
    """``$CAMSERVE_SHARED/data/imagenet-samples`` (default: ``../shared`` next to the repository)."""
    repo = Path(__file__).resolve().parents[3]
    return Path(os.environ.get("CAMSERVE_SHARED", repo.parent / "shared")) / "data" / "imagenet-samples"


def image_rows(data: Path, stride: int = 1, limit: Optional[int] = None) -> List[dict]:
    """Every ``stride``-th image of the folder, at most ``limit``: ``{"file", "class_index", …}`` rows
    (``file`` relative to ``data``)."""
    data = Path(data)
    if (data / "LABELS.tsv").is_file():
        with open(data / "LABELS.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    elif data.is_dir():
        classes = sorted(p.name for p in data.iterdir() if p.is_dir())
        per_class = [sorted(f"{c}/{f.name}" for f in (data / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                     for c in classes]
        rows = [{"file": f, "class_index": str(classes.index(f.split("/")[0]))}
                for group in zip_longest(*per_class) for f in group if f is not None]
        if not rows:
            raise SystemExit(f"{data}: no LABELS.tsv and no class sub-folders with images")
    else:
        raise SystemExit(f"{data}: not a folder")
    rows = rows[::max(1, stride)]
    return rows[:limit] if limit is not None else rows


def read_photos(data: Path, rows: List[dict]) -> List[torch.Tensor]:
    """The rows' images as ``uint8 (3, H, W)`` RGB tensors."""
    import numpy as np
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(Path(data) / r["file"]).convert("RGB"))).permute(2, 0, 1).contiguous()
            for r in rows]


def load_images(data: Path, limit: int, stride: int, profile, device) -> Tuple[torch.Tensor, List[dict]]:
    """Every ``stride``-th image, at most ``limit``, preprocessed by ``profile`` (a
    :class:`~camserve.engine.models.ModelProfile`): ``(batch on device, rows)``."""
    rows = image_rows(data, stride, limit)
    batch, _ = profile.model_input(read_photos(data, rows), device)
    return batch, rows
