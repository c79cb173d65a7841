"""What both evaluation CLIs write: the result files and the run fields of their ``meta``."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
from pathlib import Path


def command_line(subcommand: str) -> str:
    """``camserve <subcommand> <its arguments>`` as this process was started."""
    argv = sys.argv[2:] if sys.argv[1:2] == [subcommand] else sys.argv[1:]
    return f"camserve {subcommand} " + " ".join(argv)


def machine_summary() -> str:
    """``<processor>, <n> CPUs``."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_result_files(out: Path, stem: str, meta, summary, results, markdown: str) -> None:
    """``<stem>.csv`` (the summary rows), ``<stem>.json`` (meta, summary, every per-map record) and
    ``<stem>.md`` (the given tables)."""
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
        writer.writeheader()
        writer.writerows(summary)
    with open(out / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "per_map": [dict(r) for r in results.values()]}, f, indent=1)
    (out / f"{stem}.md").write_text(markdown)
