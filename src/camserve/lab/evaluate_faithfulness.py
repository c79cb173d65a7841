"""``camserve evaluate-faithfulness``: a protocol that can tell Shallow-CAM's readings apart (issue 15).

For each stage of a model and each method or Shallow-CAM variant it measures, per image of a fixed
half of a fixed image set, paired with every other method on the same images:

* **faithfulness** — RISE curves with ``--steps`` steps (default 16), ties in the pixel order
  broken by a seeded random permutation (:func:`camserve.engine.evaluation.metrics.pixel_ranks`): deletion to
  zeros (``del0``) and to the blurred image (``delB``), insertion from the blur (``ins``);
  ``overall0 = AUC(ins) − AUC(del0)`` and ``overallB = AUC(ins) − AUC(delB)``, softmax probability
  of the class predicted on the clean image;
* **class sensitivity** — ``rho12``: Spearman correlation (average ranks for ties) of the top-1 and
  top-2 class maps at layer resolution; ``cds`` (contrastive deletion score): along the
  zero-deletion curve of the top-1 map, the mean drop of ``p(top-1)`` minus the mean drop of
  ``p(top-2)`` (must be > 0); ``oma`` (own-map advantage, stricter): ``AUC_del0(p(top-1) | top-2
  map) − AUC_del0(p(top-1) | top-1 map)`` — the class's own map must delete its evidence faster
  than the runner-up's map (> 0);
* **model randomisation** (Adebayo et al., NeurIPS 2018) — every parametrised module entered after
  the explained layer is left is re-initialised (``reset_parameters``, seeded; the end state of the
  top-down cascade, plus the first cascade step ``head``: only the last parametrised module), the
  map of the same class recomputed, ``rho_rand`` = its Spearman correlation with the trained
  model's map (must be < 0.5).

**Split.** The image set is sorted by file name (CIFAR: ``class/NNNN.jpg``; ImageNet samples:
``LABELS.tsv``'s ``file``); CIFAR takes a seeded (``--set-seed``, default 0) random sample of
``--set-size`` (default 500) of the 5,019 test JPEGs first, sorted again. Position parity in that sorted
list decides the half: even positions are the **choose** half (variants are chosen there), odd
positions the **report** half (the figures reported). ``--limit`` takes the first k of the half.

Models: ``--model cifar-resnet --weights PATH --depth 20|56`` (the project's own definition in
``examples/cifar_resnet/model.py``, 32×32, ImageNet mean/std, no resize) or ``--model effnet-lite0``
(the bundled one). This loader is small and local on purpose (the general model-spec loader in
``engine/models/`` replaces it later).

``--conservation`` measures instead, per stage, the positive and negative parts of the relevance
``R^l = A^l ⊙ g^l`` against the initial relevance, for the plain (one-hot) and contrastive starts,
with and without BatchNorm folded into the convolutions (``engine/lrp/canonizers.py``).

Writes ``<stem>.json`` (meta, summary, paired comparisons, per-image values), ``<stem>.csv``
(summary) and ``<stem>.md`` into ``--out``; results are rewritten after every (layer, method).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from camserve.engine.imaging.preprocess import to_model_input
from camserve.engine.models import EFFNET_LITE0 as p
from camserve.engine.models import load_effnet_lite0
from camserve.engine.pipeline import Explainer
from camserve.engine.methods import get_method
from camserve.engine.lrp.composites import get_composite
from camserve.engine import ExplainSpec
from camserve.engine.evaluation.metrics import auc, class_probabilities, perturbation_curves, spearman
from camserve.engine.imaging.render import prepare_maps
from camserve.engine.evaluation.metrics import mean_and_sem, paired
from camserve.engine.methods import REGISTRY, CamMethod
from camserve.engine.lrp.starts import START_OPTION_CHOICES, RelevanceStartOptions
from camserve.engine.lrp.starts import relevance_seed, start_of, temperature_of
from camserve.engine.evaluation.metrics import gaussian_blur

REPO = Path(__file__).resolve().parents[3]

#: evaluation name → (engine method, options). ``sc`` = Shallow-CAM as served before issue 15
#: (``spatial=relevance, contrastive=1``); ``sc[rel+plain]`` is the default chosen on the choose half.
#: Options are spelled out where a default changed, so a name means the same thing in every run.
VARIANTS = OrderedDict([
    ("layercam", ("layercam", {})),
    ("gradcam", ("gradcam", {})),
    ("gradcampp", ("gradcampp", {})),
    ("relevancecam", ("relevancecam", {})),
    ("fgcam", ("fgcam", {})),                              # FG-CAM (Qiu et al. 2024): Grad-CAM's components by LRP
    ("sc", ("shallowcam", {"contrastive": True})),        # the default before issue 15 (rel, contrastive)
    ("sc[rel+plain]", ("shallowcam", {"contrastive": False})),
    ("sc[rel+pos]", ("shallowcam", {"beta": "positive", "contrastive": True})),
    ("sc[rel+refine]", ("shallowcam", {"refine": True, "contrastive": True})),
    ("sc[rel+pos+plain]", ("shallowcam", {"beta": "positive", "contrastive": False})),
    ("sc[rel+plain+refine]", ("shallowcam", {"contrastive": False, "refine": True})),
    ("sc[rel+plain+above]", ("shallowcam", {"contrastive": False, "beta_from": "above"})),
    ("sc[grad]", ("shallowcam", {"spatial": "gradient", "contrastive": True})),
    ("sc[grad+pos]", ("shallowcam", {"spatial": "gradient", "beta": "positive", "contrastive": True})),
    ("sc[grad+plain]", ("shallowcam", {"spatial": "gradient", "contrastive": False})),
    ("sc[grad+pos+plain]", ("shallowcam", {"spatial": "gradient", "beta": "positive", "contrastive": False})),
    ("sc[grad+above]", ("shallowcam", {"spatial": "gradient", "beta_from": "above", "contrastive": True})),
    ("sc[grad+pos+above]", ("shallowcam", {"spatial": "gradient", "beta": "positive", "beta_from": "above", "contrastive": True})),
    ("sc[grad+refine]", ("shallowcam", {"spatial": "gradient", "refine": True, "contrastive": True})),
    ("sc[grad+pos+refine]", ("shallowcam", {"spatial": "gradient", "beta": "positive", "refine": True, "contrastive": True})),
    ("sc[grad+one]", ("shallowcam", {"spatial": "gradient", "beta": "one", "contrastive": True})),  # = LayerCAM (a check)
    # the softmax-gradient start (SGLRP): one virtual output y_t − Σ_{k≠t} q_k y_k, q = softmax of the others
    ("sc[rel+soft]", ("shallowcam", {"start": "softmax"})),
    ("sc[rel+soft+pos]", ("shallowcam", {"start": "softmax", "beta": "positive"})),
    ("sc[rel+soft+above]", ("shallowcam", {"start": "softmax", "beta_from": "above"})),
    ("sc[rel+soft+refine]", ("shallowcam", {"start": "softmax", "refine": True})),
    ("sc[grad+soft]", ("shallowcam", {"spatial": "gradient", "start": "softmax"})),
    ("sc[grad+soft+pos]", ("shallowcam", {"spatial": "gradient", "start": "softmax", "beta": "positive"})),
    ("relevancecam[soft]", ("relevancecam", {"start": "softmax"})),
    # the rival start: y_t − y_r against the strongest competitor r (the softmax start at temperature → 0)
    ("sc[rel+rival]", ("shallowcam", {"start": "rival"})),
    ("sc[rel+rival+refine]", ("shallowcam", {"start": "rival", "refine": True})),
    ("sc[rel+rival+above]", ("shallowcam", {"start": "rival", "beta_from": "above"})),
    # the softmax start at temperature T: q = softmax_{k≠t}(y / T), between rival (T → 0) and margin (T → ∞)
    *[(f"sc[rel+soft@T{t}{suffix}]", ("shallowcam", {"start": "softmax", "temperature": t, **extra}))
      for suffix, extra in (("", {}), ("+refine", {"refine": True}), ("+above", {"beta_from": "above"}),
                            ("+above+refine", {"beta_from": "above", "refine": True}))
      for t in (2, 4, 8, 16, 32)],
    ("sc[rel+margin]", ("shallowcam", {"start": "margin"})),  # = sc[rel+plain] (shallowcam_variants.md § 1)
    ("random", (None, {})),
])
DEFAULT_METHODS = [m for m in VARIANTS if m not in ("sc[grad+one]", "sc[rel+margin]") and "@T" not in m]
NEEDS_ABOVE = ("refine", "above")
BASELINE = "layercam"


# -- models and images ------------------------------------------------------------------------
def load_cifar_resnet(weights: str, depth: int, device) -> torch.nn.Module:
    """The project's CIFAR ResNet with a ``pytorch_resnet_cifar10`` state dict (``module.`` stripped)."""
    sys.path.insert(0, str(REPO / "examples" / "cifar_resnet"))
    try:
        from model import CifarResNet
    finally:
        sys.path.pop(0)
    model = CifarResNet(depth)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model.load_state_dict({k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()})
    return model.eval().to(device)


