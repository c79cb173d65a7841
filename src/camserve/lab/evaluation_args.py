"""The flags ``camserve evaluate`` and ``camserve evaluate-embedding`` share, and the torch set-up
they ask for.

The model-spec flags of :mod:`.model_args` (default: the bundled EfficientNet-Lite0), the image
folder, the curves' size and batching, Captum IG's steps, device, threads, seed and output folder;
each command passes its own defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import torch

from camserve.commands.model_args import add_model_arguments


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, limit: int, stride: int, steps: int,
                             batch_size: int, explain_batch: int, task_default: str = "classify") -> None:
    """Add the shared flags with the command's defaults."""
    parser.add_argument("--data", default=None, help="folder with LABELS.tsv and images, or one sub-folder per class "
                        "(default ../shared/data/imagenet-samples next to the repository)")
    parser.add_argument("--limit", type=int, default=limit, help=f"number of images (default {limit})")
    parser.add_argument("--stride", type=int, default=stride, help=f"take every k-th image (default {stride})")
    parser.add_argument("--steps", type=int, default=steps, help=f"deletion/insertion steps S (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"step images per forward (default {batch_size})")
    parser.add_argument("--explain-batch", type=int, default=explain_batch,
                        help=f"images per explanation pass (default {explain_batch})")
    parser.add_argument("--ig-steps", type=int, default=16, help="Captum IG steps (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-map floor")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_model_arguments(parser, task_default=task_default)


def start_run(args: argparse.Namespace) -> Tuple[torch.device, Path]:
    """Apply ``--threads``; the device and the (created) output folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return torch.device(args.device), out
