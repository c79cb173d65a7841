"""Similarity maps at every stage of an embedding model: are the relevance-propagated maps below the
last map more faithful than FAM at the last map? (issue 21, item 1, first measurement)

``python -m camserve.lab.evaluate_fam_layers --model cifar-resnet56|effnet-lite0 --out DIR``

Per model, pair kind and method, on a **fixed split** of the image set (sorted file list; even
positions = ``choose``, odd = ``report``; a fixed stride spreads the queries over the classes):

* RISE deletion / insertion of the query (``--steps`` ≥ 16 steps; ties broken by a seeded
  permutation, :func:`~camserve.engine.evaluation.metrics.pixel_ranks`) scored by the cosine of the
  modified query's embedding to the fixed reference embedding; ``overall = AUC(ins) − AUC(del)``;
* **top-20 % test**: the query's 20 % most relevant pixels (by the map) set to 0 (normalised space),
  vs the same for a seeded uniform random map drawn at the **same layer resolution** and upsampled
  the same way (bilinear; the same smoothness): the map wins when its deletion lowers the
  similarity more.

Methods: ``fam`` (FAM at the last map, the served default), ``rel@<stage>`` (FAM's contributions
propagated by LRP to that stage, ``FamSpec(layer=…)``), ``random@<h>`` (smooth random maps, the
floor), ``captum.ig`` (Captum integrated gradients of the cosine, 16 steps, CIFAR only — it costs
~10 s per 224² query on these CPUs). The best layer is chosen on the ``choose`` half (highest mean
``overall`` over pair kinds) and reported on the ``report`` half with paired differences (mean, SEM,
wins/losses) against ``fam``.

Pairs: ``flip`` (the query mirrored), ``crop`` (CIFAR: the central 24×24 resized to 32×32),
``neighbour`` (the most similar other image of the pool by cosine).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from camserve.engine.evaluation.metrics import (deletion_insertion, endpoint_scores, gaussian_blur, mean_and_sem,
                                                paired, pixel_ranks, similarity_score)
from camserve.engine.imaging.preprocess import to_model_input
from camserve.engine.imaging.render import prepare_maps
from camserve.engine.methods.captum.attribute import attribute, similarity_forward
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.models import EFFNET_LITE0
from camserve.engine.models.embedding import EmbeddingModel, load_effnet_lite0_embedding
from camserve.lab.evaluate_embedding import DifferentiableEmbedding
from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet, shared_dir
from camserve.lab.evaluation_report import machine_summary
from camserve.lab.image_folders import default_data_dir, image_rows, read_photos

TOP_FRACTION = 0.2


def spread(items: List, n: int) -> List:
    """``n`` items at a fixed stride over ``items`` (deterministic, spreads sorted classes)."""
    step = max(1, len(items) // n)
    return items[::step][:n]


# -- models and pairs -------------------------------------------------------------------------------
def build_cifar(args):

    shared = shared_dir()
    model = load_cifar_resnet(str(shared / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"), 56, "cpu")
    embedding = EmbeddingModel.from_classifier(model, "layer3", normalize=True)
    data = shared / "data" / "cifar10-test"
    items = image_set("cifar", data, args.pool, 0)  # sorted; the pool for neighbours
    files = [f for f, _ in items]
    pool = load_batch("cifar", data, files, "cpu")

    def crop(x):
        return F.interpolate(x[..., 4:28, 4:28], size=(32, 32), mode="bilinear", align_corners=False)

    return {"name": "CIFAR ResNet-56 pooled features (GAP of layer3, 64-d, L2-normalised)",
            "embedding": embedding, "input_size": (32, 32), "pool": pool, "files": files,
            "labels": [label for _, label in items], "crop": crop, "blur": (9, 2.0),
            "layers": ["stage1", "stage2"], "ig": True,
            "data": f"{args.pool} CIFAR-10 test JPEGs (image_set seed 0, sorted) from ../shared/data/cifar10-test"}


def build_effnet(args):

    p = EFFNET_LITE0
    embedding = load_effnet_lite0_embedding(normalize=True)
    data = default_data_dir()
    rows = image_rows(data)
    pool = []
    for start in range(0, len(rows), 50):
        batch, _ = to_model_input(read_photos(data, rows[start:start + 50]), p.resize, p.crop, p.mean, p.std,
                                  torch.device("cpu"))
        pool.append(batch)
    return {"name": "EfficientNet-Lite0 pooled features (GAP of the 1280-channel head map, L2-normalised)",
            "embedding": embedding, "input_size": (224, 224), "pool": torch.cat(pool),
            "files": [r["file"] for r in rows], "labels": [int(r["class_index"]) for r in rows], "crop": None,
            "blur": (11, 5.0), "layers": ["stage1", "stage2", "stage3", "stage4"], "ig": False,
            "data": f"the {len(rows)} ImageNet sample photographs of ../shared/data/imagenet-samples (sorted)"}


def embed(model, images, batch=64):
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def make_pairs(spec, indices: List[int], kinds: List[str], pool_embeddings) -> Dict[str, dict]:
    pool = spec["pool"]
    queries = pool[indices]
    pairs = {}
    for kind in kinds:
        if kind == "flip":
            pairs[kind] = {"queries": queries, "references": queries.flip(-1)}
        elif kind == "crop":
            pairs[kind] = {"queries": queries, "references": spec["crop"](queries)}
        else:
            sims = pool_embeddings[indices] @ pool_embeddings.T
            sims[torch.arange(len(indices)), torch.tensor(indices)] = -2.0
            nearest = sims.argmax(dim=1).tolist()
            pairs[kind] = {"queries": queries, "references": pool[nearest],
                           "same_class": sum(spec["labels"][j] == spec["labels"][i] for i, j in zip(indices, nearest))}
    return pairs


# -- maps ---------------------------------------------------------------------------------------------
def fam_maps(fam, queries, references, layer, batch: int):
    """Query maps at input resolution and their layer resolution, from ``FamExplainer.explain``."""
    maps, shape, relevance = [], None, []
    for start in range(0, queries.shape[0], batch):
        sl = slice(start, start + batch)
        result = fam.explain(queries[sl], [FamSpec(reference_image=r, layer=layer) for r in references[sl]])
        maps.append(torch.stack([item.query_map for item in result.items]))
        shape = result.items[0].layer_shape
        relevance += [item.relevance for item in result.items if item.relevance]
    return torch.cat(maps), tuple(shape), relevance


def smooth_random(n: int, shape, size, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return prepare_maps(torch.rand(n, *shape, generator=generator), size)


def ig_maps(embedding, queries, references, steps: int, batch: int):

    model = DifferentiableEmbedding(embedding)
    refs = embed(embedding, references)
    out = []
    for start in range(0, queries.shape[0], batch):
        sl = slice(start, start + batch)
        forward = similarity_forward(model, refs[sl], "cosine")
        out.append(attribute(forward, queries[sl], torch.arange(queries[sl].shape[0]),
                             "captum.integrated_gradients", {"steps": steps}).maps)
    return torch.cat(out)


def top_deletion_scores(score, queries, maps, fraction: float, batch: int) -> torch.Tensor:
    """Cosine to the reference after the map's top ``fraction`` of pixels are set to 0 (seeded ties)."""
    n, _, h, w = queries.shape
    ranks = pixel_ranks(maps, 0)
    mask = (ranks < int(round(fraction * h * w))).view(n, 1, h, w)
    deleted = queries.masked_fill(mask, 0.0)
    owners = torch.arange(n)
    with torch.inference_mode():
        return torch.cat([score(deleted[i:i + batch], owners[i:i + batch]) for i in range(0, n, batch)])