def shared_dir() -> Path:
    return Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))


def image_set(kind: str, data: Path, set_size: int, set_seed: int) -> List[Tuple[str, int]]:
    """The fixed, sorted image set: ``[(relative file, label)]``."""
    if kind == "cifar":
        classes = sorted(p.name for p in data.iterdir() if p.is_dir())
        files = sorted(f"{c}/{f.name}" for c in classes for f in (data / c).iterdir() if f.suffix == ".jpg")
        chosen = sorted(random.Random(set_seed).sample(files, min(set_size, len(files))))
        return [(f, classes.index(f.split("/")[0])) for f in chosen]
    with open(data / "LABELS.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sorted((r["file"], int(r["class_index"])) for r in rows)


def split(items: List, half: str) -> List:
    """Even positions = ``choose``, odd = ``report``, ``all`` = both."""
    if half == "all":
        return list(items)
    return items[0::2] if half == "choose" else items[1::2]


def load_batch(kind: str, data: Path, files: List[str], device) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    images = [torch.from_numpy(np.array(Image.open(data / f).convert("RGB"))).permute(2, 0, 1).contiguous()
              for f in files]
    if kind == "cifar":
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        return ((torch.stack(images).float() / 255 - mean) / std).to(device)
    batch, _ = to_model_input(images, p.resize, p.crop, p.mean, p.std, device)
    return batch


def build(args, device):
    """``(kind, model, input_size, layers, data folder)``."""
    if args.model == "cifar-resnet":
        weights = args.weights or str(shared_dir() / "models" / "cifar-resnet" /
                                      {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}[args.depth])
        model = load_cifar_resnet(weights, args.depth, device)
        return "cifar", model, (32, 32), ["layer1", "layer2", "layer3"], Path(args.data or shared_dir() / "data" / "cifar10-test")
    model = load_effnet_lite0(device=device).to(memory_format=torch.channels_last)  # ~1.1-1.5× faster on CPU
    return ("imagenet", model, (224, 224), ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_conv_head"],
            Path(args.data or shared_dir() / "data" / "imagenet-samples"))


def make_explainer(model, input_size, composite: str, fold: str = "none", seed_norm: str = "logit", registry=REGISTRY):
    """The engine's explainer with two evaluation-local switches:

    * ``fold``: ``bias`` / ``nobias`` fold each BatchNorm into the conv before it for the
      relevance path (``engine/lrp/canonizers.py``; ``nobias`` drops the folded shift from the
      z⁺ denominator so it cannot absorb relevance);
    * ``seed_norm="margin"``: every row whose options resolve to the uniform contrastive start
      (``start=contrastive``, e.g. ``contrastive=1``) gets the engine's ``start=margin`` instead: the
      whole seed divided by the margin ``z' = y_t − Σ_{c≠t} y_c / N`` rather than each logit by
      itself, i.e. LRP-ε through the linear head sees one virtual output ``W_t − mean W_c``
      (``engine/lrp/starts.py: relevance_seed``).
    """
    import dataclasses


    class EvaluationExplainer(Explainer):
        def explain(self, images, specs, *a, **k):
            if seed_norm == "margin":
                specs = [spec if spec is None or "start" not in get_method(spec.method).option_choices
                         or start_of(get_method(spec.method).options(spec.options)) != "contrastive"
                         else dataclasses.replace(spec, options={**dict(spec.options), "start": "margin"})
                         for spec in specs]
            return super().explain(images, specs, *a, **k)

    canonizer = {"none": None, "bias": "fold_bn", "nobias": "fold_bn_nobias"}[fold]  # BN folded, relevance path only
    return EvaluationExplainer(model, input_size, composite=get_composite(composite), canonizer=canonizer,
                               registry=registry)


def randomised(model, explainer, layer: str, scope: str, seed: int):
    """A copy of ``model`` with the parametrised modules above ``layer`` re-initialised: all of
    them (``scope="all"``) or only the last one (``"head"``)."""
    model = copy.deepcopy(model)
    exited = explainer.catalog.get(layer).exited
    modules = dict(model.named_modules())
    above = [n for n in explainer.catalog.names() if explainer.catalog.layers[n].entered > exited
             and n in modules and hasattr(modules[n], "reset_parameters")
             and any(True for _ in modules[n].parameters(recurse=False))]
    above.sort(key=lambda n: explainer.catalog.layers[n].entered)
    chosen = above[-1:] if scope == "head" else above
    torch.manual_seed(seed)
    for name in reversed(chosen):  # top down
        modules[name].reset_parameters()
    return model.eval(), chosen


# -- maps --------------------------------------------------------------------------------------
def layer_maps(explainer, images, method: Optional[str], options: Dict, layer: str, target, batch: int,
               seed: int = 0) -> torch.Tensor:
    """Raw maps at layer resolution ``(N, k, h, w)`` for ``target`` ("top2" or a class tensor)."""

    if method is None:  # the random floor: uniform maps, two per image (seeded)
        h, w = explainer.catalog.feature_map(layer).output_shape[-2:]
        k = 2 if isinstance(target, str) else 1
        g = torch.Generator().manual_seed(seed)
        return torch.rand(images.shape[0], k, h, w, generator=g).to(images.device)
    out = []
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch]
        if isinstance(target, str):
            specs = [ExplainSpec(method, layer=layer, target=target, options=dict(options))] * chunk.shape[0]
        else:
            specs = [ExplainSpec(method, layer=layer, target=int(c), options=dict(options))
                     for c in target[start:start + batch]]
        result = explainer.explain(chunk, specs, layer_resolution=True)
        out.extend(e.maps for e in result.explanations)
    return torch.stack(out)


