"""``camserve evaluate-embedding``: RISE deletion/insertion on the similarity of an embedding model.

The classifier metric of :mod:`camserve.lab.evaluate`, with the score swapped for the cosine
similarity of the (modified) query's embedding to the fixed embedding of its reference
(:func:`camserve.engine.evaluation.metrics.similarity_score`): pixels of the **query** are ranked by its map;
deletion sets them to 0 (normalised space), insertion starts from the blurred query and restores
them; ``overall = AUC(insertion) − AUC(deletion)`` of the similarity curve.

Model: by default the pretrained EfficientNet-Lite0 embedding (``GAP`` of the 1280-channel head
map, L2-normalised, D = 1280); any ``--task embed`` spec ``camserve archive`` accepts (its
``embedding``/``feature_layer`` choose FAM's pooled or Jacobian route, as when served). Pairs,
built from N images of ``--data`` (default ``imagenet-samples``):

* ``flip`` — reference = the query mirrored left-right (same object, same scale);
* ``zoom`` — reference = a tighter centre crop of the same image (shorter side resized to
  ``--zoom-resize``, default 1.25 × the model's resize, then the model's crop: same object, ×1.25 scale);
* ``neighbour`` — reference = the most similar *other* image of the pool (every image of the
  folder unless ``--pool-limit``): a related but different object, usually a related class.

Methods, each explaining the query's similarity to its reference:

* ``fam`` — FAM, pooled route (no backward): ``ReLU(Σ_k w_k A_k)``, ``w ∝ q_k r_k``;
* ``gradcam_similarity`` — Grad-CAM on the similarity: ``α_k = mean_ij ∂s/∂A_kij``;
* ``captum.integrated_gradients`` — Captum IG of the cosine similarity
  (:func:`~camserve.engine.methods.captum.attribute.similarity_forward`), zero baseline in normalised space,
  ``|attribution|`` summed over channels (the adapter's default reduction);
* ``random`` — uniform noise, the floor.

Writes ``fam_faithfulness.{csv,json,md}``, ``fam_faithfulness_bars.png`` and
``fam_faithfulness_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from camserve.engine.evaluation.metrics import mean_and_sem
from camserve.lab.evaluation_args import add_evaluation_arguments, start_run
from camserve.lab.evaluation_report import command_line, machine_summary, plot_bars, plot_curves, write_result_files
from camserve.lab.image_folders import default_data_dir, image_rows, read_photos
from camserve.commands.local_model import load_local_model
from camserve.engine.imaging.preprocess import to_model_input
from camserve.engine.methods.captum.attribute import attribute, similarity_forward
from camserve.engine.methods.similarity.fam import FamSpec
from camserve.engine.evaluation.metrics import random_maps
from camserve.engine.methods.similarity.fam import FamExplainer
from camserve.engine.evaluation.metrics import deletion_insertion, endpoint_scores, gaussian_blur, similarity_score

PAIR_KINDS = ("flip", "zoom", "neighbour")
METHODS = ("fam", "gradcam_similarity", "captum.integrated_gradients", "random")
OUTPUT_STEM = "fam_faithfulness"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_evaluation_arguments(parser, limit=16, stride=31, steps=8, batch_size=56, explain_batch=8,
                             task_default="embed")
    parser.add_argument("--pairs", default=",".join(PAIR_KINDS), help=f"comma list of {', '.join(PAIR_KINDS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--pool-limit", type=int, default=0,
                        help="neighbour candidates: the first k images of the folder (0 = all)")
    parser.add_argument("--zoom-resize", type=int, default=None, help="shorter side before the model's crop "
                        "for the zoom reference (default: 1.25 × the model's resize, 320 for EfficientNet-Lite0)")


def parse_list(text: str, allowed, what: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


class DifferentiableEmbedding(nn.Module):
    """The embedding of an :class:`~camserve.engine.models.embedding.EmbeddingModel`, with autograd
    (its ``forward`` runs under ``no_grad``; Captum needs the gradient w.r.t. the input): ``head(A)``'s
    ``e`` of a wrapped backbone, the model's own (normalised) output of a user embedding model."""

    def __init__(self, embedding_model):
        super().__init__()
        self.embedding_model = embedding_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding_model.output_is_embedding:
            return self.embedding_model.trace(x, grad=True).embedding
        return self.embedding_model.head(self.embedding_model.features(x))[2]


