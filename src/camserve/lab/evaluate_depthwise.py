"""Shallow-CAM on depthwise-separable networks: the report-half table against LayerCAM and FG-CAM.

    python -m camserve.lab.evaluate_depthwise --models effnet_lite0,effnet_lite1,effnet_lite2 \\
        --report-images 32 --out /tmp/depthwise
    python -m camserve.lab.evaluate_depthwise --render /tmp/depthwise --out benchmarks/results

Issue 25, item 2. The readings are fixed in advance (each was chosen on a choose half before: the
plain and softmax starts of Shallow-CAM, ``sc[rel+plain]`` and ``sc[rel+soft]``, in
``shallowcam_variants.md``; FG-CAM and LayerCAM are the baselines), so this run measures the
**report half only**: the same seeded 200-image sample of ``../shared/data/imagenet-samples`` and
the same halves as ``camserve calibrate --max-images 200`` (odd positions), its first
``--report-images`` images, each model preprocessed by its own spec (Lite0 224, Lite1 240, Lite2 260).

Every reading at every stage of each model on the same images through the calibration protocol
(:meth:`camserve.lab.calibration.Calibrator.measure`: 16 steps, zero and blur deletion, seeded ties,
the curves on OpenVINO where it agrees with the model); per (stage, reading) the means ± SEM,
the paired difference vs LayerCAM on each deletion baseline (± SEM, wins), rho12 (the
class-sensitivity check: Spearman of the top-1 and top-2 maps, must not exceed LayerCAM's), cds and
oma. The randomisation check is not measured here (``camserve calibrate`` measures it).

The goal of the issue, per stage: both ``Δ0`` and ``ΔB`` ≥ +0.01 with rho12 ≤ LayerCAM's (column
``goal``). One JSON per model (``depthwise_<model>.json``: meta, rows, per-image records) and
``--render`` writes ``depthwise.md`` from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from camserve.commands.local_model import load_local_model
from camserve.commands.model_args import add_model_arguments
from camserve.engine.evaluation.metrics import mean_and_sem, paired
from camserve.engine.models import labels_for
from camserve.lab.calibration import Calibrator
from camserve.lab.calibration_images import load_half, split_items

MODELS = ("effnet_lite0", "effnet_lite1", "effnet_lite2")
READINGS = ("layercam", "fgcam", "sc[rel+plain]", "sc[rel+soft]")
KEYS = ("overall0", "overallB", "del0", "delB", "ins", "rho12", "cds", "oma")


def model_for(source: str, device: torch.device):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return load_local_model(parser.parse_args(["--source", source]), device, channels_last=True)


def stage_aliases(layers) -> Dict[str, str]:
    """``{module path: "stageN"}`` in depth order (the names ``camserve calibrate`` gives them)."""
    return {layer: f"stage{i + 1}" for i, layer in enumerate(layers)}


def rows_for(records: Dict[str, Dict[str, dict]], aliases: Dict[str, str]) -> List[dict]:
    """One row per (stage, reading): means ± SEM and the paired differences vs LayerCAM."""
    rows = []
    for layer, by_name in records.items():
        base = by_name["layercam"]
        base_rho12 = mean_and_sem(base["rho12"])[0]
        for name, record in by_name.items():
            row: Dict[str, object] = {"stage": aliases.get(layer, layer), "layer": layer, "reading": name,
                                      "n": record["n"]}
            for key in KEYS:
                row[key], row[key + "_sem"] = mean_and_sem(record[key])
            for key in ("overall0", "overallB"):
                cmp = paired(record[key], base[key])
                row[f"d_{key}"], row[f"d_{key}_sem"], row[f"d_{key}_wins"] = cmp["diff"], cmp["sem"], cmp["wins"]
            row["layercam_rho12"] = base_rho12
            row["class_specific"] = row["rho12"] <= base_rho12 + 1e-12
            row["goal"] = (name != "layercam" and row["d_overall0"] >= 0.01 and row["d_overallB"] >= 0.01
                           and row["class_specific"])
            row["explain_seconds"] = record["explain_seconds"]
            rows.append(row)
    return rows


def run_model(source: str, args, device) -> dict:
    started = time.time()
    model = model_for(source, device)
    stages = model.resolve_layers(list(model.profile.stages))
    aliases = stage_aliases(stages)
    layers = (model.resolve_layers([l.strip() for l in args.layers.split(",")]) if args.layers else stages)
    say = (lambda line: None) if args.quiet else (lambda line: print(f"{source} {line}", flush=True))
    calibrator = Calibrator(model.module, model.profile.input_size, layers, candidates=list(args.readings),
                            steps=args.steps, seed=args.seed, progress=say, eliminate_slice=0,
                            explain_batch=args.explain_batch, last_layer=stages[-1])
    calibrator.randomisation_images = 0          # not measured here (see the module docstring)
    labels = labels_for(model.spec, ".", calibrator.explainer.num_classes)
    split = split_items(Path(args.data), args.max_images, args.seed, labels)
    items = split.report[:args.report_images] if args.report_images else split.report
    half = load_half(split.data, items, model.profile, device)
    records, _ = calibrator.measure(half["images"], lambda layer: list(args.readings), "report")
    top1 = calibrator.top2(half["images"])[:, 0].cpu()
    accuracy = (float((top1 == half["labels"]).float().mean()) if half["labels"] is not None else None)
    return {"meta": {"model": source, "input_size": list(model.profile.input_size), "stage_paths": stages,
                     "readings": list(args.readings), "images": half["files"], "top1_accuracy": accuracy,
                     "split": split.describe() + f"; the first {len(items)} of the report half",
                     "curve_forward": calibrator.forward.describe(), "steps": args.steps, "seed": args.seed,
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                                f"device {device}", "wall_seconds": round(time.time() - started, 1),
                     "seconds": {k: round(v, 1) for k, v in calibrator.seconds.items()},
                     "command": "python -m camserve.lab.evaluate_depthwise " + " ".join(sys.argv[1:])},
            "rows": rows_for(records, aliases), "records": records}


def merge(parts: List[dict]) -> dict:
    """One model's result from runs over disjoint ``--layers`` (the same images): records joined in
    depth order, wall and part seconds summed, every run's command kept."""
    first = parts[0]
    if any(p["meta"]["images"] != first["meta"]["images"] for p in parts):
        raise SystemExit("evaluate_depthwise: the runs to merge measured different images")
    order = first["meta"]["stage_paths"]
    records = {layer: by_name for p in parts for layer, by_name in p["records"].items()}
    records = {layer: records[layer] for layer in order if layer in records}
    meta = dict(first["meta"], wall_seconds=round(sum(p["meta"]["wall_seconds"] for p in parts), 1),
                command="; ".join(p["meta"]["command"] for p in parts))
    meta["seconds"] = {k: round(sum(p["meta"]["seconds"].get(k, 0) for p in parts), 1) for k in first["meta"]["seconds"]}
    aliases = stage_aliases(order)
    return {"meta": meta, "rows": rows_for(records, aliases), "records": records}