# -- one (layer, method) -----------------------------------------------------------------------
def evaluate_one(explainer, rand_explainers, model, images, top2, layer, name, args, forward=None,
                 fixed=None, randomisation_limit=None) -> dict:
    """One (layer, reading) on ``images``: the per-image record (see the module docstring).

    ``forward`` (default ``model``) scores the curves' step images — any gradient-free
    ``images → logits`` (e.g. :class:`~camserve.lab.curve_forward.CurveForward`); ``fixed`` the
    probabilities ``(N, 2)`` of ``top2`` on the clean, blurred and all-zero images
    (:func:`~camserve.engine.evaluation.metrics.source_scores`), shared by every reading of these
    images: the curves' endpoints are then copied, not forwarded. ``randomisation_limit`` ``k``: the
    randomisation correlations of the first ``k`` images only (``rho_rand_*`` lists of length ``k``;
    default all). The record's ``explain_seconds``,
    ``curve_seconds`` and ``randomisation_seconds`` say where the time went."""
    method, options = VARIANTS[name]
    forward = model if forward is None else forward
    t0 = time.perf_counter()
    maps = layer_maps(explainer, images, method, options, layer, "top2", args.explain_batch, args.seed)
    explain_seconds = time.perf_counter() - t0
    size = tuple(images.shape[-2:])
    up1 = prepare_maps(maps[:, 0], size)
    up2 = prepare_maps(maps[:, 1], size)
    blurred = args._blurred
    t0 = time.perf_counter()
    curves = perturbation_curves(class_probabilities(forward, top2), images, up1, steps=args.steps,
                                 batch_size=args.batch_size, blurred=blurred, tie_seed=args.seed, fixed=fixed)
    own = perturbation_curves(class_probabilities(forward, top2[:, :1]), images, up2, steps=args.steps,
                              kinds=("deletion_zero",), batch_size=args.batch_size, blurred=blurred,
                              tie_seed=args.seed,
                              fixed=None if fixed is None else {k: v[:, :1] for k, v in fixed.items()})
    curve_seconds = time.perf_counter() - t0
    del0 = auc(curves["deletion_zero"][..., 0])
    delb = auc(curves["deletion_blur"][..., 0])
    ins = auc(curves["insertion_blur"][..., 0])
    p = curves["deletion_zero"]                      # (N, S+1, 2): p(top-1), p(top-2)
    drop1 = p[:, :1, 0] - p[..., 0]
    drop2 = p[:, :1, 1] - p[..., 1]
    record = {
        "layer": layer, "method": name, "n": int(images.shape[0]), "explain_seconds": round(explain_seconds, 3),
        "del0": del0.tolist(), "delB": delb.tolist(), "ins": ins.tolist(),
        "overall0": (ins - del0).tolist(), "overallB": (ins - delb).tolist(),
        "rho12": spearman(maps[:, 0], maps[:, 1]).tolist(),
        "cds": (auc(drop1) - auc(drop2)).tolist(),
        "oma": (auc(own["deletion_zero"][..., 0]) - del0).tolist(),
        "mean_curves": {k: v[..., 0].mean(0).tolist() for k, v in curves.items()},
        "curve_seconds": round(curve_seconds, 3),
    }
    t0 = time.perf_counter()
    k = images.shape[0] if randomisation_limit is None else max(0, min(int(randomisation_limit), images.shape[0]))
    for scope, rexp in rand_explainers.items():
        if k == 0:
            record[f"rho_rand_{scope}"] = []
        elif method is None:
            rmaps = layer_maps(rexp, images[:k], None, {}, layer, top2[:k, 0], args.explain_batch, args.seed + 1)
        else:
            rmaps = layer_maps(rexp, images[:k], method, options, layer, top2[:k, 0], args.explain_batch)
        if k:
            record[f"rho_rand_{scope}"] = spearman(maps[:k, 0], rmaps[:, 0]).tolist()
    record["randomisation_seconds"] = round(time.perf_counter() - t0, 3)
    return record


