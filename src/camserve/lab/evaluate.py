"""``camserve evaluate``: RISE deletion/insertion faithfulness per layer × method.

For every stage of the model (shallow to deep; default: the bundled EfficientNet-Lite0, or any
classifier spec ``camserve archive`` accepts, ``--layers`` as module paths or stage aliases) and
every method (the four Shallow-CAM variants, LayerCAM, Grad-CAM, Grad-CAM++, Relevance-CAM, Captum
IG when the Captum adapter is installed, and a random map as the floor) the maps of N real images
are scored with :func:`camserve.engine.evaluation.metrics.deletion_insertion`. Layer-free methods
(random, IG) are computed once and reported at every layer. Writes ``faithfulness.{csv,json,md}``,
``faithfulness_bars.png`` and ``faithfulness_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from camserve.engine.evaluation.metrics import mean_and_sem
from camserve.lab.evaluation_args import add_evaluation_arguments, start_run
from camserve.lab.evaluation_report import command_line, machine_summary, plot_bars, plot_curves, write_result_files
from camserve.lab.image_folders import default_data_dir, load_images
from camserve.commands.local_model import load_local_model
from camserve.engine import ExplainSpec
from camserve.engine import Explainer
from camserve.engine.evaluation.metrics import classifier_score, deletion_insertion, endpoint_scores, gaussian_blur, random_maps

#: evaluation name → (engine method, options); a method name expands to all its variants.
SHALLOWCAM_VARIANTS = OrderedDict([
    ("shallowcam[grad]", ("shallowcam", {"spatial": "gradient", "refine": False})),
    ("shallowcam[grad+refine]", ("shallowcam", {"spatial": "gradient", "refine": True})),
    ("shallowcam[rel]", ("shallowcam", {"spatial": "relevance", "refine": False})),
    ("shallowcam[rel+refine]", ("shallowcam", {"spatial": "relevance", "refine": True})),
])
LAYER_METHODS = OrderedDict(list(SHALLOWCAM_VARIANTS.items()) + [
    ("layercam", ("layercam", {})),
    ("gradcam", ("gradcam", {})),
    ("gradcampp", ("gradcampp", {})),
    ("relevancecam", ("relevancecam", {})),
])
IG_NAME = "captum.integrated_gradients"
LAYER_FREE = ("random", IG_NAME)
DEFAULT_METHODS = "shallowcam,layercam,gradcam,gradcampp,relevancecam," + IG_NAME + ",random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_evaluation_arguments(parser, limit=100, stride=5, steps=25, batch_size=64, explain_batch=16)
    parser.add_argument("--layers", default=None, help="comma list of module paths or stage aliases "
                        "(stage1 …; default: every stage of the model)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list; 'shallowcam' expands to its 4 variants, e.g. shallowcam[rel+refine]")
    parser.add_argument("--composite", default="epsilon_plus",
                        help="LRP composite of the relevance methods: epsilon_plus (default), epsilon_alpha2_beta1, epsilon, "
                             "epsilon_gamma[:γ] (LRP-γ, γ = 0.25 unless given)")


def expand_methods(text: str) -> List[str]:
    """``shallowcam`` → its four variants; other names pass through (validated)."""
    names: List[str] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if item in ("shallowcam", "shallow-cam", "shallow_cam"):
            names.extend(SHALLOWCAM_VARIANTS)
        elif item in LAYER_METHODS or item in LAYER_FREE:
            names.append(item)
        elif item in ("ig", "integrated_gradients"):
            names.append(IG_NAME)
        else:
            raise SystemExit(f"unknown method {item!r}; choose from shallowcam, {', '.join(list(LAYER_METHODS) + list(LAYER_FREE))}")
    return list(dict.fromkeys(names))


def ig_options(explainer, images, steps: int) -> Tuple[Optional[str], Dict]:
    """``(None, options)`` if the explainer serves ``captum.integrated_gradients`` (with ``steps``
    when the adapter takes it), else ``(why not, {})``."""

    errors = []
    for options in ({"steps": steps}, {"n_steps": steps}, {}):
        try:
            explainer.explain(images[:1], [ExplainSpec(IG_NAME, options=options)])
            return None, options
        except Exception as error:  # the adapter may be absent or name its options otherwise
            errors.append(f"{type(error).__name__}: {error}")
    return "; ".join(errors), {}


def explain_maps(explainer, images, classes, method: str, layer: Optional[str], options: Dict,
                 batch: int) -> torch.Tensor:
    """Maps ``(N, H, W)`` at input resolution for the predicted classes, ``batch`` images per pass."""

    out = []
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch]
        specs = [ExplainSpec(method, layer=layer, target=int(c), options=dict(options))
                 for c in classes[start:start + batch]]
        result = explainer.explain(chunk, specs)
        out.extend(e.maps[0] for e in result.explanations)
    return torch.stack(out)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    methods = expand_methods(args.methods)
    device, out = start_run(args)
    started = time.time()

    local = load_local_model(args, device, channels_last=True)
    if local.spec.task != "classify":
        raise SystemExit("camserve evaluate scores classifiers; explain an embedding model with camserve evaluate-embedding")
    profile, model = local.profile, local.module
    layers = local.resolve_layers([l.strip() for l in args.layers.split(",") if l.strip()] if args.layers
                                  else profile.stages)
    explainer = Explainer.for_profile(model, profile, composite=args.composite)
    images, rows = load_images(Path(args.data) if args.data else default_data_dir(), args.limit, args.stride,
                               profile, device)
    n = images.shape[0]
    with torch.inference_mode():
        logits = torch.cat([model(images[i:i + args.batch_size]) for i in range(0, n, args.batch_size)])
    classes = logits.argmax(dim=1)
    labels = torch.tensor([int(r["class_index"]) for r in rows], device=device)
    notes: List[str] = []
    if IG_NAME in methods:
        reason, ig_opts = ig_options(explainer, images, args.ig_steps)
        if reason:
            notes.append(f"{IG_NAME} skipped: {reason}")
            methods.remove(IG_NAME)

    score = classifier_score(model, classes)
    blurred = gaussian_blur(images)
    endpoints = endpoint_scores(score, images, blurred, args.batch_size)
    layer_methods = [m for m in methods if m in LAYER_METHODS]
    free_methods = [m for m in methods if m in LAYER_FREE]
    # Shallow-CAM's variants and LayerCAM at every layer first, then the other CAMs: the results are
    # written after every (layer, method), so a run stopped early still covers the headline comparison.
    first = [m for m in layer_methods if m in SHALLOWCAM_VARIANTS or m == "layercam"]
    jobs = [(None, m) for m in free_methods] + [(l, m) for l in layers for m in first] + \
        [(l, m) for l in layers for m in layer_methods if m not in first]
    per_map = 2 * n * max(args.steps - 1, 0)
    bar = tqdm(total=per_map * len(jobs), unit="img", disable=args.no_progress, desc="deletion/insertion")

    results: Dict[Tuple[Optional[str], str], dict] = {}
    for layer, name in jobs:
        bar.set_postfix_str(f"{layer or 'input'} {name}")
        t0 = time.perf_counter()
        if name == "random":
            maps = random_maps(n, images.shape[-2:], seed=args.seed, device=device)
        elif name == IG_NAME:
            maps = explain_maps(explainer, images, classes, IG_NAME, None, ig_opts, args.explain_batch)
        else:
            method, options = LAYER_METHODS[name]
            maps = explain_maps(explainer, images, classes, method, layer, options, args.explain_batch)
        explain_seconds = time.perf_counter() - t0
        curves = deletion_insertion(score, images, maps, steps=args.steps, batch_size=args.batch_size,
                                    blurred=blurred, endpoints=endpoints, progress=bar.update)
        results[(layer, name)] = {"layer": layer or "input", "method": name, "n": n, **curves.record(),
                                  "explain_seconds": explain_seconds}
        meta = run_meta(args, local, layers, rows, classes, labels, device, started, notes,
                        complete=len(results) == len(jobs))
        write_outputs(out, meta, summarise(results, layers, methods), results, layers, methods,
                      plots=len(results) == len(jobs))
    bar.close()

    summary = summarise(results, layers, methods)
    meta = run_meta(args, local, layers, rows, classes, labels, device, started, notes, complete=True)
    write_outputs(out, meta, summary, results, layers, methods, plots=True)
    print(markdown_table(summary, layers, methods, meta))
    print(f"wrote {out}/faithfulness.{{csv,json,md}}, faithfulness_bars.png, faithfulness_curves.png")
    return 0


def run_meta(args, local, layers, rows, classes, labels, device, started, notes, complete: bool) -> dict:
    return {
        "command": command_line("evaluate"), "complete": complete, **local.meta(), "layers": list(layers),
        "images": len(rows), "files": [r["file"] for r in rows], "steps": args.steps,
        "batch_size": args.batch_size, "device": str(device), "torch_threads": torch.get_num_threads(),
        "composite": args.composite, "machine": machine_summary(),
        "top1_accuracy_on_these_images": float((classes == labels).float().mean()),
        "deletion_fill": "zeros in normalised space", "insertion_start": "Gaussian blur, kernel 11, sigma 5",
        "score": "softmax probability of the class predicted on the clean image",
        "wall_seconds": round(time.time() - started, 1), "notes": list(notes),
    }


def summarise(results, layers, methods) -> List[dict]:
    """One row per (layer, method): means and standard errors over images."""
    rows = []
    for layer in layers:
        for name in methods:
            r = results.get((layer, name)) or results.get((None, name))
            if r is None:
                continue
            row = {"layer": layer, "method": name, "n": r["n"]}
            for key in ("deletion_auc", "insertion_auc", "overall"):
                row[key], row[key + "_sem"] = mean_and_sem(r[key])
            rows.append(row)
    return rows


def markdown_table(summary, layers, methods, meta) -> str:
    """Overall score per layer (rows) × method (columns); the best per layer in bold."""
    table = {(r["layer"], r["method"]): r for r in summary}
    lines = [f"Overall = AUC(insertion) − AUC(deletion), mean over {meta['images']} images, "
             f"{meta['steps']} steps, {meta['model']} (higher is better; best per layer in bold).", "",
             "| layer | " + " | ".join(methods) + " | best |",
             "|---|" + "---:|" * len(methods) + "---|"]
    for layer in layers:
        values = {m: table[(layer, m)]["overall"] for m in methods if (layer, m) in table}
        if not values:
            continue
        best = max(values, key=values.get)
        cells = [(f"**{values[m]:.3f}**" if m == best else f"{values[m]:.3f}") if m in values else "–" for m in methods]
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {best} |")
    lines += ["", "Deletion AUC (lower is better) / insertion AUC (higher is better):", "",
              "| layer | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for layer in layers:
        cells = [f"{table[(layer, m)]['deletion_auc']:.3f} / {table[(layer, m)]['insertion_auc']:.3f}"
                 if (layer, m) in table else "–" for m in methods]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    variants = [m for m in methods if m in SHALLOWCAM_VARIANTS]
    if variants and "layercam" in methods:
        lines += ["", "Shallow-CAM vs LayerCAM (overall, ± standard error of the mean):", "",
                  "| layer | best Shallow-CAM variant | its overall | LayerCAM | beats LayerCAM? |", "|---|---|---:|---:|---|"]
        for layer in layers:
            present = [m for m in variants if (layer, m) in table]
            if not present or (layer, "layercam") not in table:
                continue
            best = max(present, key=lambda m: table[(layer, m)]["overall"])
            s, l = table[(layer, best)], table[(layer, "layercam")]
            lines.append(f"| {layer} | {best} | {s['overall']:.3f} ± {s['overall_sem']:.3f} | "
                         f"{l['overall']:.3f} ± {l['overall_sem']:.3f} | {'yes' if s['overall'] > l['overall'] else 'no'} |")
        done = [layer for layer in layers if all((layer, m) in table for m in variants)]
        means = {m: sum(table[(layer, m)]["overall"] for layer in done) / max(len(done), 1) for m in variants}
        lines += ["", "Mean overall over layers per Shallow-CAM variant: " +
                  ", ".join(f"{m} {v:.3f}" for m, v in sorted(means.items(), key=lambda kv: -kv[1]))]
    if not meta.get("complete", True):
        lines += ["", "**Partial run** (stopped before every (layer, method) was scored)."]
    if meta.get("notes"):
        lines += [""] + [f"Note: {note}" for note in meta["notes"]]
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_seconds']} s on {meta['machine']}, device {meta['device']})"]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta, summary, results, layers, methods, plots: bool = True) -> None:
    write_result_files(out, "faithfulness", meta, summary, results, markdown_table(summary, layers, methods, meta))
    if plots:
        plot(out, summary, results, layers, methods)


def plot(out: Path, summary, results, layers, methods) -> None:
    table = {(r["layer"], r["method"]): r for r in summary}
    plot_bars(out / "faithfulness_bars.png", layers, methods, table, "Faithfulness per layer (higher is better)",
              figsize=(max(8, 1.3 * len(layers)), 4.5), rotation=20, ncol=2, capsize=1.5)
    plot_curves(out / "faithfulness_curves.png", layers, methods,
                lambda layer, m: results.get((layer, m)) or results.get((None, m)),
                score="p(class)", xlabel="fraction of pixels", column_size=(2.6, 5.2))
