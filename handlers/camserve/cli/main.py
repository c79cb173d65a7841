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
    "batch": ("camserve.cli.batch", "explain a folder or file list; heatmaps, records and an HTML report"),
    "evaluate": ("camserve.cli.evaluate", "deletion/insertion faithfulness per layer and method"),
    "evaluate-embedding": ("camserve.cli.evaluate_embedding", "deletion/insertion faithfulness of similarity maps (FAM)"),
    "bench": ("camserve.cli.bench", "latency, throughput and memory of explanations vs plain inference"),
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
