"""Validation of ``camserve drift`` on real photographs: detection rates of injected shifts and the
false-alarm rate of same-distribution windows, at the default threshold, with prediction and
confidence drift from the same windows beside them; plus the cost of a 100,000-record report.

Models, maps and data (all real):

- **ImageNet**: the 500 photographs of ../shared/data/imagenet-samples with the bundled pretrained
  EfficientNet-Lite0 (its own preprocessing, ``EFFNET_LITE0.model_input``); fixed split: the even rows
  of LABELS.tsv are the reference pool (250), the odd rows the current pool (250);
- **CIFAR-10**: the 5,000 test images of ../shared/data/cifar10-test with the pretrained CIFAR
  ResNet-20 (``examples/cifar_resnet/model.py``, weights ../shared/models/cifar-resnet), the first 200
  files of each class; fixed split: per class, alternate files (1,000 reference, 1,000 current).

The map: **Grad-CAM at the last feature map** (``_conv_head`` 7 × 7; ``layer3`` 8 × 8) for the top-1
class, summarised by :func:`camserve.engine.imaging.summary.summarise` and written as audit records,
read back by :func:`camserve.ops.drift_records.read_rows` — the path ``camserve drift`` takes.

Conditions (on the current pool; the reference is always the clean pool with the original model):
``clean`` (no shift: the false-alarm rate), ``offcentre`` (keep the bottom-right 70 % of the photo:
the object moves up-left), ``blur`` (Gaussian, radius 1.5 px in the model-input frame), ``jpeg``
(re-encoded at quality 10), ``patch50`` (a magenta square, ¼ of the side, in the bottom-right corner
of the model input, on 50 % of the images), ``border50`` (a black frame ⅛ of the side on 50 %), and
``swapped`` (the same architecture with its last stage re-initialised, seed 0: ``_blocks.15`` /
``layer3``; CIFAR also ``swapped_block``: only the last block ``layer3.2``).

Each image's map is computed ONCE per condition; windows are drawn by resampling the precomputed
rows: per repetition a reference window (``REF_WINDOW`` rows of the reference pool) and a current
window of ``n`` rows of the current pool (seeded, without replacement), tested with
:func:`camserve.ops.drift.compare_window` at the defaults (α = 0.05 BH over overall + classes with
≥ 20 rows, 1000 permutations). Explanation drift = the verdict; prediction drift = the class
histogram test p ≤ 0.05; confidence drift = KS on the top-1 score p ≤ 0.05 (overall).

    .venv/bin/python benchmarks/drift_validation.py [--reps 30] [--clean-reps 100] [--quick]

Writes ``benchmarks/results/drift_validation.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image, ImageFilter

from camserve.cli.main import main as camserve_main
from camserve.engine import Explainer, ExplainSpec
from camserve.engine.imaging.summary import summarise
from camserve.engine.models import EFFNET_LITE0, IMAGENET_MEAN, IMAGENET_STD, imagenet_class_names, load_effnet_lite0
from camserve.ops.drift import DriftSettings, RollingDrift, compare_window
from camserve.ops.drift_records import COLUMNS, Rows, read_rows

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))
IMAGENET = SHARED / "data" / "imagenet-samples"
CIFAR = SHARED / "data" / "cifar10-test"
RESNET20 = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
RESULTS = REPO / "benchmarks" / "results"
METHOD = "gradcam"
SIZES = {"imagenet": (50, 100, 200), "cifar": (50, 100, 200, 400)}
REF_WINDOW = {"imagenet": 200, "cifar": 500}
CIFAR_PER_CLASS = 200  # of the 500 files per class: 1,000 reference + 1,000 current images
BATCH = 32


# -- images and shifts ----------------------------------------------------------------------------------------
def to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def offcentre(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    out = image.crop((int(0.3 * w), int(0.3 * h), w, h))
    return out.resize((side, side), Image.BILINEAR) if side else out


def blur(image: Image.Image, scale: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=1.5 * scale))


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=10)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def patch(batch: torch.Tensor, chosen: torch.Tensor, mean, std) -> torch.Tensor:
    side = batch.shape[-1] // 4
    out = batch.clone()
    for c, value in enumerate((1.0, 0.0, 1.0)):
        out[chosen, c, -side:, -side:] = (value - mean[c]) / std[c]
    return out


def border(batch: torch.Tensor, chosen: torch.Tensor, mean, std) -> torch.Tensor:
    width = batch.shape[-1] // 8
    out = batch.clone()
    frame = torch.ones(batch.shape[-2:], dtype=torch.bool)
    frame[width:-width, width:-width] = False
    for c in range(3):
        channel = out[:, c]
        channel[chosen[:, None, None] & frame] = (0.0 - mean[c]) / std[c]
    return out


def reinitialised(model: torch.nn.Module, stage: str) -> torch.nn.Module:
    """A copy of ``model`` with every parameterised module under ``stage`` re-initialised (seed 0)."""
    import copy

    clone = copy.deepcopy(model)
    torch.manual_seed(0)
    for _name, module in clone.get_submodule(stage).named_modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone.eval()


# -- the two datasets -------------------------------------------------------------------------------------------
class Dataset:
    """Images of one collection, their pools, the model and its preprocessing."""

    def __init__(self, name: str):
        self.name = name
        if name == "imagenet":
            with open(IMAGENET / "LABELS.tsv") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            self.files = [IMAGENET / r["file"] for r in rows]
            self.labels = [int(r["class_index"]) for r in rows]
            self.pool = np.array([i % 2 for i in range(len(rows))])  # 0 reference, 1 current
            self.model = load_effnet_lite0()
            self.names = imagenet_class_names()
            self.layer, self.last_stage, self.side = "_conv_head", "_blocks.15", 0
            self.mean, self.std = EFFNET_LITE0.mean, EFFNET_LITE0.std
            self.input_size = EFFNET_LITE0.input_size
        else:
            self.files, self.labels, pools = [], [], []
            for index, cls in enumerate(CIFAR_CLASSES):
                for k, path in enumerate(sorted((CIFAR / cls).glob("*.jpg"))[:CIFAR_PER_CLASS]):
                    self.files.append(path)
                    self.labels.append(index)
                    pools.append(k % 2)
            self.pool = np.array(pools)
            self.model = load_cifar_resnet20()
            self.names = CIFAR_CLASSES
            self.layer, self.last_stage, self.side = "layer3", "layer3", 32
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
            self.input_size = (32, 32)
        self.images = [Image.open(p).convert("RGB") for p in self.files]

    def blur_scale(self, image: Image.Image) -> float:
        return min(image.size) / 256.0 if self.name == "imagenet" else 1.0

    def model_input(self, images: List[Image.Image]) -> torch.Tensor:
        tensors = [to_uint8(i) for i in images]
        if self.name == "imagenet":
            return EFFNET_LITE0.model_input(tensors, torch.device("cpu"))[0]
        batch = torch.stack(tensors).float() / 255.0
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (batch - mean) / std


def load_cifar_resnet20() -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("cifar_resnet_model", REPO / "examples" / "cifar_resnet" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.CifarResNet(depth=20)
    state = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


CONDITIONS = ("clean", "offcentre", "blur", "jpeg", "patch50", "border50", "swapped", "swapped_block")


def conditions_for(dataset: str) -> List[str]:
    return [c for c in CONDITIONS if not (c == "swapped_block" and dataset == "imagenet")]


def explain_condition(data: Dataset, condition: str, indices: np.ndarray, explainers: Dict[str, Explainer],
                      out: Path) -> Dict[str, float]:
    """The audit records of ``indices`` under ``condition`` (written to ``out``); returns timing and the
    top-1 predictions for the context table."""
    model_key = condition if condition.startswith("swapped") else "original"
    explainer = explainers[model_key]
    rng = np.random.default_rng(7)
    chosen_all = rng.random(len(indices)) < 0.5
    start, lines, top1 = time.perf_counter(), [], []
    t0 = datetime(2026, 1, 5, tzinfo=timezone.utc)
    for first in range(0, len(indices), BATCH):
        idx = indices[first:first + BATCH]
        images = [data.images[i] for i in idx]
        if condition == "offcentre":
            images = [offcentre(i, data.side) for i in images]
        elif condition == "blur":
            images = [blur(i, data.blur_scale(i)) for i in images]
        elif condition == "jpeg":
            images = [jpeg(i) for i in images]
        batch = data.model_input(images)
        chosen = torch.from_numpy(chosen_all[first:first + BATCH])
        if condition == "patch50":
            batch = patch(batch, chosen, data.mean, data.std)
        elif condition == "border50":
            batch = border(batch, chosen, data.mean, data.std)
        result = explainer.explain(batch, [ExplainSpec(METHOD, layer=data.layer)] * len(idx))
        probs = torch.softmax(result.logits.float(), dim=1)
        score, index = probs.max(dim=1)
        maps = torch.stack([e.maps[0] for e in result.explanations])
        for k, summary in enumerate(summarise(maps)):
            top1.append(int(index[k]))
            lines.append(json.dumps({
                "time": (t0 + timedelta(seconds=len(lines))).isoformat().replace("+00:00", "Z"),
                "model": data.name, "model_version": model_key, "settings_id": f"{METHOD}@{data.layer}",
                "kind": "explanation",
                "topk": [{"index": int(index[k]), "label": data.names[int(index[k])], "score": round(float(score[k]), 4)}],
                "summaries": [dict(method=METHOD, layer=data.layer, target=int(result.explanations[k].targets[0]),
                                   **summary.to_json())]}, separators=(",", ":")))
    out.write_text("\n".join(lines) + "\n")
    labels = np.array([data.labels[i] for i in indices])
    return {"seconds": time.perf_counter() - start, "images": int(len(indices)),
            "accuracy": float((np.array(top1) == labels).mean()), "top1": top1}


# -- windows ------------------------------------------------------------------------------------------------------
def wilson(k: int, n: int) -> List[float]:
    if n == 0:
        return [math.nan, math.nan]
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


ALPHAS = (0.01, 0.025, 0.05)


def pooled(a: Rows, b: Rows) -> Rows:
    """The rows of ``a`` then ``b`` (for the random re-splits of the clean maps)."""
    return Rows(**{name: np.concatenate([getattr(a, name), getattr(b, name)]) for name in COLUMNS})


def rates(reference: Rows, current: Rows, n: int, n_ref: int, reps: int, seed: int,
          resplit: bool = False) -> Dict[str, object]:
    """Detection rates over ``reps`` windows; ``resplit``: every repetition first splits the union of
    both pools at random into two halves (reference half, current half) — the unconditional
    false-alarm rate, which α bounds — instead of the fixed split."""
    settings = DriftSettings()
    both = pooled(reference, current) if resplit else None
    hits = {"explanation": 0, "prediction": 0, "confidence": 0, "explanation_only": 0, "classes_flagged": 0}
    at_alpha = {a: {"explanation": 0, "prediction": 0, "confidence": 0} for a in ALPHAS}
    classes_tested, seconds = [], 0.0
    for rep in range(reps):
        rng = np.random.default_rng([seed, n, rep, int(resplit)])
        ref_pool, cur_pool = reference, current
        if resplit:
            order = rng.permutation(len(both))
            ref_pool, cur_pool = both.take(np.sort(order[:len(reference)])), both.take(np.sort(order[len(reference):]))
        ref = ref_pool.take(np.sort(rng.choice(len(ref_pool), min(n_ref, len(ref_pool)), replace=False)))
        cur = cur_pool.take(np.sort(rng.choice(len(cur_pool), n, replace=False)))
        start = time.perf_counter()
        result = compare_window(ref, cur, settings)
        seconds += time.perf_counter() - start
        expl = result.drifted
        p_pred, p_conf = result.prediction.get("p"), result.confidence.get("p")
        p_pred = 1.0 if p_pred is None or not math.isfinite(p_pred) else p_pred
        p_conf = 1.0 if p_conf is None or not math.isfinite(p_conf) else p_conf
        pred, conf = p_pred <= settings.alpha, p_conf <= settings.alpha
        hits["explanation"] += expl
        hits["prediction"] += pred
        hits["confidence"] += conf
        hits["explanation_only"] += expl and not pred and not conf
        classes = [g for g in result.groups if g.name != "overall"]
        classes_tested.append(sum(g.status != "too few" for g in classes))
        hits["classes_flagged"] += any(g.status == "drift" for g in classes)
        min_q = min([g.q for g in result.groups if g.status != "too few"] or [1.0])
        for a in ALPHAS:  # BH rejects something at level a iff the smallest q is ≤ a
            at_alpha[a]["explanation"] += min_q <= a
            at_alpha[a]["prediction"] += p_pred <= a
            at_alpha[a]["confidence"] += p_conf <= a
    out: Dict[str, object] = {"n": n, "n_reference": min(n_ref, len(reference)), "reps": reps, "resplit": resplit,
                              "mean_classes_tested": round(float(np.mean(classes_tested)), 2),
                              "seconds_per_window": round(seconds / reps, 4)}
    for key, k in hits.items():
        out[key] = round(k / reps, 3)
        out[key + "_ci95"] = wilson(k, reps)
    out["at_alpha"] = {str(a): {k: round(v / reps, 3) for k, v in counts.items()} for a, counts in at_alpha.items()}
    return out


# -- cost: a report of 100,000 records ------------------------------------------------------------------------------
def report_cost(dataset: str, clean: Path, shifted: Path, folder: Path, records: int = 100_000) -> Dict[str, object]:
    """100,000 audit records resampled from the real summaries of the current pool (the first 60 %
    clean, the rest ``patch50``: the same images), one every 8.64 s over ten days;
    ``camserve drift --reference-window 5d --window 1d``."""
    rng = np.random.default_rng(11)
    clean_lines = clean.read_text().splitlines()
    shifted_lines = shifted.read_text().splitlines()
    big = folder / f"{dataset}-100k.jsonl"
    t0 = datetime(2026, 2, 1, tzinfo=timezone.utc)
    with open(big, "w") as f:
        for i in range(records):
            pool = clean_lines if i < 0.6 * records else shifted_lines
            record = json.loads(pool[int(rng.integers(len(pool)))])
            record["time"] = (t0 + timedelta(seconds=8.64 * i)).isoformat().replace("+00:00", "Z")
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    out = folder / f"{dataset}-report"
    start = time.perf_counter()
    code = camserve_main(["drift", "--reference", str(big), "--reference-window", "5d", "--window", "1d",
                          "--out", str(out), "--quiet"])
    seconds = time.perf_counter() - start
    body = json.loads((out / "drift.json").read_text())
    return {"records": records, "file_bytes": big.stat().st_size, "exit_code": code, "seconds": round(seconds, 2),
            "seconds_parts": body["seconds"], "html_bytes": (out / "drift.html").stat().st_size,
            "windows": [w["verdict"] for w in body["streams"][0]["windows"]]}


def rolling_cost(reference: Rows, current: Rows) -> Dict[str, float]:
    rolling = RollingDrift(reference.grids, window=200)
    for grid in current.grids[:200]:
        rolling.add(grid)
    start = time.perf_counter()
    for _ in range(10):
        rolling.score()
    return {"reference": int(rolling.reference.shape[0]), "window": 200, "permutations": rolling.permutations,
            "ms_per_score": round(1000 * (time.perf_counter() - start) / 10, 1)}


# -- the run ------------------------------------------------------------------------------------------------------
def run_dataset(name: str, reps: int, clean_reps: int, folder: Path, log: Callable[[str], None]) -> Dict[str, object]:
    data = Dataset(name)
    explainers = {"original": Explainer(data.model, data.input_size, default_layer=data.layer),
                  "swapped": Explainer(reinitialised(data.model, data.last_stage), data.input_size,
                                       default_layer=data.layer)}
    if name == "cifar":
        explainers["swapped_block"] = Explainer(reinitialised(data.model, "layer3.2"), data.input_size,
                                                default_layer=data.layer)
    ref_idx, cur_idx = np.nonzero(data.pool == 0)[0], np.nonzero(data.pool == 1)[0]
    files, compute = {}, {}
    files["reference"] = folder / f"{name}-reference.jsonl"
    compute["reference"] = explain_condition(data, "clean", ref_idx, explainers, files["reference"])
    log(f"{name}: reference pool {len(ref_idx)} maps in {compute['reference']['seconds']:.0f} s")
    clean_top1 = None
    for condition in conditions_for(name):
        files[condition] = folder / f"{name}-{condition}.jsonl"
        compute[condition] = explain_condition(data, condition, cur_idx, explainers, files[condition])
        if condition == "clean":
            clean_top1 = np.array(compute[condition]["top1"])
        compute[condition]["top1_agreement_with_clean"] = float((np.array(compute[condition]["top1"]) == clean_top1).mean())
        log(f"{name}: {condition}: {len(cur_idx)} maps in {compute[condition]['seconds']:.0f} s, "
            f"top-1 accuracy {compute[condition]['accuracy']:.3f}")
    reference = read_rows(files["reference"])
    table = {}
    for condition in conditions_for(name):
        current = read_rows(files[condition])
        table[condition] = []
        for n in SIZES[name]:
            r = rates(reference, current, n, REF_WINDOW[name], clean_reps if condition == "clean" else reps,
                      seed=CONDITIONS.index(condition))
            table[condition].append(r)
            log(f"{name}: {condition} n={n}: explanation {r['explanation']:.2f}, prediction {r['prediction']:.2f}, "
                f"confidence {r['confidence']:.2f} ({r['seconds_per_window']:.2f} s/window)")
    table["clean_resplit"] = []
    clean = read_rows(files["clean"])
    for n in SIZES[name]:
        r = rates(reference, clean, n, REF_WINDOW[name], clean_reps, seed=99, resplit=True)
        table["clean_resplit"].append(r)
        log(f"{name}: clean (random re-split) n={n}: explanation {r['explanation']:.2f}, prediction "
            f"{r['prediction']:.2f}, confidence {r['confidence']:.2f}")
    cost = report_cost(name, files["clean"], files["patch50"], folder)
    log(f"{name}: 100,000-record report in {cost['seconds']:.1f} s")
    return {"model": "EfficientNet-Lite0 (bundled, pretrained)" if name == "imagenet" else "CIFAR ResNet-20 (pretrained)",
            "layer": data.layer, "method": METHOD, "pools": {"reference": int(len(ref_idx)), "current": int(len(cur_idx))},
            "reference_window": REF_WINDOW[name], "sizes": list(SIZES[name]),
            "maps": {c: {k: v for k, v in compute[c].items() if k != "top1"} for c in compute},
            "rates": table, "report_100k": cost, "rolling": rolling_cost(reference, read_rows(files["clean"]))}


def markdown(body: Dict[str, object]) -> str:
    settings = body["settings"]
    out = ["# Explanation drift: validation on real photographs",
           "",
           f"Generated by `benchmarks/drift_validation.py` on {body['machine']} in {body['seconds']:.0f} s "
           f"({body['date']}; the 2 cores were shared with other jobs, so the seconds are upper bounds). "
           f"Defaults of `camserve drift`: α = {settings['alpha']} (Benjamini–Hochberg over overall + classes), "
           f"classes need ≥ {settings['min_samples']} rows per side, {settings['permutations']} permutations. "
           f"Map: Grad-CAM at the last feature map, top-1 class. Each cell: the rate over repeated windows at which "
           f"**explanation** / prediction / confidence drift fired (each at p or q ≤ α); for the `clean` rows that is "
           f"the false-alarm rate. In brackets: windows where explanation drift fired and neither prediction nor "
           f"confidence drift did.", ""]
    for name, ds in body["datasets"].items():
        shifted = [c for c in ds["rates"] if not c.startswith("clean")]
        out += [f"## {name}: {ds['model']}, Grad-CAM at `{ds['layer']}`", "",
                f"Pools: {ds['pools']['reference']} reference / {ds['pools']['current']} current images (fixed split); "
                f"reference window {ds['reference_window']} rows; repetitions: clean {ds['rates']['clean'][0]['reps']}, "
                f"shifts {ds['rates'][shifted[0]][0]['reps']}. `clean` draws both windows from the fixed pools; "
                f"`clean_resplit` splits the clean maps of both pools at random again for every repetition "
                f"(the unconditional false-alarm rate that α bounds).", ""]
        header = "| condition | top-1 acc. | top-1 = clean's | " + " | ".join(
            f"n = {n}: expl / pred / conf (expl-only)" for n in ds["sizes"]) + " |"
        out += [header, "|" + "---|" * (3 + len(ds["sizes"]))]
        for condition, cells in ds["rates"].items():
            maps = ds["maps"]["clean" if condition.startswith("clean") else condition]
            row = [condition, f"{maps['accuracy']:.3f}", f"{maps['top1_agreement_with_clean']:.3f}"]
            for c in cells:
                row.append(f"**{c['explanation']:.2f}** / {c['prediction']:.2f} / {c['confidence']:.2f} "
                           f"({c['explanation_only']:.2f})")
            out.append("| " + " | ".join(row) + " |")
        out += [""]
        for key in ("clean", "clean_resplit"):
            out.append(f"False-alarm rate, `{key}` (95 % Wilson interval): " + ", ".join(
                f"n = {c['n']}: {c['explanation']:.3f} [{c['explanation_ci95'][0]:.3f}, {c['explanation_ci95'][1]:.3f}]"
                for c in ds["rates"][key]) + ".")
        out += ["", "Explanation drift at other thresholds (rate at α = " + " / ".join(str(a) for a in ALPHAS) + "):", "",
                "| condition | " + " | ".join(f"n = {n}" for n in ds["sizes"]) + " |",
                "|" + "---|" * (1 + len(ds["sizes"]))]
        for condition, cells in ds["rates"].items():
            out.append(f"| {condition} | " + " | ".join(
                " / ".join(f"{c['at_alpha'][str(a)]['explanation']:.2f}" for a in ALPHAS) for c in cells) + " |")
        out += ["", "Where explanation drift fires before or without prediction and confidence drift (from the "
                "table: explanation ≥ 0.8 while both others < 0.5), and where it does not (explanation < 0.5 while "
                "another ≥ 0.8):", ""]
        for condition in shifted:
            for c in ds["rates"][condition]:
                if c["explanation"] >= 0.8 and c["prediction"] < 0.5 and c["confidence"] < 0.5:
                    out.append(f"- {condition}, n = {c['n']}: **explanation only** ({c['explanation']:.2f} vs "
                               f"prediction {c['prediction']:.2f}, confidence {c['confidence']:.2f})")
                elif c["explanation"] < 0.5 and max(c["prediction"], c["confidence"]) >= 0.8:
                    out.append(f"- {condition}, n = {c['n']}: **missed by explanation** ({c['explanation']:.2f} vs "
                               f"prediction {c['prediction']:.2f}, confidence {c['confidence']:.2f})")
                elif max(c["explanation"], c["prediction"], c["confidence"]) < 0.5:
                    out.append(f"- {condition}, n = {c['n']}: nothing detects it reliably ({c['explanation']:.2f} / "
                               f"{c['prediction']:.2f} / {c['confidence']:.2f})")
        clean = ds["rates"]["clean"]
        out += ["", "Mean classes tested per window: " + ", ".join(
            f"n = {c['n']}: {c['mean_classes_tested']}" for c in clean) + "; seconds per window test: " + ", ".join(
            f"n = {c['n']}: {c['seconds_per_window']}" for c in clean) + ".",
                f"Maps: {sum(m['images'] for m in ds['maps'].values())} images explained in "
                f"{sum(m['seconds'] for m in ds['maps'].values()):.0f} s.",
                f"Report of 100,000 records (resampled real summaries of the current pool, 60 % clean then 40 % "
                f"`patch50`, ten days, `--reference-window 5d --window 1d`): **{ds['report_100k']['seconds']} s** end "
                f"to end ({ds['report_100k']['file_bytes'] / 1e6:.0f} MB log, exit {ds['report_100k']['exit_code']}, "
                f"windows {ds['report_100k']['windows']}).",
                f"RollingDrift: reference {ds['rolling']['reference']}, window {ds['rolling']['window']}, "
                f"{ds['rolling']['permutations']} permutations: {ds['rolling']['ms_per_score']} ms per score().", ""]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25, help="repetitions per shifted condition and size")
    parser.add_argument("--clean-reps", type=int, default=100, help="repetitions of the no-shift windows")
    parser.add_argument("--datasets", nargs="+", default=["cifar", "imagenet"], choices=["cifar", "imagenet"])
    parser.add_argument("--out", type=Path, default=RESULTS / "drift_validation")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    body: Dict[str, object] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch "
                                          f"{torch.__version__}, {torch.get_num_threads()} threads",
                               "settings": {"alpha": DriftSettings().alpha, "min_samples": DriftSettings().min_samples,
                                            "permutations": DriftSettings().permutations,
                                            "max_samples": DriftSettings().max_samples},
                               "reps": args.reps, "clean_reps": args.clean_reps, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            body["datasets"][name] = run_dataset(name, args.reps, args.clean_reps, Path(tmp), log)
    body["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(body, indent=1))
    args.out.with_suffix(".md").write_text(markdown(body))
    log(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
