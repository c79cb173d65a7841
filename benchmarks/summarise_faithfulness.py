"""Compact tables from ``camserve evaluate-faithfulness`` JSON files (issue 15).

    python benchmarks/summarise_faithfulness.py benchmarks/results/faithfulness_cifar-resnet20_report.json \
        [--methods layercam,sc,sc[rel+plain]] > table.md

One table per file: per layer and method, overall (zero / blur deletion) ± SEM, the paired
difference vs LayerCAM ± SEM with win counts, rho12 (LayerCAM's for comparison), oma and rho_rand,
and which of the issue's bars the row clears (F, S, C, D, R as in the full tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from camserve.lab.evaluate_faithfulness import checks  # noqa: E402


def table(path: Path, methods=None) -> str:
    data = json.loads(path.read_text())
    meta, summary = data["meta"], data["summary"]
    rows = [r for r in summary if methods is None or r["method"] in methods]
    if methods:
        rows.sort(key=lambda r: (list(dict.fromkeys(x["layer"] for x in summary)).index(r["layer"]),
                                 methods.index(r["method"])))
    lines = [f"**{meta['model']}, {meta['half']} half, n = {meta['images']}** (`{meta['command']}`; "
             f"{meta['wall_seconds']} s; seed normalisation {meta.get('seed_norm', 'logit')})", "",
             "| layer | method | overall0 | Δ0 vs LayerCAM (wins/n) | overallB | ΔB vs LayerCAM (wins/n) | rho12 | oma | "
             "rho_rand all | checks |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        base = next((b for b in summary if b["layer"] == r["layer"] and b["method"] == "layercam"), None)
        d0 = (f"{r['d_overall0']:+.3f} ± {r['d_overall0_sem']:.3f} ({r['d_overall0_wins']}/{r['n']})"
              if "d_overall0" in r else "–")
        db = (f"{r['d_overallB']:+.3f} ± {r['d_overallB_sem']:.3f} ({r['d_overallB_wins']}/{r['n']})"
              if "d_overallB" in r else "–")
        rr = f"{r['rho_rand_all']:.2f}" if "rho_rand_all" in r else "–"
        lines.append(f"| {r['layer']} | {r['method']} | {r['overall0']:.3f} ± {r['overall0_sem']:.3f} | {d0} | "
                     f"{r['overallB']:.3f} ± {r['overallB_sem']:.3f} | {db} | {r['rho12']:.2f} | {r['oma']:+.3f} | {rr} | "
                     f"{checks(r, base)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--methods", default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    print("\n".join(table(Path(f), methods) for f in args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
