"""Which LRP composite makes Shallow-CAM's (and Relevance-CAM's) relevance most faithful?

Runs ``camserve evaluate --composite C`` for every composite of
``camserve.engine.lrp.composites`` on the same photographs, layers and steps as the committed
faithfulness run, then writes ``benchmarks/results/composites.md`` (overall = AUC(ins) − AUC(del)
per layer × method × composite). A composite whose output folder already holds a complete
``faithfulness.json`` is not run again (``--work``)::

    python benchmarks/compare_composites.py --work /tmp/composites
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from camserve.cli.main import main as camserve

COMPOSITES = ("epsilon_plus", "epsilon_alpha2_beta1", "epsilon")
METHODS = ("shallowcam[rel]", "relevancecam")
LAYERS = ("_blocks.2", "_blocks.4", "_blocks.10", "_conv_head")
EVALUATE = ["--threads", "1", "--limit", "12", "--stride", "41", "--steps", "8", "--batch-size", "56",
            "--explain-batch", "12", "--no-progress"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/composites", help="one evaluate output folder per composite")
    parser.add_argument("--composites", default=",".join(COMPOSITES))
    parser.add_argument("--out", default="benchmarks/results/composites.md")
    parser.add_argument("--note", action="append", default=[], help="a line appended to the table (repeatable)")
    args = parser.parse_args()
    composites = [c for c in args.composites.split(",") if c]
    runs = {}
    for composite in composites:
        folder = Path(args.work) / composite
        done = folder / "faithfulness.json"
        if not (done.exists() and json.loads(done.read_text())["meta"].get("complete")):
            code = camserve(["evaluate", *EVALUATE, "--layers", ",".join(LAYERS), "--methods", ",".join(METHODS),
                             "--composite", composite, "--out", str(folder)])
            if code:
                return code
        runs[composite] = json.loads(done.read_text())
    Path(args.out).write_text(table(runs) + "".join(f"\n{note}\n" for note in args.note))
    print(Path(args.out).read_text())
    return 0


def table(runs) -> str:
    first = next(iter(runs.values()))["meta"]
    lines = ["# LRP composite for the relevance methods (EfficientNet-Lite0)", "",
             f"Overall = AUC(insertion) − AUC(deletion), mean ± SEM over {first['images']} photographs "
             f"(every 41st sample), {first['steps']} steps, RISE as in `faithfulness.md` (higher is better; best "
             "composite per layer and method in bold). `shallowcam[rel]` = Shallow-CAM's default options "
             "(whose start was contrastive until issue 15 and is plain since).", "",
             "| layer | method | " + " | ".join(runs) + " |", "|---|---|" + "---:|" * len(runs)]
    rows = {c: {(r["layer"], r["method"]): r for r in run["summary"]} for c, run in runs.items()}
    wins = {c: 0 for c in runs}
    for layer in LAYERS:
        for method in METHODS:
            values = {c: rows[c][(layer, method)] for c in runs if (layer, method) in rows[c]}
            best = max(values, key=lambda c: values[c]["overall"])
            if max(v["overall"] for v in values.values()) - min(v["overall"] for v in values.values()) < 1e-9:
                best = None  # identical maps (no convolution above the layer): a tie
            else:
                wins[best] += 1
            cells = [(f"**{values[c]['overall']:.3f} ± {values[c]['overall_sem']:.3f}**" if c == best else
                      f"{values[c]['overall']:.3f} ± {values[c]['overall_sem']:.3f}") if c in values else "–" for c in runs]
            lines.append(f"| {layer} | {method} | " + " | ".join(cells) + " |")
    for method in METHODS:
        means = {c: sum(rows[c][(l, method)]["overall"] for l in LAYERS) / len(LAYERS) for c in runs}
        lines.append(f"| mean | {method} | " + " | ".join(f"{means[c]:.3f}" for c in runs) + " |")
    lines += ["", "Best composite per (layer, method), ties left out: " +
              ", ".join(f"{c} {n}" for c, n in wins.items()), ""]
    lines += paired(runs, default=next(iter(runs)))
    lines += ["",
              "Explanation seconds per composite (all maps of the run, CPU, 1 thread, shared machine): " +
              ", ".join(f"{c} {sum(m['explain_seconds'] for m in run['per_map']):.0f} s" for c, run in runs.items()),
              "", "Command: `python benchmarks/compare_composites.py --work /tmp/composites`; per composite C: "
              "`camserve evaluate " + " ".join(EVALUATE) + f" --layers {','.join(LAYERS)} --methods "
              f"{','.join(METHODS)} --composite C`"]
    return "\n".join(lines) + "\n"


def paired(runs, default: str):
    """Per-image paired differences ``overall(C) − overall(default)``, mean ± SEM, and how many images improve."""
    per = {c: {(r["layer"], r["method"]): r["overall"] for r in run["per_map"]} for c, run in runs.items()}
    others = [c for c in runs if c != default]
    lines = [f"Paired difference to {default} (per photograph: overall(C) − overall({default}), mean ± SEM, "
             "photographs improved):", "", "| layer | method | " + " | ".join(others) + " |",
             "|---|---|" + "---:|" * len(others)]
    for layer in LAYERS:
        for method in METHODS:
            cells = []
            for c in others:
                d = [a - b for a, b in zip(per[c][(layer, method)], per[default][(layer, method)])]
                mean = sum(d) / len(d)
                sem = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5 if len(d) > 1 else 0.0
                cells.append(f"{mean:+.3f} ± {sem:.3f} ({sum(x > 0 for x in d)}/{len(d)})")
            lines.append(f"| {layer} | {method} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