KEYS = ("overall0", "overallB", "del0", "delB", "ins", "rho12", "cds", "oma", "rho_rand_head", "rho_rand_all")


def summarise(results: Dict[Tuple[str, str], dict]) -> Tuple[List[dict], List[dict]]:

    summary, comparisons = [], []
    for (layer, name), r in results.items():
        row = {"layer": layer, "method": name, "n": r["n"], "explain_seconds": r["explain_seconds"]}
        for key in KEYS:
            if key in r:
                row[key], row[key + "_sem"] = mean_and_sem(r[key])
                if key.startswith("rho"):
                    row[key + "_median"] = float(torch.tensor(r[key]).median())
        base = results.get((layer, BASELINE))
        if base is not None and name != BASELINE:
            for key in ("overall0", "overallB"):
                cmp = paired(r[key], base[key])
                comparisons.append({"layer": layer, "method": name, "vs": BASELINE, "metric": key, **cmp})
                row[f"d_{key}"], row[f"d_{key}_sem"] = cmp["diff"], cmp["sem"]
                row[f"d_{key}_wins"] = cmp["wins"]
        summary.append(row)
    return summary, comparisons


def checks(row: dict, base: Optional[dict]) -> str:
    """Which of the issue's bars a row clears: F (overall0 and overallB ≥ LayerCAM + 0.01),
    S (> 2 SEM above LayerCAM on both), C (rho12 ≤ LayerCAM's), D (cds > 0 and oma > 0),
    R (rho_rand_all < 0.5)."""
    marks = []
    if base is not None and "d_overall0" in row:
        if row["d_overall0"] >= 0.01 and row["d_overallB"] >= 0.01:
            marks.append("F")
        if row["d_overall0"] > 2 * row["d_overall0_sem"] and row["d_overallB"] > 2 * row["d_overallB_sem"]:
            marks.append("S")
        if row["rho12"] <= base["rho12"] + 1e-12:
            marks.append("C")
    if row.get("cds", 0) > 0 and row.get("oma", 0) > 0:
        marks.append("D")
    if "rho_rand_all" in row and row["rho_rand_all"] < 0.5:
        marks.append("R")
    return "".join(marks) or "–"


