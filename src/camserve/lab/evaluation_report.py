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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: Path, groups, methods, table, title: str, figsize, rotation: int = 0, ncol: int = 1,
              capsize: float = 2) -> None:
    """One bar per (group, method): ``table[(group, method)]["overall"]`` ± its ``overall_sem``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [table[(g, m)]["overall"] if (g, m) in table else 0 for g in groups], width,
               yerr=[table[(g, m)]["overall_sem"] if (g, m) in table else 0 for g in groups], label=m, capsize=capsize)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=rotation)
    ax.set_ylabel("AUC(insertion) − AUC(deletion)")
    ax.set_title(title)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, columns, methods, record_for, score: str, xlabel: str, column_size) -> None:
    """Mean deletion (top row) and insertion (bottom row) curves per column and method;
    ``record_for(column, method)`` gives the record with ``fractions`` and the mean curves, or None."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(columns), figsize=(column_size[0] * len(columns), column_size[1]),
                             squeeze=False, sharey=True)
    for i, column in enumerate(columns):
        for m in methods:
            r = record_for(column, m)
            if r is None:
                continue
            axes[0, i].plot(r["fractions"], r["mean_deletion_curve"], label=m, lw=1)
            axes[1, i].plot(r["fractions"], r["mean_insertion_curve"], label=m, lw=1)
        axes[0, i].set_title(column, fontsize=9)
        axes[1, i].set_xlabel(xlabel)
    axes[0, 0].set_ylabel(f"deletion: {score}")
    axes[1, 0].set_ylabel(f"insertion: {score}")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