# -- one half -------------------------------------------------------------------------------------------
def evaluate_half(spec, fam, pairs, methods: List[str], args, log) -> dict:
    embedding = spec["embedding"]
    size = spec["input_size"]
    out = {}
    for kind, pair in pairs.items():
        queries, references = pair["queries"], pair["references"]
        n = queries.shape[0]
        ref_embeddings = embed(embedding, references)
        score = similarity_score(embedding, ref_embeddings)
        blurred = gaussian_blur(queries, *spec["blur"])
        endpoints = endpoint_scores(score, queries, blurred, args.batch_size)
        records = {"clean_similarity": endpoints.clean.tolist(), "methods": {}}
        if "same_class" in pair:
            records["same_class"] = pair["same_class"]
        shapes = {}
        maps_of = {}
        for method in methods:
            t0 = time.perf_counter()
            relevance = []
            if method == "fam" or method.startswith("rel@"):
                layer = None if method == "fam" else method[4:]
                maps, shape, relevance = fam_maps(fam, queries, references, layer, args.explain_batch)
                shapes[method] = shape
            elif method == "captum.ig":
                maps, shape = ig_maps(embedding, queries, references, args.ig_steps, args.explain_batch), size
            else:  # random@h
                h = int(method.split("@")[1])
                shape = (h, h)
                maps = smooth_random(n, shape, size, seed=args.seed + h)
            seconds = time.perf_counter() - t0
            maps_of[method] = (maps, shape)
            curves = deletion_insertion(score, queries, maps, steps=args.steps, batch_size=args.batch_size,
                                        blurred=blurred, endpoints=endpoints)
            rec = {"layer_shape": list(shape), "explain_seconds": round(seconds, 3),
                   "deletion_auc": curves.deletion_auc.tolist(), "insertion_auc": curves.insertion_auc.tolist(),
                   "overall": curves.overall.tolist()}
            if relevance:
                rec["relevance_reaching_layer"] = [r["layer"] / r["embedding"] for r in relevance if r["embedding"]]
            records["methods"][method] = rec
            log(f"  {kind:9s} {method:12s} {tuple(shape)} overall {mean_and_sem(rec['overall'])[0]:.3f} "
                f"del {mean_and_sem(rec['deletion_auc'])[0]:.3f} ({seconds:.1f} s explain)")
        # the top-20 % test against a random map of the same layer resolution (same smoothness)
        random_scores: Dict[tuple, torch.Tensor] = {}
        for method, (maps, shape) in maps_of.items():
            if method.startswith("random"):
                continue
            if tuple(shape) not in random_scores:
                rnd = smooth_random(n, shape, size, seed=args.seed + 1000 + shape[0])
                random_scores[tuple(shape)] = top_deletion_scores(score, queries, rnd, TOP_FRACTION, args.batch_size)
            mine = top_deletion_scores(score, queries, maps, TOP_FRACTION, args.batch_size)
            base = random_scores[tuple(shape)]
            records["methods"][method]["top20"] = {"similarity_after": mine.tolist(),
                                                   "random_similarity_after": base.tolist(),
                                                   "wins": int((mine < base).sum()), "n": n}
        out[kind] = records
    return out


