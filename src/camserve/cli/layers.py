"""``camserve layers``: the layers of a model spec as camserve discovers them, before archiving.

    camserve layers --source torchvision --arch resnet50
    camserve layers --source eager --model-file model.py --class-name CifarResNet --kwargs '{"depth": 20}' \\
        --weights resnet20.th --preprocess crop=32

One probe forward at the spec's input size lists every module whose output is a feature map (or a
token grid / channels-last map), its layout, shape and stride; the stages (``stage1`` … aliases a
request may name) and the default CAM layer are marked.
"""

from __future__ import annotations

import argparse

from camserve.commands.model_args import add_model_arguments
from camserve.engine.core.layers import format_table
from camserve.commands.local_model import load_local_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--all", action="store_true", help="every feature-map module, not only the stages")


def run(args: argparse.Namespace) -> int:
    import torch

    model = load_local_model(args, torch.device("cpu"))  # a spec that cannot be built exits with why
    spec, profile = model.spec, model.profile
    print(f"{spec.source}{(' ' + spec.arch) if spec.arch else ''}: input {profile.crop}x{profile.crop} "
          f"(resize {profile.resize}, mean {list(profile.mean)}, std {list(profile.std)}, {profile.interpolation})")
    print(f"default layer: {profile.default_layer}")
    print("stages: " + ", ".join(f"{alias}={name}" for alias, name in model.stage_aliases.items()))
    rows = model.catalog.table()
    print(format_table(rows if args.all else [r for r in rows if r.stage]))
    return 0
