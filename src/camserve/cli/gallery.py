"""``camserve gallery``: build the FAM gallery shipped in ``effnet_lite0_embed.mar`` (run by ``archive.sh``).

``camserve gallery PHOTOS_DIR OUT.npz [--count 12]`` takes every
``len/count``-th photograph of ``PHOTOS_DIR/LABELS.tsv`` (class_index, wnid, name, file), embeds it
with the pretrained EfficientNet-Lite0 and writes a retrieval gallery (embeddings, labels, float16
feature maps) as ``.npz`` (no pickle). The gallery then lives inside the archive: serving never
reads the photo folder.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from camserve.engine.models.embedding import load_effnet_lite0_embedding
from camserve.engine import Gallery
from camserve.engine.models import EFFNET_LITE0 as p
from camserve.engine.imaging.preprocess import to_model_input
from camserve.serving.images import decode_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", type=Path, help="a folder of photographs with LABELS.tsv (class_index, wnid, name, file)")
    parser.add_argument("out", type=Path, help="the gallery file to write (.npz)")
    parser.add_argument("--count", type=int, default=12, help="how many photographs (evenly spaced; default 12)")


def run(args: argparse.Namespace) -> int:
    with open(args.photos / "LABELS.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    step = max(1, len(rows) // args.count)
    chosen = rows[::step][:args.count]
    images = [decode_image((args.photos / r["file"]).read_bytes()) for r in chosen]
    batch, _ = to_model_input(images, p.resize, p.crop, p.mean, p.std, torch.device("cpu"))
    model = load_effnet_lite0_embedding(normalize=True)
    gallery = Gallery.build(model, batch, [r["name"] for r in chosen])
    gallery.save(str(args.out))
    print(f"gallery of {len(gallery)} items ({', '.join(gallery.labels)}) → {args.out}")
    return 0