def fmt(row: dict, key: str) -> str:
    return (f"{row[f'd_{key}']:+.3f} ± {row[f'd_{key}_sem']:.3f} ({row[f'd_{key}_wins']}/{row['n']})"
            if row["reading"] != "layercam" else "–")


def render(results: List[dict]) -> str:
    lines = ["# Shallow-CAM on depthwise-separable networks: report half vs LayerCAM and FG-CAM", "",
             "Produced by `python -m camserve.lab.evaluate_depthwise` (issue 25, item 2; the protocol and "
             "the choice of readings are in its docstring and in `docs/methods.md`). "
             "`overall0 = AUC(ins) − AUC(del to 0)`, `overallB = AUC(ins) − AUC(del to blur)`; Δ = paired "
             "difference vs LayerCAM on the same images ± SEM (wins of n); rho12 = Spearman(top-1 map, top-2 "
             "map) at layer resolution, mean (LayerCAM's beside it: a reading is class-specific when ≤); "
             "cds, oma > 0 wanted; **goal** = both Δ ≥ +0.01 and rho12 ≤ LayerCAM's.", ""]
    for result in results:
        meta = result["meta"]
        split = meta["split"].replace(str(Path(__file__).resolve().parents[3].parent / "shared"), "../shared")
        lines += [f"## {meta['model']} ({meta['input_size'][0]}×{meta['input_size'][1]})", "",
                  f"{split}; top-1 accuracy {meta['top1_accuracy']:.3f}; curve forward: "
                  f"{meta['curve_forward']}; {meta['machine']}; wall {meta['wall_seconds']} s "
                  f"(curves {meta['seconds'].get('curve_seconds', 0)} s, explanation passes "
                  f"{meta['seconds'].get('explain_seconds', 0)} s). "
                  f"Command: `{meta['command']}`.", "",
                  "| stage | reading | overall0 | Δ0 vs LayerCAM | overallB | ΔB vs LayerCAM | rho12 (LayerCAM) | cds | oma | goal |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in rows_for(result["records"], stage_aliases(result["meta"]["stage_paths"])
                            if "stage_paths" in result["meta"] else stage_aliases(result["records"])):
            lines.append(f"| {row['stage']} (`{row['layer']}`) | `{row['reading']}` | {row['overall0']:.3f} ± "
                         f"{row['overall0_sem']:.3f} | {fmt(row, 'overall0')} | {row['overallB']:.3f} ± "
                         f"{row['overallB_sem']:.3f} | {fmt(row, 'overallB')} | {row['rho12']:.2f} "
                         f"({row['layercam_rho12']:.2f}) | {row['cds']:+.3f} | {row['oma']:+.3f} | "
                         f"{'**yes**' if row['goal'] else ('–' if row['reading'] == 'layercam' else 'no')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camserve.lab.evaluate_depthwise",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--readings", default=",".join(READINGS), help="comma list of calibration readings")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3].parent / "shared" / "data" /
                                              "imagenet-samples"))
    parser.add_argument("--max-images", type=int, default=200, help="the seeded sample split into halves")
    parser.add_argument("--report-images", type=int, default=32, help="first k of the report half (0 = all)")
    parser.add_argument("--layers", default=None, help="comma list of stages or module paths (default: every stage)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explain-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--render", default=None, help="folder of depthwise_<model>.json: write depthwise.md")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="depthwise_<model>.json files of one model over disjoint --layers: write the joined "
                             "one into --out")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merged = merge([json.loads(Path(p).read_text()) for p in args.merge])
        path = out / f"depthwise_{merged['meta']['model']}.json"
        path.write_text(json.dumps(merged))
        print(f"wrote {path} ({len(merged['records'])} stages)")
        return 0
    if args.render:
        results = [json.loads(p.read_text()) for m in MODELS
                   for p in [Path(args.render) / f"depthwise_{m}.json"] if p.exists()]
        (out / "depthwise.md").write_text(render(results))
        print(f"wrote {out / 'depthwise.md'} ({len(results)} models)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.readings = [r.strip() for r in args.readings.split(",") if r.strip()]
    for source in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = run_model(source, args, torch.device("cpu"))
        path = out / f"depthwise_{source}.json"
        path.write_text(json.dumps(result))
        print(f"wrote {path} ({result['meta']['wall_seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