def markdown(summary: List[dict], meta: dict) -> str:
    lines = [f"# Faithfulness and sanity checks: {meta['model']} ({meta['half']} half, {meta['images']} images)", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; torch threads {meta['torch_threads']}; device {meta['device']}; "
             f"{meta['wall_seconds']} s wall. Split: {meta['split']}. Steps {meta['steps']}, ties broken at random "
             f"(seed {meta['seed']}); composite {meta['composite']}, BN folding {meta['fold_bn']}, contrastive seed "
             f"normalised by {meta['seed_norm']}. Deletion/insertion blur: {meta.get('blur')}. "
             f"Top-1 accuracy on these images: {meta['top1_accuracy']:.3f}.", "",
             "overall0 = AUC(ins) − AUC(del to 0), overallB = AUC(ins) − AUC(del to blur); Δ = paired difference "
             "vs LayerCAM ± SEM (wins of n); rho12 = Spearman(top-1 map, top-2 map), mean (median); cds = "
             "contrastive deletion score, oma = own-map advantage (both must be > 0); rho_rand = Spearman with "
             "the map after re-initialising the layers above (head only / all; must be < 0.5). "
             "Checks: F = both overall ≥ LayerCAM + 0.01, S = both > 2 SEM above LayerCAM, C = rho12 ≤ "
             "LayerCAM's, D = cds > 0 and oma > 0, R = rho_rand(all) < 0.5.", ""]
    layers = list(dict.fromkeys(r["layer"] for r in summary))
    for layer in layers:
        rows = [r for r in summary if r["layer"] == layer]
        base = next((r for r in rows if r["method"] == BASELINE), None)
        lines += [f"## {layer}", "",
                  "| method | overall0 | Δ0 vs LayerCAM (wins) | overallB | ΔB vs LayerCAM (wins) | rho12 | cds | oma | "
                  "rho_rand head / all | checks |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            d0 = (f"{r['d_overall0']:+.3f} ± {r['d_overall0_sem']:.3f} ({r['d_overall0_wins']}/{r['n']})"
                  if "d_overall0" in r else "–")
            db = (f"{r['d_overallB']:+.3f} ± {r['d_overallB_sem']:.3f} ({r['d_overallB_wins']}/{r['n']})"
                  if "d_overallB" in r else "–")
            rr = (f"{r['rho_rand_head']:.2f} / {r['rho_rand_all']:.2f}" if "rho_rand_all" in r else "–")
            lines.append(f"| {r['method']} | {r['overall0']:.3f} ± {r['overall0_sem']:.3f} | {d0} | "
                         f"{r['overallB']:.3f} ± {r['overallB_sem']:.3f} | {db} | {r['rho12']:.2f} ({r['rho12_median']:.2f}) | "
                         f"{r['cds']:+.3f} | {r['oma']:+.3f} | {rr} | {checks(r, base)} |")
        lines.append("")
    if not meta.get("complete", True):
        lines += ["**Partial run** (stopped before every (layer, method) was scored).", ""]
    return "\n".join(lines)


