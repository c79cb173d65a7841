"""``camserve gallery``: build the FAM gallery shipped in ``effnet_lite0_embed.mar`` (run by ``archive.sh``).

``camserve gallery PHOTOS_DIR OUT.npz [--count 12]`` takes every
``len/count``-th photograph of ``PHOTOS_DIR/LABELS.tsv`` (class_index, wnid, name, file), embeds it
with the pretrained EfficientNet-Lite0 and writes a retrieval gallery (embeddings, labels, float16
feature maps) as ``.npz`` (no pickle). The gallery then lives inside the archive: serving never
reads the photo folder.

``camserve gallery SUPPORT_DIR OUT.npz --shots K``: a folder with one sub-folder per class (the
folder's name is the label) — the support set of few-shot prototypes (``prototypes=true``): the first
``K`` images of each class by file name (``--shots 0``: all of them).

Any embedding model: the model-spec flags of ``camserve archive --task embed`` (``--source``,
``--model-file``, ``--feature-layer``, ``--preprocess`` …; default the bundled EfficientNet-Lite0) embed
the photographs exactly as that archive's worker will, with its preprocessing.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from camserve.commands.model_args import add_model_arguments, load_for_cli, spec_from_args
from camserve.engine import Gallery
from camserve.engine.models import embedding_model_for
from camserve.serving.images import decode_image


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", type=Path, help="a folder of photographs with LABELS.tsv (class_index, wnid, name, "
                                                  "file), or one sub-folder per class (with --shots)")
    parser.add_argument("out", type=Path, help="the gallery file to write (.npz)")
    parser.add_argument("--count", type=int, default=12, help="how many photographs (evenly spaced; default 12)")
    parser.add_argument("--shots", type=int, default=None,
                        help="class sub-folders: the first K images of each class (0 = all); the labels are the "
                             "folders' names")
    add_model_arguments(parser, task_default="embed")


def support_rows(folder: Path, shots: int) -> list:
    """``{"file", "name"}`` rows of a class-folder support set: the first ``shots`` images per class."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    rows = []
    for cls in classes:
        files = sorted(f for f in cls.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        rows += [{"file": f"{cls.name}/{f.name}", "name": cls.name} for f in (files[:shots] if shots else files)]
    labels = {r["name"] for r in rows}
    if len(labels) < 2:
        raise SystemExit(f"camserve gallery: {folder} needs at least 2 class sub-folders with images "
                         f"(found {sorted(labels) or 'none'})")
    return rows


def run(args: argparse.Namespace) -> int:
    if args.shots is not None:
        if args.shots < 0:
            raise SystemExit("camserve gallery: --shots must be >= 0")
        chosen = support_rows(args.photos, args.shots)
    else:
        with open(args.photos / "LABELS.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        step = max(1, len(rows) // args.count)
        chosen = rows[::step][:args.count]
    spec, _config = spec_from_args(args, task_default="embed")
    if spec.task != "embed":
        raise SystemExit("camserve gallery: a gallery holds embeddings: give an embedding model (--task embed)")
    loaded = load_for_cli(spec, torch.device("cpu"))
    model, _route = embedding_model_for(loaded)
    images = [decode_image((args.photos / r["file"]).read_bytes()) for r in chosen]
    batch, _ = loaded.profile.model_input(images, torch.device("cpu"))
    gallery = Gallery.build(model, batch, [r["name"] for r in chosen])
    gallery.save(str(args.out))
    print(f"gallery of {len(gallery)} items ({', '.join(dict.fromkeys(gallery.labels))}) → {args.out}")
    return 0