def embed_all(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def build_pairs(args, profile, model, device) -> Tuple[Dict[str, dict], List[dict], List[str]]:
    """``{kind: {"queries": (n,3,H,W), "references": (n,3,H,W), "reference_files": [...]}}``."""

    data = Path(args.data) if args.data else default_data_dir()
    all_rows = image_rows(data)
    rows = all_rows[::max(1, args.stride)][:args.limit]
    photos = read_photos(data, rows)
    norm = (profile.mean, profile.std, device, profile.interpolation)
    queries, _ = profile.model_input(photos, device)
    zoom_resize = args.zoom_resize or int(round(1.25 * profile.resize))
    kinds = parse_list(args.pairs, PAIR_KINDS, "pair kind")
    pairs: Dict[str, dict] = {}
    notes: List[str] = []
    for kind in kinds:
        if kind == "flip":
            pairs[kind] = {"queries": queries, "references": queries.flip(-1),
                           "reference_files": [r["file"] + " (mirrored)" for r in rows]}
        elif kind == "zoom":
            zoomed, _ = to_model_input(photos, zoom_resize, profile.crop, *norm)
            pairs[kind] = {"queries": queries, "references": zoomed,
                           "reference_files": [r["file"] + f" (resize {zoom_resize}, crop {profile.crop})"
                                               for r in rows]}
        else:
            pool_rows = all_rows[:args.pool_limit] if args.pool_limit else all_rows
            pool_embeddings, chosen = [], []
            for start in range(0, len(pool_rows), 32):  # read and embed the pool in chunks (bounded memory)
                chunk, _ = profile.model_input(read_photos(data, pool_rows[start:start + 32]), device)
                pool_embeddings.append(embed_all(model, chunk, args.batch_size))
            pool = torch.cat(pool_embeddings)
            query_embeddings = embed_all(model, queries, args.batch_size)
            similarity = query_embeddings @ pool.T
            for i, row in enumerate(rows):
                for j in similarity[i].argsort(descending=True).tolist():
                    if pool_rows[j]["file"] != row["file"]:
                        chosen.append(pool_rows[j])
                        break
            references, _ = profile.model_input(read_photos(data, chosen), device)
            pairs[kind] = {"queries": queries, "references": references,
                           "reference_files": [r["file"] for r in chosen],
                           "same_class": [c["class_index"] == r["class_index"] for c, r in zip(chosen, rows)]}
            notes.append(f"neighbour pool: {len(pool_rows)} photographs")
    return pairs, rows, notes


def method_maps(method: str, fam, ig_model, queries, references, ref_embeddings, args, device) -> torch.Tensor:
    """Query maps ``(n, H, W)`` in [0, 1] at input resolution explaining ``cos(E(query), E(reference))``."""

    n = queries.shape[0]
    if method == "random":
        return random_maps(n, queries.shape[-2:], seed=args.seed, device=device)
    out = []
    for start in range(0, n, args.explain_batch):
        sl = slice(start, start + args.explain_batch)
        if method == "captum.integrated_gradients":
            forward = similarity_forward(ig_model, ref_embeddings[sl], "cosine")
            targets = torch.arange(queries[sl].shape[0], device=device)
            out.append(attribute(forward, queries[sl], targets, method, {"steps": args.ig_steps}).maps)
        else:
            specs = [FamSpec(reference_image=r, method=method, similarity="cosine") for r in references[sl]]
            result = fam.explain(queries[sl], specs)
            out.append(torch.stack([item.query_map for item in result.items]))
    return torch.cat(out)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    methods = parse_list(args.methods, METHODS, "method")
    device, out = start_run(args)
    started = time.time()

    local = load_local_model(args, device, task_default="embed", channels_last=True)
    if local.spec.task != "embed":
        raise SystemExit("camserve evaluate-embedding explains embedding models (--task embed); "
                         "score a classifier with camserve evaluate")
    profile = local.profile
    model, route = local.embedding()
    fam = FamExplainer(model, input_size=profile.input_size)
    ig_model = DifferentiableEmbedding(model)
    embedding = {"model": embedding_description(local, model, route, fam.dim), "route": route,
                 "feature_layer": model.feature_layer or profile.default_layer, "dim": fam.dim}
    pairs, rows, notes = build_pairs(args, profile, model, device)
    n = len(rows)
    per_map = 2 * n * max(args.steps - 1, 0)
    bar = tqdm(total=per_map * len(pairs) * len(methods), unit="img", disable=args.no_progress,
               desc="similarity deletion/insertion")

    results: Dict[Tuple[str, str], dict] = {}
    pair_meta = {}
    for kind, pair in pairs.items():
        queries, references = pair["queries"], pair["references"]
        ref_embeddings = embed_all(model, references, args.batch_size)
        score = similarity_score(model, ref_embeddings)
        blurred = gaussian_blur(queries)
        endpoints = endpoint_scores(score, queries, blurred, args.batch_size)
        pair_meta[kind] = {"reference_files": pair["reference_files"],
                           "clean_similarity": endpoints.clean.tolist(),
                           "blurred_similarity": endpoints.blurred.tolist(),
                           "zeros_similarity": endpoints.zeros.tolist()}
        if "same_class" in pair:
            pair_meta[kind]["same_class"] = pair["same_class"]
        for method in methods:
            bar.set_postfix_str(f"{kind} {method}")
            t0 = time.perf_counter()
            maps = method_maps(method, fam, ig_model, queries, references, ref_embeddings, args, device)
            explain_seconds = time.perf_counter() - t0
            curves = deletion_insertion(score, queries, maps, steps=args.steps, batch_size=args.batch_size,
                                        blurred=blurred, endpoints=endpoints, progress=bar.update)
            results[(kind, method)] = {"pairs": kind, "method": method, "n": n, **curves.record(),
                                       "explain_seconds": round(explain_seconds, 3)}
            kinds_done = sorted({k for k, _ in results}, key=list(pairs).index)
            meta = run_meta(args, local, embedding, rows, pair_meta, device, started, notes,
                            complete=len(results) == len(pairs) * len(methods))
            write_outputs(out, meta, summarise(results, kinds_done, methods), results, kinds_done, methods,
                          plots=meta["complete"])
    bar.close()
    kinds = list(pairs)
    summary = summarise(results, kinds, methods)
    print((out / f"{OUTPUT_STEM}.md").read_text())
    print(f"wrote {out}/{OUTPUT_STEM}.{{csv,json,md}}, {OUTPUT_STEM}_bars.png, {OUTPUT_STEM}_curves.png")
    return 0 if summary else 1


def embedding_description(local, model, route: str, dim: int) -> str:
    """``efficientnet-lite0 embedding (GAP of _conv_head's map, L2-normalised, D=1280)`` and the like."""
    layer = model.feature_layer or local.profile.default_layer
    norm = ", L2-normalised" if model.normalize else ""
    if route == "pooled":
        return f"{local.name} embedding (GAP of {layer}'s map{norm}, D={dim})"
    return f"{local.name} embedding (the model's output{norm}, D={dim}; FAM's Jacobian route from {layer}'s map)"


def run_meta(args, local, embedding, rows, pair_meta, device, started, notes, complete: bool) -> dict:
    return {
        "command": command_line("evaluate-embedding"), "complete": complete,
        **local.meta(), "model": embedding["model"], "embedding": embedding,
        "images": len(rows), "query_files": [r["file"] for r in rows], "pairs": pair_meta,
        "steps": args.steps, "ig_steps": args.ig_steps, "batch_size": args.batch_size, "device": str(device),
        "torch_threads": torch.get_num_threads(), "machine": machine_summary(),
        "deletion_fill": "zeros in normalised space (query)",
        "insertion_start": "Gaussian blur of the query, kernel 11, sigma 5",
        "score": "cosine similarity of the modified query's embedding to the reference's embedding",
        "wall_seconds": round(time.time() - started, 1), "notes": list(notes),
    }


def summarise(results, kinds, methods) -> List[dict]:
    """One row per (pair kind, method) and per method over all pairs (``all``): means and SEMs."""
    rows = []
    for kind in list(kinds) + (["all"] if len(kinds) > 1 else []):
        for method in methods:
            parts = [results[(k, method)] for k in (kinds if kind == "all" else [kind]) if (k, method) in results]
            if not parts or (kind == "all" and len(parts) < len(kinds)):
                continue
            row = {"pairs": kind, "method": method, "n": sum(p["n"] for p in parts)}
            for key in ("deletion_auc", "insertion_auc", "overall"):
                row[key], row[key + "_sem"] = mean_and_sem([v for p in parts for v in p[key]])
            row["explain_seconds"] = round(sum(p["explain_seconds"] for p in parts), 3)
            rows.append(row)
    return rows


def markdown_table(summary, methods, meta) -> str:
    kinds = list(dict.fromkeys(r["pairs"] for r in summary))
    table = {(r["pairs"], r["method"]): r for r in summary}
    lines = [f"Similarity faithfulness: overall = AUC(insertion) − AUC(deletion) of cos(E(query′), E(reference)), "
             f"mean ± SEM over {meta['images']} queries per pair kind, {meta['steps']} steps, {meta['model']} "
             "(higher is better; best per row in bold).", "",
             "| pairs | " + " | ".join(methods) + " | best |", "|---|" + "---:|" * len(methods) + "---|"]
    for kind in kinds:
        values = {m: table[(kind, m)] for m in methods if (kind, m) in table}
        best = max(values, key=lambda m: values[m]["overall"])
        cells = []
        for m in methods:
            if m not in values:
                cells.append("–")
                continue
            text = f"{values[m]['overall']:.3f} ± {values[m]['overall_sem']:.3f}"
            cells.append(f"**{text}**" if m == best else text)
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {best} |")
    lines += ["", "Deletion AUC (lower is better) / insertion AUC (higher is better):", "",
              "| pairs | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for kind in kinds:
        cells = [f"{table[(kind, m)]['deletion_auc']:.3f} / {table[(kind, m)]['insertion_auc']:.3f}"
                 if (kind, m) in table else "–" for m in methods]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Map-independent end points (mean cosine similarity to the reference): clean query / blurred "
              "query / all-zero query:", ""]
    for kind, pm in meta["pairs"].items():
        mean = lambda xs: sum(xs) / len(xs)
        extra = (f"; same class as the query in {sum(pm['same_class'])}/{len(pm['same_class'])}"
                 if "same_class" in pm else "")
        lines.append(f"- {kind}: {mean(pm['clean_similarity']):.3f} / {mean(pm['blurred_similarity']):.3f} / "
                     f"{mean(pm['zeros_similarity']):.3f}{extra}")
    lines += ["", "Explanation seconds over all queries (the maps only, not the scoring): " +
              ", ".join(f"{m} {table[('all' if ('all', m) in table else kinds[0], m)]['explain_seconds']:.1f} s"
                        for m in methods if ("all" if ("all", m) in table else kinds[0], m) in table)]
    if not meta.get("complete", True):
        lines += ["", "**Partial run** (stopped before every (pairs, method) was scored)."]
    if meta.get("notes"):
        lines += [""] + [f"Note: {note}" for note in meta["notes"]]
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_seconds']} s on {meta['machine']}, device "
              f"{meta['device']}, {meta['torch_threads']} torch thread(s))"]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta, summary, results, kinds, methods, plots: bool = True) -> None:
    write_result_files(out, OUTPUT_STEM, meta, summary, results, markdown_table(summary, methods, meta))
    if plots:
        plot(out, summary, results, kinds, methods)


def plot(out: Path, summary, results, kinds, methods) -> None:
    groups = list(dict.fromkeys(r["pairs"] for r in summary))
    table = {(r["pairs"], r["method"]): r for r in summary}
    plot_bars(out / f"{OUTPUT_STEM}_bars.png", groups, methods, table,
              "Similarity faithfulness per pair kind (higher is better)", figsize=(max(6, 1.6 * len(groups)), 4))
    plot_curves(out / f"{OUTPUT_STEM}_curves.png", kinds, methods, lambda kind, m: results.get((kind, m)),
                score="cosine similarity", xlabel="fraction of query pixels", column_size=(3.2, 5.6))