def write(out: Path, stem: str, meta, results) -> None:
    summary, comparisons = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in summary for k in r))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(summary)
    with open(out / f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "paired": comparisons,
                   "per_image": list(results.values())}, f, indent=None)
    (out / f"{stem}.md").write_text(markdown(summary, meta))


# -- conservation ------------------------------------------------------------------------------
def conservation(args, model, input_size, layers, images) -> int:
    """Positive / negative / net relevance per stage, relative to the initial relevance."""

    sums: List[torch.Tensor] = []

    class Probe(RelevanceStartOptions, CamMethod):
        name = "_relevance_probe"
        needs_relevance = True
        option_choices = {"contrastive": (True, None), **START_OPTION_CHOICES}

        def compute(self, layer, captured, options):
            r = captured.relevance(layer).double().flatten(1)
            logits = captured.logits.double()
            seed = relevance_seed(logits, captured.targets, [start_of(options)] * len(logits),
                                  [temperature_of(options)] * len(logits))
            initial = (logits * seed).sum(1)  # R at the logits: 1, 1/N, 1 or the softmax start's z
            sums.append(torch.stack([r.clamp(min=0).sum(1), r.clamp(max=0).sum(1), r.sum(1), initial], 1))
            return captured.activations[layer].sum(1)

    registry = REGISTRY.extended(Probe())  # the probe is the lab's own: the served registry is not written
    rows = []
    for fold, seed_norm in (("none", "logit"), ("none", "margin"), ("bias", "logit"), ("nobias", "logit"),
                            ("nobias", "margin")):
        explainer = make_explainer(model, input_size, args.composite, fold, seed_norm, registry)
        for start in ("target", "contrastive", "softmax"):
            if seed_norm == "margin" and start != "contrastive":
                continue  # identical to the plain start / not affected
            if start == "softmax" and fold == "bias":
                continue
            for layer in layers:
                sums.clear()
                for i in range(0, images.shape[0], args.explain_batch):
                    chunk = images[i:i + args.explain_batch]
                    explainer.explain(chunk, [ExplainSpec(Probe.name, layer=layer,
                                                          options={"start": start})] * chunk.shape[0])
                s = torch.cat(sums)  # (N, 4)
                # the margin start puts relevance 1 on the virtual output y_t − Σ_{c≠t} y_c / N; the
                # softmax start puts z = y_t − Σ_{k≠t} q_k y_k (per image) on its virtual output
                initial = float(s[:, 3].mean())
                rows.append({"fold_bn": fold, "seed_norm": seed_norm,
                             "start": {"target": "plain"}.get(start, start),
                             "layer": layer, "initial_net": initial, "pos": float(s[:, 0].mean()),
                             "neg": float(s[:, 1].mean()), "net": float(s[:, 2].mean()),
                             "net_over_initial": float((s[:, 2] / s[:, 3]).mean()),
                             "pos_over_abs_net": float((s[:, 0] / s[:, 2].abs().clamp_min(1e-12)).median()),
                             "n": int(len(s))})
    meta = run_meta(args, None, None, None, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"conservation_{args.model}{args.depth if args.model == 'cifar-resnet' else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Relevance conservation: {meta['model']}, {rows[0]['n']} images ({meta['half']} half)", "",
             f"Command: `{meta['command']}`; {meta['machine']}, torch threads {meta['torch_threads']}.", "",
             "Sum over the stage's output of the relevance R = A ⊙ g: positive part, negative part, net, and "
             "net / initial (initial net relevance: plain start 1 on the target logit; contrastive +1 / −1/N, "
             "net 1/N; contrastive normalised by the margin: 1 on the virtual output y_t − Σ_{c≠t} y_c / N; "
             "softmax: z = y_t − Σ_{k≠t} q_k y_k on one virtual output, q the softmax of the other logits, "
             "per image, mean in the 'initial' column). "
             "Mean over images (ΣR / initial: mean of the per-image ratio); the last column is the median over "
             "images of ΣR⁺ / |ΣR| (1 = no cancellation).", "",
             "| BN folding | start (seed normalised by) | layer | initial | ΣR⁺ | ΣR⁻ | ΣR | ΣR / initial | "
             "median ΣR⁺ / abs(ΣR) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        start = r["start"] + (f" ({r['seed_norm']})" if r["start"] == "contrastive" else "")
        lines.append(f"| {r['fold_bn']} | {start} | {r['layer']} | {r['initial_net']:.4f} | {r['pos']:.4f} | "
                     f"{r['neg']:.4f} | {r['net']:.4f} | {r['net_over_initial']:.3f} | {r['pos_over_abs_net']:.1f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# -- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("cifar-resnet", "effnet-lite0"), default="cifar-resnet")
    parser.add_argument("--weights", default=None, help="CIFAR ResNet state dict (default: the shared one for --depth)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (20 or 56)")
    parser.add_argument("--data", default=None, help="image folder (default: the shared CIFAR-10 test JPEGs / ImageNet samples)")
    parser.add_argument("--half", choices=("choose", "report", "all"), default="choose")
    parser.add_argument("--set-size", type=int, default=500, help="CIFAR: size of the seeded image set (default 500)")
    parser.add_argument("--set-seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="first k images of the half (0 = all)")
    parser.add_argument("--layers", default=None, help="comma list (default: the model's stages)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128, help="step images per forward")
    parser.add_argument("--explain-batch", type=int, default=32)
    parser.add_argument("--no-randomisation", action="store_true", help="skip the model-randomisation test")
    parser.add_argument("--composite", default="epsilon_plus",
                        help="LRP composite: epsilon_plus (default), epsilon_alpha2_beta1, epsilon, epsilon_gamma[:γ]")
    parser.add_argument("--fold-bn", choices=("none", "bias", "nobias"), default="none",
                        help="fold BatchNorm into the convs for LRP (with or without the folded shift)")
    parser.add_argument("--seed-norm", choices=("logit", "margin"), default="logit",
                        help="contrastive start: divide by each logit (served) or by the margin")
    parser.add_argument("--conservation", action="store_true", help="measure relevance conservation instead")
    parser.add_argument("--seed", type=int, default=0, help="tie-breaking, random maps and re-initialisation seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default=None, help="output file stem (default faithfulness_<model>_<half>)")


def run_meta(args, files, classes, labels, started) -> dict:
    argv = sys.argv[1:]
    if argv[:1] == ["evaluate-faithfulness"]:
        argv = argv[1:]
    return {
        "command": " ".join(["python -m camserve.lab.evaluate_faithfulness"] + argv) if argv else "(in-process)",
        "model": args.model + (f"{args.depth}" if args.model == "cifar-resnet" else ""),
        "half": args.half, "images": len(files) if files else None, "files": files,
        "split": ("CIFAR-10 test JPEGs sorted by class/file, a random.Random(%d).sample of %d, sorted; " % (args.set_seed, args.set_size)
                  if args.model == "cifar-resnet" else "the 500 ImageNet samples sorted by file name; ") +
                 "even positions = choose half, odd = report half" + (f"; first {args.limit} of the half" if args.limit else ""),
        "steps": args.steps, "seed": args.seed, "composite": args.composite, "fold_bn": args.fold_bn,
        "seed_norm": args.seed_norm,
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "top1_accuracy": float((classes == labels).float().mean()) if classes is not None else None,
        "wall_seconds": round(time.time() - started, 1) if started else None,
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    kind, model, input_size, default_layers, data = build(args, device)
    layers = [l.strip() for l in args.layers.split(",")] if args.layers else default_layers
    items = split(image_set(kind, data, args.set_size, args.set_seed), args.half)
    if args.limit:
        items = items[:args.limit]
    files = [f for f, _ in items]
    images = load_batch(kind, data, files, device)
    labels = torch.tensor([l for _, l in items], device=device)
    if args.conservation:
        return conservation(args, model, input_size, layers, images)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(VARIANTS)}")
    started = time.time()

    with torch.inference_mode():
        logits = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
    top2 = logits.topk(2, dim=1).indices
    args._blurred = gaussian_blur(images) if kind == "imagenet" else gaussian_blur(images, 9, 2.0)
    explainer = make_explainer(model, input_size, args.composite, args.fold_bn, args.seed_norm)
    out = Path(args.out)
    stem = args.stem or f"faithfulness_{args.model}{args.depth if kind == 'cifar' else ''}_{args.half}"
    results: Dict[Tuple[str, str], dict] = OrderedDict()
    jobs = [(layer, name) for layer in layers for name in names
            if not (any(k in name for k in NEEDS_ABOVE) and layer == default_layers[-1])]
    for layer in layers:
        rand_explainers = {}
        if not args.no_randomisation:
            for scope in ("head", "all"):
                rmodel, _ = randomised(model, explainer, layer, scope, args.seed)
                rand_explainers[scope] = make_explainer(rmodel, input_size, args.composite, args.fold_bn, args.seed_norm)
        for job_layer, name in jobs:
            if job_layer != layer:
                continue
            t0 = time.time()
            results[(layer, name)] = evaluate_one(explainer, rand_explainers, model, images, top2, layer, name, args)
            print(f"{layer} {name}: overall0 {torch.tensor(results[(layer, name)]['overall0']).mean():.3f} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            meta = run_meta(args, files, logits.argmax(1), labels, started)
            meta["complete"] = len(results) == len(jobs)
            meta["blur"] = "Gaussian kernel 9, sigma 2 (32×32 images)" if kind == "cifar" else "Gaussian kernel 11, sigma 5"
            write(out, stem, meta, results)
    print(f"wrote {out}/{stem}.{{md,json,csv}}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camserve.lab.evaluate_faithfulness", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
