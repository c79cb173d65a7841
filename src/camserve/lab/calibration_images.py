"""The user's image folder for ``camserve calibrate``: files, optional labels, and the fixed split.

Layouts (labels optional):

* a ``LABELS.tsv`` (columns ``file`` and ``class_index``; the shared ``imagenet-samples``),
* one sub-folder per class (``<class>/<image>``; class index = the folder's position in sorted
  order, or its index in the model's label map when the folder names are its labels),
* plain images in the folder (no labels: the protocol explains the predicted class anyway; the
  labels only give the top-1 accuracy recorded in the model card).

**Split** (the lab's protocol, :mod:`camserve.lab.evaluate_faithfulness`): files sorted by relative
path; with ``max_images`` below their number, a ``random.Random(seed).sample`` of that many, sorted
again. Position parity decides the half: ``choose = items[0::2]`` (readings chosen there),
``report = items[1::2]`` (the figures reported). Each half needs ``MIN_PER_HALF`` images, so that a
paired difference has a standard error ``SEM = sd(d) / √n`` worth reading.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from camserve.lab.image_folders import IMAGE_SUFFIXES, image_rows, read_photos

#: the fewest images a half may have (the split needs 2 × this many)
MIN_PER_HALF = 4


@dataclass
class ImageItem:
    """One image of the set: path relative to the folder, label (class index) if known."""

    file: str
    label: Optional[int]


@dataclass
class CalibrationSplit:
    """The fixed halves of the image set and where it came from."""

    data: Path
    labels_from: str  # "LABELS.tsv", "class folders" or "none (predicted class)"
    total: int        # images found in the folder
    choose: List[ImageItem]
    report: List[ImageItem]

    def describe(self) -> str:
        return (f"{self.total} images in {self.data} (labels: {self.labels_from}); files sorted by path, "
                f"{len(self.choose) + len(self.report)} used; even positions = choose half "
                f"({len(self.choose)}), odd = report half ({len(self.report)})")


def folder_items(data: Path, label_names: Optional[Sequence[str]] = None) -> Tuple[List[ImageItem], str]:
    """Every image of ``data`` with its label if the layout gives one, sorted by relative path."""
    data = Path(data)
    if not data.is_dir():
        raise SystemExit(f"--data {data}: not a folder")
    plain = sorted(p.name for p in data.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    has_classes = any(p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
                      for p in data.iterdir())
    if (data / "LABELS.tsv").is_file():
        rows, source = image_rows(data), "LABELS.tsv"
        items = [ImageItem(r["file"], int(r["class_index"]) if str(r.get("class_index", "")).strip() else None)
                 for r in rows]
    elif has_classes:
        rows, source = image_rows(data), "class folders"
        classes = sorted({r["file"].split("/")[0] for r in rows})
        by_name = {str(n): i for i, n in enumerate(label_names or [])}
        if label_names and all(c in by_name for c in classes):
            index = {c: by_name[c] for c in classes}
            source = "class folders (the model's label map)"
        else:
            index = {c: i for i, c in enumerate(sorted(p.name for p in data.iterdir() if p.is_dir()))}
        items = [ImageItem(r["file"], index[r["file"].split("/")[0]]) for r in rows]
    else:
        items, source = [ImageItem(f, None) for f in plain], "none (predicted class)"
    items = sorted(items, key=lambda item: item.file)
    if not items:
        raise SystemExit(f"--data {data}: no images (expected {', '.join(IMAGE_SUFFIXES)} files, class "
                         f"sub-folders or a LABELS.tsv)")
    return items, source


def split_items(data: Path, max_images: int = 0, seed: int = 0,
                label_names: Optional[Sequence[str]] = None) -> CalibrationSplit:
    """The fixed choose/report halves of ``data`` (see the module docstring); too few images exit
    with how many the split needs."""
    items, source = folder_items(data, label_names)
    total = len(items)
    if max_images and max_images < total:
        items = sorted(random.Random(seed).sample(items, max_images), key=lambda item: item.file)
    choose, report = items[0::2], items[1::2]
    if len(report) < MIN_PER_HALF:
        raise SystemExit(f"--data {data}: {len(items)} images{' used' if len(items) < total else ''}; the "
                         f"choose/report split needs at least {2 * MIN_PER_HALF} ({MIN_PER_HALF} per half)")
    return CalibrationSplit(Path(data), source, total, choose, report)


def load_half(data: Path, items: Sequence[ImageItem], profile, device) -> Dict[str, object]:
    """A half's images preprocessed by ``profile`` (a :class:`~camserve.engine.models.ModelProfile`):
    ``{"images": (N, 3, H, W) model input, "crops": [0, 1] crops, "labels": (N,) or None, "files"}``."""
    photos = read_photos(data, [{"file": item.file} for item in items])
    images, crops = profile.model_input(photos, device)
    labels = [item.label for item in items]
    return {"images": images, "crops": crops, "files": [item.file for item in items],
            "labels": torch.tensor(labels) if all(label is not None for label in labels) else None}
