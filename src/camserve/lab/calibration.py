"""Calibration: per stage of a model, the most faithful CAM reading that passes the sanity checks.

The protocol is the lab's (:mod:`camserve.lab.evaluate_faithfulness`, :func:`evaluate_one`), run on
the user's own images split into a **choose** and a **report** half
(:mod:`camserve.lab.calibration_images`):

* per image ``i`` and map, RISE curves with ``steps`` (≥ 16) steps, ties broken by a seeded
  permutation; ``overall0_i = AUC(ins_i) − AUC(del0_i)`` (deletion to zeros),
  ``overallB_i = AUC(ins_i) − AUC(delB_i)`` (deletion to the blurred image), softmax probability
  of the class predicted on the clean image; the calibration's score is their mean
  ``overall_i = (overall0_i + overallB_i) / 2``;
* paired against LayerCAM on the same images: ``d_i = overall_i − overall_i^LayerCAM``,
  ``vs_layercam = mean(d)``, ``sem = sd(d) / √n``, wins = #{d_i > 0};
* checks (means over the half): **C** class sensitivity ``rho12 ≤ rho12^LayerCAM`` (Spearman of the
  top-1 and top-2 class maps; LayerCAM passes its own), **D** ``cds > 0`` and ``oma > 0`` (the
  class's own map deletes its evidence faster than the runner-up's), **R** model randomisation
  ``rho_rand_all < max_rho_rand`` (0.5; the map after re-initialising every parametrised layer
  above the stage), measured on the first ``randomisation_images`` images of each half (32 by
  default; the halves are a seeded sample in sorted order, so this is a fixed seeded subset).

**Choose half:** every candidate at every stage, measured in slices of ``eliminate_slice`` images
with early elimination between slices (:mod:`camserve.lab.calibration_elimination`: a candidate more
than ``eliminate_z`` SEM below the current best, or clearly failing a check, stops there; LayerCAM
and the best never do; 0 turns it off); per stage the surviving candidate with the highest mean
``overall`` on the whole half among those passing the required checks is chosen (LayerCAM may
win). **Report half:** the chosen reading and LayerCAM only, the card's figures. The served defaults
(:func:`served_defaults`): the chosen method of the stage with the highest choose-half ``overall``
is ``default_method``; each chosen method's ``method_layers`` entry is its best stage (choose half)
and its ``method_options`` the options of that reading.

**Cost.** The curves' step images are scored by
:class:`~camserve.lab.curve_forward.CurveForward` (OpenVINO when available and in agreement with the
eager model, else the eager model) in batches of ``batch_size``; the probabilities of each image's
clean, blurred and all-zero versions — every curve's first and last step — are computed once per
half and shared by every stage and reading
(:func:`~camserve.engine.evaluation.metrics.source_scores`), so a reading costs ``4 (S − 1)``
forwards per image (60 at 16 steps) instead of ``4 (S + 1)``.

Candidates (:data:`CANDIDATES`, names of :data:`~camserve.lab.evaluate_faithfulness.VARIANTS`):
``layercam``, ``gradcam``, ``gradcampp``, ``sc[rel+plain]`` (Shallow-CAM's served reading) and
``sc[rel+soft@T4]`` (the softmax start at temperature 4, the reading measured best on the CIFAR
ResNets). Any other VARIANTS name may be given (e.g. ``fgcam``, FG-CAM: not a default, the measured
calibrations predate it). Readings that need a layer above (``refine``, ``above``) do not apply at
the last stage.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from camserve.engine import ExplainSpec
from camserve.engine.evaluation.metrics import class_probabilities, gaussian_blur, mean_and_sem, paired, source_scores
from camserve.lab.calibration_elimination import SECONDS, eliminate, first_images, join, slices, survivors_after
from camserve.lab.curve_forward import CurveForward
from camserve.lab.evaluate_faithfulness import (BASELINE, NEEDS_ABOVE, VARIANTS, evaluate_one, make_explainer,
                                                randomised)

#: the candidate readings, in the order they are tried (names of the lab's VARIANTS)
CANDIDATES = ("layercam", "gradcam", "gradcampp", "sc[rel+plain]", "sc[rel+soft@T4]")
#: the checks a reading must pass to be chosen (see the module docstring)
DEFAULT_CHECKS = "CDR"
MIN_STEPS = 16
MIN_RANDOMISATION_IMAGES = 4
#: choose-half images per elimination slice, and how many SEM below the best eliminates
ELIMINATE_SLICE, ELIMINATE_Z = 20, 3.0
#: images per half (the first ones: a seeded sample, sorted) on which the randomisation check is measured
RANDOMISATION_IMAGES = 32


class CalibrationError(ValueError):
    """A calibration that cannot run or choose (a stage with no candidate, …): the message says why."""


def applicable(name: str, layer: str, last_layer: str) -> bool:
    """A reading applies at ``layer`` unless it needs a layer above and ``layer`` is the last stage."""
    return not (any(k in name for k in NEEDS_ABOVE) and layer == last_layer)


def check_candidates(names: Sequence[str], layers: Sequence[str], last_layer: str) -> None:
    """Unknown names, or a stage where none of ``names`` applies, are a :class:`CalibrationError`
    before anything runs."""
    unknown = [n for n in names if n not in VARIANTS or VARIANTS[n][0] is None]
    if unknown:
        raise CalibrationError(f"unknown candidate(s) {unknown}; choose from "
                               f"{[n for n, (m, _) in VARIANTS.items() if m is not None]}")
    for layer in layers:
        if not any(applicable(n, layer, last_layer) for n in names):
            raise CalibrationError(f"stage {layer!r}: no candidate applies there ({', '.join(names)} need a layer "
                                   f"above the last stage); add one, e.g. layercam")


def blur_for(images: torch.Tensor) -> torch.Tensor:
    """The insertion/blur-deletion source: Gaussian kernel 9, σ 2 for inputs ≤ 64 px (CIFAR), else
    kernel 11, σ 5 (the lab's choices)."""
    return gaussian_blur(images, 9, 2.0) if min(images.shape[-2:]) <= 64 else gaussian_blur(images)


def combined(record: dict) -> List[float]:
    """Per-image ``overall_i = (overall0_i + overallB_i) / 2``."""
    return [(a + b) / 2 for a, b in zip(record["overall0"], record["overallB"])]


def score_row(record: dict, base: dict, checks: str, max_rho_rand: float) -> dict:
    """Means (± SEM) of a record, its paired difference vs LayerCAM's record on the same images and
    the checks it passes (``passed`` = every required one)."""
    row: Dict[str, object] = {"n": record["n"]}
    row["overall"], row["overall_sem"] = mean_and_sem(combined(record))
    for key in ("overall0", "overallB", "del0", "delB", "ins", "rho12", "cds", "oma", "rho_rand_head",
                "rho_rand_all"):
        if key in record:
            row[key], row[key + "_sem"] = mean_and_sem(record[key])
    cmp = paired(combined(record), combined(base))
    row.update({"vs_layercam": cmp["diff"], "sem": cmp["sem"], "wins": cmp["wins"], "losses": cmp["losses"]})
    for key in ("overall0", "overallB"):
        one = paired(record[key], base[key])
        row[f"vs_layercam_{key}"], row[f"sem_{key}"] = one["diff"], one["sem"]
    base_rho12 = mean_and_sem(base["rho12"])[0]
    marks = {"C": row["rho12"] <= base_rho12 + 1e-12,
             "D": row["cds"] > 0 and row["oma"] > 0,
             "R": "rho_rand_all" in row and row["rho_rand_all"] < max_rho_rand}
    row["layercam_rho12"] = base_rho12
    row["checks"] = "".join(k for k, ok in marks.items() if ok) or "–"
    row["passed"] = all(marks[c] for c in checks)
    return row


class Calibrator:
    """The protocol over one model: ``module``, its ``input_size`` and stage ``layers`` (module paths,
    in depth order; ``last_layer`` the model's last stage, default the last of ``layers``).
    ``progress(line)`` is told each (half, stage, reading) as it is scored."""

    def __init__(self, module, input_size, layers: Sequence[str], *, candidates: Sequence[str] = CANDIDATES,
                 steps: int = MIN_STEPS, seed: int = 0, checks: str = DEFAULT_CHECKS, max_rho_rand: float = 0.5,
                 composite: str = "epsilon_plus", batch_size: int = 64, explain_batch: int = 32,
                 last_layer: Optional[str] = None, progress: Callable[[str], None] = print,
                 eliminate_slice: int = ELIMINATE_SLICE, eliminate_z: float = ELIMINATE_Z,
                 curve_forward: str = "auto", randomisation_images: int = RANDOMISATION_IMAGES):
        if steps < MIN_STEPS:
            raise CalibrationError(f"--steps {steps}: the protocol needs at least {MIN_STEPS} steps")
        unknown_checks = sorted(set(checks) - set("CDR"))
        if unknown_checks:
            raise CalibrationError(f"--checks {checks!r}: unknown check(s) {unknown_checks}; choose from C, D, R")
        self.module, self.input_size, self.layers = module, tuple(input_size), list(layers)
        self.candidates, self.checks, self.max_rho_rand = list(candidates), checks, max_rho_rand
        self.last_layer = last_layer or self.layers[-1]  # the model's last stage (no layer above it)
        check_candidates(self.candidates, self.layers, self.last_layer)
        self.composite, self.progress = composite, progress
        self.seconds: Dict[str, float] = {}  # where the time went: endpoints, explain, curve, randomisation
        self.settings = argparse.Namespace(steps=steps, batch_size=batch_size, explain_batch=explain_batch, seed=seed)
        self.explainer = make_explainer(module, self.input_size, composite)
        self.eliminate_slice, self.eliminate_z = max(0, int(eliminate_slice)), float(eliminate_z)
        if randomisation_images < MIN_RANDOMISATION_IMAGES:
            raise CalibrationError(f"--randomisation-images {randomisation_images}: the R check needs at least "
                                   f"{MIN_RANDOMISATION_IMAGES} images")
        self.randomisation_images = int(randomisation_images)
        device = next(module.parameters()).device
        self.forward = CurveForward(module, self.input_size, device, curve_forward)
        progress(f"curve forward: {self.forward.describe()}")

    def randomised_explainers(self, layer: str) -> Dict[str, object]:
        """Explainers of the model with the layers above ``layer`` re-initialised (seeded): the last
        one only (``head``) and all of them (``all``); built once per stage, shared by both halves."""
        cache = self.__dict__.setdefault("_randomised", {})
        if layer not in cache:
            cache[layer] = {scope: make_explainer(randomised(self.module, self.explainer, layer, scope,
                                                             self.settings.seed)[0], self.input_size, self.composite)
                            for scope in ("head", "all")}
        return cache[layer]

    def top2(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = torch.cat([self.module(images[i:i + 128]) for i in range(0, len(images), 128)])
        return logits.topk(2, dim=1).indices

    def measure(self, images: torch.Tensor, names_for: Callable[[str], Sequence[str]], half: str,
                slice_images: int = 0) -> Tuple[Dict[str, Dict[str, dict]], Dict[str, List[dict]]]:
        """``({layer: {name: record}}, {layer: [elimination]})``: :func:`evaluate_one` for
        ``names_for(layer)`` at each stage (LayerCAM always measured: the paired baseline), in slices
        of ``slice_images`` images with elimination between them (0: one slice, none eliminated)."""
        top2 = self.top2(images)
        blurred = blur_for(images)
        t0 = time.time()
        fixed = source_scores(class_probabilities(self.forward, top2), images, blurred, self.settings.batch_size)
        self.seconds["endpoints"] = self.seconds.get("endpoints", 0.0) + time.time() - t0
        survivors = {layer: [n for n in dict.fromkeys([BASELINE, *names_for(layer)])
                             if applicable(n, layer, self.last_layer)] for layer in self.layers}
        out: Dict[str, Dict[str, dict]] = {layer: {} for layer in self.layers}
        eliminated: Dict[str, List[dict]] = {layer: [] for layer in self.layers}
        parts = slices(len(images), slice_images)
        done = 0
        for index, part in enumerate(parts):
            settings = argparse.Namespace(**vars(self.settings), _blurred=blurred[part])
            part_fixed = {k: v[part] for k, v in fixed.items()}
            for position, layer in enumerate(self.layers):
                randomised_explainers = self.randomised_explainers(layer)
                for name in survivors[layer]:
                    t0 = time.time()
                    record = evaluate_one(self.explainer, randomised_explainers, self.module, images[part], top2[part],
                                          layer, name, settings, forward=self.forward, fixed=part_fixed,
                                          randomisation_limit=self.randomisation_images - part.start)
                    out[layer][name] = join(out[layer][name], record) if name in out[layer] else record
                    done += 1
                    left = (sum(len(survivors[l]) for l in self.layers[position + 1:])
                            + len(survivors[layer]) - survivors[layer].index(name) - 1
                            + (len(parts) - index - 1) * sum(len(v) for v in survivors.values()))
                    where = f" images {part.start + 1}–{part.stop}" if len(parts) > 1 else ""
                    self.progress(f"[{half} {done}/{done + left}] {layer} {name}{where}: overall "
                                  f"{sum(combined(record)) / record['n']:.3f} ({time.time() - t0:.1f} s)")
                if index == len(parts) - 1:
                    continue
                seen = {n: out[layer][n] for n in survivors[layer]}
                base = seen[BASELINE]
                gone = eliminate(seen, self.candidates, BASELINE, self.checks, self.max_rho_rand, self.eliminate_z,
                                 combined, lambda r: score_row(r, base, self.checks, self.max_rho_rand)["passed"])
                for entry in gone:
                    self.progress(f"[{half}] {layer} {entry['name']} eliminated after {entry['after_images']} "
                                  f"images: {entry['reason']}")
                eliminated[layer] += gone
                survivors[layer] = survivors_after(survivors[layer], gone)
        for records in out.values():
            for record in records.values():
                for key in SECONDS:
                    self.seconds[key] = self.seconds.get(key, 0.0) + record.get(key, 0.0)
        return out, eliminated

    def choose(self, records: Dict[str, Dict[str, dict]],
               eliminated: Optional[Dict[str, List[dict]]] = None) -> Dict[str, dict]:
        """Per stage: every candidate's choose-half row (an eliminated one's on the images it saw,
        with its ``eliminated`` entry) and the chosen name among the survivors (``None``: none passed)."""
        stages = {}
        for layer in self.layers:
            base = records[layer][BASELINE]
            gone = {e["name"]: e for e in (eliminated or {}).get(layer, [])}
            rows = {}
            for name, rec in records[layer].items():
                if name not in self.candidates:
                    continue
                rows[name] = score_row(rec, first_images(base, rec["n"]), self.checks, self.max_rho_rand)
                if name in gone:
                    rows[name]["eliminated"] = gone[name]
            passing = [n for n in rows if rows[n]["passed"] and n not in gone]
            chosen = max(passing, key=lambda n: (rows[n]["overall"], -self.candidates.index(n))) if passing else None
            stages[layer] = {"rows": rows, "chosen": chosen, "eliminated": list(gone.values())}
        return stages

    def resolved_options(self, images: torch.Tensor, name: str, layer: str) -> dict:
        """The engine's resolved options of a reading (what a served explanation reports)."""
        method, options = VARIANTS[name]
        result = self.explainer.explain(images[:1], [ExplainSpec(method, layer=layer, options=dict(options))],
                                        layer_resolution=True)
        return {k: v for k, v in dict(result.explanations[0].options).items()}

    def example_maps(self, images: torch.Tensor, chosen: Dict[str, Optional[str]]) -> Dict[str, torch.Tensor]:
        """``{layer: (N, h, w)}`` top-1 maps of the chosen reading at each stage (for the HTML page)."""
        maps = {}
        for layer, name in chosen.items():
            if name is None:
                continue
            method, options = VARIANTS[name]
            result = self.explainer.explain(images, [ExplainSpec(method, layer=layer, options=dict(options))]
                                            * len(images), layer_resolution=True)
            maps[layer] = torch.stack([e.maps[0] for e in result.explanations]).detach().cpu()
        return maps


def stage_entry(alias: str, layer: str, chosen: Optional[str], choose_rows: Dict[str, dict],
                report_records: Optional[Dict[str, dict]], calibrator: Calibrator, resolved: Optional[dict]) -> dict:
    """One stage of the model card: the choose-half table, the chosen reading and its report-half
    figures vs LayerCAM, and the mean curves of both on the report half."""
    entry: Dict[str, object] = {"stage": alias, "layer": layer, "choose": choose_rows, "chosen": None,
                                "report": None, "curves": {},
                                "eliminated": [r["eliminated"] for r in choose_rows.values() if "eliminated" in r]}
    if chosen is None:
        failing = ", ".join(f"{n} ({r['checks']}{', eliminated' if 'eliminated' in r else ''})"
                            for n, r in choose_rows.items())
        entry["reason"] = f"no candidate passes the checks {calibrator.checks} on the choose half: {failing}"
        return entry
    method, options = VARIANTS[chosen]
    entry["chosen"] = {"name": chosen, "method": method, "options": dict(options), "resolved_options": resolved}
    base = report_records[BASELINE]
    entry["report"] = score_row(report_records[chosen], base, calibrator.checks, calibrator.max_rho_rand)
    entry["layercam_report"] = score_row(base, base, calibrator.checks, calibrator.max_rho_rand)
    entry["curves"] = {name: report_records[name]["mean_curves"] for name in dict.fromkeys([chosen, BASELINE])}
    return entry


def served_defaults(stages: Sequence[dict]) -> dict:
    """``default_method``, ``method_layers`` and ``method_options`` for the archive's handler section
    (the choose half decides: see the module docstring)."""
    chosen = [s for s in stages if s["chosen"] is not None]
    if not chosen:
        return {}
    best: Dict[str, dict] = {}
    for stage in chosen:
        method = stage["chosen"]["method"]
        score = stage["choose"][stage["chosen"]["name"]]["overall"]
        if method not in best or score > best[method]["choose"][best[method]["chosen"]["name"]]["overall"]:
            best[method] = stage
    top = max(chosen, key=lambda s: s["choose"][s["chosen"]["name"]]["overall"])
    options = {m: dict(s["chosen"]["options"]) for m, s in best.items() if s["chosen"]["options"]}
    return {"default_method": top["chosen"]["method"], "default_stage": top["stage"],
            "method_layers": {m: s["layer"] for m, s in best.items()}, "method_options": options}


def served_scores(stages: Sequence[dict]) -> List[dict]:
    """What a served answer carries per calibrated (method, layer, resolved options): the report
    half's ``overall``, ``vs_layercam`` with its ``sem``, and ``n``."""
    return [{"method": s["chosen"]["method"], "layer": s["layer"], "options": s["chosen"]["resolved_options"],
             "overall": round(s["report"]["overall"], 4), "vs_layercam": round(s["report"]["vs_layercam"], 4),
             "sem": round(s["report"]["sem"], 4), "n": s["report"]["n"]}
            for s in stages if s["chosen"] is not None]


def accuracy(calibrator: Calibrator, half: dict) -> Optional[float]:
    """Top-1 accuracy of the model on a half whose labels are known (else ``None``)."""
    if half["labels"] is None:
        return None
    top1 = calibrator.top2(half["images"])[:, 0].cpu()
    return float((top1 == half["labels"]).float().mean())


def calibrate(calibrator: Calibrator, aliases: Dict[str, str], choose: dict, report: dict) -> dict:
    """The whole calibration: choose half (every candidate), report half (chosen + LayerCAM);
    returns the model card's body (``stages``, ``served``, ``scores``, ``timing``) and the example
    maps under ``"_examples"`` (not serialised)."""
    t0 = time.time()
    choose_records, eliminated = calibrator.measure(choose["images"], lambda layer: calibrator.candidates, "choose",
                                                    calibrator.eliminate_slice)
    picked = calibrator.choose(choose_records, eliminated)
    t1 = time.time()
    report_records, _ = calibrator.measure(report["images"],
                                           lambda layer: [n for n in [picked[layer]["chosen"]] if n], "report")
    t2 = time.time()
    by_layer = {layer: alias for alias, layer in aliases.items()}
    stages = []
    for layer in calibrator.layers:
        name = picked[layer]["chosen"]
        resolved = calibrator.resolved_options(report["images"], name, layer) if name else None
        stages.append(stage_entry(by_layer.get(layer, layer), layer, name, picked[layer]["rows"],
                                  report_records[layer], calibrator, resolved))
    examples = calibrator.example_maps(report["images"][:4], {l: picked[l]["chosen"] for l in calibrator.layers})
    return {"stages": stages, "served": served_defaults(stages), "scores": served_scores(stages),
            "top1_accuracy": {"choose": accuracy(calibrator, choose), "report": accuracy(calibrator, report)},
            "timing": {"choose_seconds": round(t1 - t0, 1), "report_seconds": round(t2 - t1, 1),
                       "jobs": {"choose": sum(len(r) for r in choose_records.values()),
                                "report": sum(len(r) for r in report_records.values())},
                       "image_jobs": {"choose": sum(r["n"] for v in choose_records.values() for r in v.values()),
                                      "report": sum(r["n"] for v in report_records.values() for r in v.values())},
                       "parts_seconds": {k: round(v, 1) for k, v in calibrator.seconds.items()},
                       "curve_forward": calibrator.forward.describe()},
            "_examples": examples}