def summarise(half: dict, methods: List[str]) -> List[dict]:
    rows = []
    kinds = list(half)
    for kind in kinds + ["all"]:
        parts = kinds if kind == "all" else [kind]
        for method in methods:
            recs = [half[k]["methods"][method] for k in parts if method in half[k]["methods"]]
            if not recs:
                continue
            row = {"pairs": kind, "method": method, "layer_shape": recs[0]["layer_shape"],
                   "n": sum(len(r["overall"]) for r in recs)}
            for key in ("overall", "deletion_auc", "insertion_auc"):
                row[key], row[key + "_sem"] = mean_and_sem([v for r in recs for v in r[key]])
            if "top20" in recs[0]:
                row["top20_wins"] = sum(r["top20"]["wins"] for r in recs)
                row["top20_fraction"] = row["top20_wins"] / row["n"]
            if method != "fam" and "fam" in half[parts[0]]["methods"]:
                for key in ("overall", "deletion_auc"):
                    a = [v for r in recs for v in r[key]]
                    b = [v for k in parts for v in half[k]["methods"]["fam"][key]]
                    row[f"vs_fam_{key}"] = paired(a, b)
            reach = [v for r in recs for v in r.get("relevance_reaching_layer", [])]
            if reach:
                row["relevance_reaching_layer"] = mean_and_sem(reach)[0]
            row["explain_seconds"] = round(sum(r["explain_seconds"] for r in recs), 2)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("cifar-resnet56", "effnet-lite0"), required=True)
    parser.add_argument("--choose", type=int, default=16, help="queries per pair kind on the choose half")
    parser.add_argument("--report", type=int, default=32, help="queries per pair kind on the report half")
    parser.add_argument("--pairs", default="flip,crop,neighbour")
    parser.add_argument("--pool", type=int, default=1000, help="CIFAR: images in the set (the neighbour pool)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--explain-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-random", default="", help="comma list of extra random@h resolutions to score")
    parser.add_argument("--best", default=None, help="skip the choose half: the layer method chosen on it in an "
                        "earlier run (recorded as such)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: List[str] = []

    def log(text):
        print(text, flush=True)
        log_lines.append(text)

    spec = build_cifar(args) if args.model == "cifar-resnet56" else build_effnet(args)
    kinds = [k for k in args.pairs.split(",") if k and (k != "crop" or spec["crop"] is not None)]
    embedding = spec["embedding"]
    fam = FamExplainer(embedding, input_size=spec["input_size"])
    stages = fam.layers.catalog.stages()
    pool_embeddings = embed(embedding, spec["pool"])
    indices = list(range(spec["pool"].shape[0]))
    choose_idx = spread(indices[0::2], args.choose)
    report_idx = spread(indices[1::2], args.report)
    layer_methods = ["fam"] + [f"rel@{s}" for s in spec["layers"]]
    fam_res = fam.resolve_layer(stages[-1]).shape[0]
    resolutions = sorted({fam.resolve_layer(s).shape[0] for s in spec["layers"]} | {fam_res})
    extra = [int(h) for h in args.extra_random.split(",") if h]
    random_methods = [f"random@{h}" for h in (dict.fromkeys([fam_res] + extra) if extra else resolutions)]
    report_methods = layer_methods + (["captum.ig"] if spec["ig"] else []) + random_methods
    log(f"{spec['name']}: stages {stages}; choose {len(choose_idx)}/kind, report {len(report_idx)}/kind; kinds {kinds}")

    if args.best:
        choose, choose_summary, best = {}, [], args.best
    else:
        log("choose half:")
        choose = evaluate_half(spec, fam, make_pairs(spec, choose_idx, kinds, pool_embeddings), layer_methods, args, log)
        choose_summary = summarise(choose, layer_methods)
        all_rows = {r["method"]: r for r in choose_summary if r["pairs"] == "all"}
        best = max(layer_methods, key=lambda m: all_rows[m]["overall"])
    log(f"best on the choose half: {best}")
    log("report half:")
    report = evaluate_half(spec, fam, make_pairs(spec, report_idx, kinds, pool_embeddings), report_methods, args, log)
    report_summary = summarise(report, report_methods)
    meta = {"model": spec["name"], "data": spec["data"], "stages": {f"stage{i + 1}": s for i, s in enumerate(stages)},
            "choose_indices": choose_idx, "report_indices": report_idx,
            "choose_files": [spec["files"][i] for i in choose_idx], "report_files": [spec["files"][i] for i in report_idx],
            "kinds": kinds, "steps": args.steps, "ig_steps": args.ig_steps, "blur": spec["blur"],
            "best_on_choose": best, "machine": machine_summary(), "torch_threads": torch.get_num_threads(),
            "wall_seconds": round(time.time() - started, 1),
            "command": "python -m camserve.lab.evaluate_fam_layers " + " ".join(argv or sys.argv[1:])}
    stem = f"fam_layers_{args.model}"
    with open(out / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "choose_summary": choose_summary, "report_summary": report_summary,
                   "choose": choose, "report": report, "log": log_lines}, f, indent=1)
    log(f"wrote {out / stem}.json in {meta['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- the committed tables -----------------------------------------------------------------------------
def _values(half: dict, kinds: List[str], method: str, key: str) -> List[float]:
    return [v for k in kinds for v in half[k]["methods"].get(method, {}).get(key, [])]


def _top20(half: dict, kinds: List[str], method: str):
    recs = [half[k]["methods"][method]["top20"] for k in kinds if "top20" in half[k]["methods"].get(method, {})]
    if not recs:
        return None
    return sum(r["wins"] for r in recs), sum(r["n"] for r in recs)


def _diff(d: dict, lower_better: bool = False) -> str:
    """``mean ± SEM (better in k/n)`` of a :func:`paired` difference."""
    better = d["losses"] if lower_better else d["wins"]
    return f"{d['diff']:+.3f} ± {d['sem']:.3f} ({better}/{d['n']})"


def model_tables(data: dict) -> List[str]:
    meta, report, choose = data["meta"], data["report"], data["choose"]
    kinds = list(report)
    methods = list(next(iter(report.values()))["methods"])
    shapes = {m: tuple(report[kinds[0]]["methods"][m]["layer_shape"]) for m in methods}
    stage_paths = meta["stages"]
    label = {m: (f"{m} ({stage_paths.get(m[4:], m[4:])}, {shapes[m][0]}×{shapes[m][1]})" if m.startswith("rel@")
                 else f"fam ({list(stage_paths.values())[-1]}, {shapes[m][0]}×{shapes[m][1]})" if m == "fam"
                 else m) for m in methods}
    n_report = len(meta["report_indices"])
    lines = [f"### {meta['model']}", "",
             f"Data: {meta['data']}. Split: items at even positions of the sorted set = choose, odd = report; "
             f"{len(meta['choose_indices'])} choose and {n_report} report queries per pair kind (a fixed stride "
             f"over each half). Pair kinds: {', '.join(kinds)}. {meta['steps']} deletion/insertion steps, ties "
             f"broken by a seeded permutation; insertion from a Gaussian blur (kernel {meta['blur'][0]}, σ "
             f"{meta['blur'][1]}). Score: cosine of the modified query's embedding to the reference embedding.", ""]
    # choose half
    if choose:
        ch_methods = list(next(iter(choose.values()))["methods"])
        ckinds = list(choose)
        cells = [f"{label.get(m, m)}: {mean_and_sem(_values(choose, ckinds, m, 'overall'))[0]:.3f}" for m in ch_methods]
        lines += [f"**Choose half** (overall, all pair kinds): {'; '.join(cells)} → best: **{meta['best_on_choose']}**.",
                  ""]
    else:
        lines += [f"**Choose half**: {meta.get('choose_note', 'from an earlier run')} → best: "
                  f"**{meta['best_on_choose']}**.", ""]
    # report half, all kinds
    for scope in (["all"] + kinds):
        ks = kinds if scope == "all" else [scope]
        n = len(_values(report, ks, "fam", "overall"))
        lines += [f"**Report half, {scope} pairs** (n = {n}; mean ± SEM; paired differences vs fam as "
                  "mean ± SEM (better in k/n pairs); top-20 %: pairs where deleting the map's top 20 % lowers the "
                  "similarity more than deleting a random map's of the same layer resolution):", "",
                  "| method | overall | deletion AUC ↓ | insertion AUC | Δ overall vs fam | Δ deletion vs fam "
                  "(− = better) | deletion vs random of same smoothness (− = better) | top-20 % wins |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        fam_overall, fam_del = _values(report, ks, "fam", "overall"), _values(report, ks, "fam", "deletion_auc")
        for m in methods:
            overall = mean_and_sem(_values(report, ks, m, "overall"))
            deletion = mean_and_sem(_values(report, ks, m, "deletion_auc"))
            insertion = mean_and_sem(_values(report, ks, m, "insertion_auc"))
            if m == "fam":
                d_over = d_del = "–"
            else:
                d_over = _diff(paired(_values(report, ks, m, "overall"), fam_overall))
                d_del = _diff(paired(_values(report, ks, m, "deletion_auc"), fam_del), lower_better=True)
            rnd = f"random@{shapes[m][0]}"
            vs_random = (_diff(paired(_values(report, ks, m, "deletion_auc"), _values(report, ks, rnd, "deletion_auc")),
                               lower_better=True)
                         if rnd in methods and not m.startswith("random") else "–")
            top = _top20(report, ks, m)
            top_text = f"{top[0]}/{top[1]} ({top[0] / top[1]:.0%})" if top else "–"
            lines.append(f"| {label[m]} | {overall[0]:.3f} ± {overall[1]:.3f} | {deletion[0]:.3f} ± {deletion[1]:.3f} | "
                         f"{insertion[0]:.3f} ± {insertion[1]:.3f} | {d_over} | {d_del} | {vs_random} | {top_text} |")
        lines.append("")
    reach = {m: _values(report, kinds, m, "relevance_reaching_layer") for m in methods if m.startswith("rel@")}
    if reach:
        lines += ["Relevance that reaches the layer (Σ R^l / Σ R at the embedding, mean over report queries): " +
                  ", ".join(f"{m} {mean_and_sem(v)[0]:.4f}" for m, v in reach.items() if v) + ".", ""]
    secs = {m: sum(report[k]["methods"][m]["explain_seconds"] for k in kinds) for m in methods
            if not m.startswith("random")}
    lines += ["Explanation seconds, all report pairs (shared, loaded CPU; indicative only): " +
              ", ".join(f"{m} {s:.1f}" for m, s in secs.items()) + ".", "",
              f"Wall time {meta['wall_seconds']} s on {meta['machine']}, {meta['torch_threads']} torch thread(s). "
              f"Command: `{meta['command']}`.", ""]
    neighbours = [report[k].get("same_class") for k in kinds if "same_class" in report[k]]
    if neighbours:
        lines += [f"Neighbour pairs: the reference shares the query's label in {neighbours[0]}/{n_report}.", ""]
    return lines


def render(paths: List[str], out: Path, preface: str = "") -> None:
    datas = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["# FAM at every layer: relevance-propagated similarity maps vs FAM at the last map", ""]
    if preface:
        lines += [preface.strip(), ""]
    for data in datas:
        lines += model_tables(data)
    (out / "fam_layers.md").write_text("\n".join(lines))
    combined = {Path(p).stem: {"meta": d["meta"], "choose_summary": d["choose_summary"],
                               "report_summary": d["report_summary"], "report": d["report"], "choose": d["choose"]}
                for p, d in zip(paths, datas)}
    (out / "fam_layers.json").write_text(json.dumps(combined, indent=1))
