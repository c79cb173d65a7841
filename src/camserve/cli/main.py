"""``camserve`` — one command, several subcommands, each in its own module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when chosen, so ``camserve batch`` does not pay for the evaluation's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "archive": ("camserve.cli.archive", "build a TorchServe .mar from a model spec (torchvision, timm, eager, transformers)"),
    "layers": ("camserve.cli.layers", "list a model spec's feature-map layers, stages and default CAM layer"),
    "batch": ("camserve.cli.batch", "explain a folder or file list; heatmaps, records and an HTML report"),
    "evaluate": ("camserve.lab.evaluate", "deletion/insertion faithfulness per layer and method"),
    "evaluate-faithfulness": ("camserve.lab.evaluate_faithfulness",
                              "issue-15 protocol: fixed split, both deletion baselines, paired stats, sanity checks"),
    "evaluate-embedding": ("camserve.lab.evaluate_embedding", "deletion/insertion faithfulness of similarity maps (FAM)"),
    "bench": ("camserve.lab.bench", "latency, throughput and memory of explanations vs plain inference"),
    "gallery": ("camserve.cli.gallery", "build a FAM retrieval gallery (.npz) from a folder of labelled photographs"),
    "kserve": ("camserve.cli.kserve", "serve a model spec or .mar as a KServe predictor (v1 :predict/:explain, v2 /infer)"),
    "kserve-layout": ("camserve.cli.kserve_layout", "write the model-store + config.properties layout KServe's TorchServe runtime reads"),
    "drift": ("camserve.cli.drift", "explanation drift: reference vs current audit/batch records, per class; JSON, HTML, exit 1 on drift"),
    "calibrate": ("camserve.cli.calibrate", "per stage, the most faithful CAM reading on your images; model card JSON + HTML"),
    "view": ("camserve.cli.view", "a local web page: an image's top-k and maps side by side (methods x layers)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"camserve {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
