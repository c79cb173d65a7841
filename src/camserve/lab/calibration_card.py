"""The calibration's model card: ``calibration.json`` and ``calibration.html`` in one folder.

``calibration.json`` (``"format": "camserve-calibration/1"``):

* ``model`` (name), ``spec`` (the model spec mapping), ``data`` (the image folder), ``labels``
  (where labels came from), ``n`` (``{"choose": n, "report": n}``), ``split`` (how), ``protocol``
  (steps, seed, checks, ``max_rho_rand``, candidates with their options, composite, batch sizes,
  ``elimination`` settings, ``curve_forward``: which forward scored the curves and why);
* ``stages``: per stage ``stage`` (alias), ``layer`` (module path), ``chosen`` (``name``,
  ``method``, ``options``, ``resolved_options`` — what a served explanation of that reading
  reports), ``report`` (report half: ``overall`` ± ``overall_sem``, ``overall0``, ``overallB``,
  ``vs_layercam`` = mean of ``overall_i − overall_i^LayerCAM`` with its ``sem`` and ``wins`` /
  ``losses`` of ``n``, ``rho12`` and ``layercam_rho12``, ``cds``, ``oma``, ``rho_rand_head`` /
  ``rho_rand_all``, ``checks``), ``layercam_report``, ``choose`` (every candidate's choose-half row),
  ``curves`` (mean report-half curves), ``eliminated`` (the candidates stopped early on the choose
  half: ``name``, ``after_images``, ``reason``, ``best``, ``vs_best`` ± ``sem``; their ``choose``
  rows are on the images they saw and carry the same entry), or ``chosen: null`` and ``reason``;
* ``served``: ``default_method``, ``default_stage``, ``method_layers``, ``method_options`` (what
  ``camserve archive --calibrate`` writes into the handler section);
* ``scores``: ``[{method, layer, options, overall, vs_layercam, sem, n}]`` — what a served answer
  of that (method, layer, options) carries as ``calibration``;
* ``top1_accuracy`` per half (``null`` without labels), ``timing``, ``wall_seconds``, ``machine``,
  ``command``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict

import torch

from camserve.lab.calibration import Calibrator
from camserve.lab.calibration_images import CalibrationSplit
from camserve.lab.calibration_page import page
from camserve.lab.evaluate_faithfulness import VARIANTS

FORMAT = "camserve-calibration/1"
CARD_JSON = "calibration.json"
CARD_HTML = "calibration.html"


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}")


def build_card(model_name: str, spec: dict, split: CalibrationSplit, calibrator: Calibrator, result: dict,
               wall_seconds: float, command: str) -> dict:
    """The JSON body of the model card (see the module docstring)."""
    settings = calibrator.settings
    return {
        "format": FORMAT, "model": model_name, "spec": spec, "data": str(split.data), "labels": split.labels_from,
        "n": {"choose": len(split.choose), "report": len(split.report), "found": split.total},
        "split": split.describe(),
        "protocol": {"steps": settings.steps, "seed": settings.seed, "checks": calibrator.checks,
                     "max_rho_rand": calibrator.max_rho_rand, "composite": calibrator.composite,
                     "score": "overall = (overall0 + overallB) / 2, overallX = AUC(ins) - AUC(del to X)",
                     "candidates": {n: {"method": VARIANTS[n][0], "options": dict(VARIANTS[n][1])}
                                    for n in calibrator.candidates},
                     "batch_size": settings.batch_size, "explain_batch": settings.explain_batch,
                     "elimination": {"slice_images": calibrator.eliminate_slice, "z": calibrator.eliminate_z,
                                     "rule": "after each slice of the choose half, a candidate with mean(d) + z*SEM(d) "
                                             "< 0 against the current best (d = paired overall difference), or "
                                             "failing a required check by more than z SEM, stops; LayerCAM and "
                                             "the best never do"},
                     "curve_forward": calibrator.forward.describe(),
                     "randomisation_images": calibrator.randomisation_images},
        "stages": result["stages"], "served": result["served"], "scores": result["scores"],
        "top1_accuracy": result["top1_accuracy"], "timing": result["timing"],
        "wall_seconds": round(wall_seconds, 1), "machine": machine(), "command": command,
    }


def write_card(out: Path, card: dict, crops: torch.Tensor, examples: Dict[str, torch.Tensor]) -> Path:
    """``calibration.json`` and ``calibration.html`` into ``out`` (created); returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD_JSON).write_text(json.dumps(card, indent=1))
    (out / CARD_HTML).write_text(page(card, crops[:len(next(iter(examples.values()), crops))], examples),
                                 encoding="utf-8")
    return out / CARD_JSON


def read_card(path: Path, what: str = "--calibrate") -> dict:
    """A ``calibration.json`` (a file, or a folder holding one); a missing or foreign file exits with why
    (``what`` names where the path came from)."""
    path = Path(path)
    if path.is_dir():
        if not (path / CARD_JSON).is_file():
            raise SystemExit(f"{what} {path}: no {CARD_JSON} there (run camserve calibrate --out DIR first)")
        path = path / CARD_JSON
    if not path.is_file():
        raise SystemExit(f"{what} {path}: no such file (a camserve calibrate card, {CARD_JSON})")
    try:
        card = json.loads(path.read_text())
    except ValueError as error:
        raise SystemExit(f"{what} {path}: not JSON ({error})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise SystemExit(f"{what} {path}: not a camserve calibration (format {FORMAT!r})")
    return card
