"""``camserve calibrate``: which CAM reading to trust at each stage of *this* model, on *your* images.

    camserve calibrate --source eager --model-file model.py --class-name CifarResNet \\
        --kwargs '{"depth": 20}' --weights resnet20.th --preprocess crop=32 \\
        --data my_images/ --out calibration/
    camserve archive cifar20 … --calibrate calibration/

The lab's faithfulness protocol (:mod:`camserve.lab.calibration`) on a fixed choose/report split of
the folder (:mod:`camserve.lab.calibration_images`): every candidate at every stage on the choose
half, the most faithful one passing the checks chosen per stage, the chosen ones and LayerCAM
measured on the report half (early elimination between slices of the choose half, curves on
OpenVINO when it is installed: see :mod:`camserve.lab.calibration`). Writes the model card ``calibration.json`` + ``calibration.html``
into ``--out`` (:mod:`camserve.lab.calibration_card`); one progress line per scored reading.

Exit status: 0 when every stage has a chosen reading; 1 with a message for bad inputs (no images,
too few for the split, a stage where no candidate applies) or when some stage has no candidate
passing the checks (the card is written, that stage's ``chosen`` is ``null`` with the reason).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from camserve.commands.local_model import load_local_model
from camserve.commands.model_args import add_model_arguments
from camserve.engine.models import labels_for
from camserve.lab.calibration import (CANDIDATES, DEFAULT_CHECKS, ELIMINATE_SLICE, ELIMINATE_Z, MIN_STEPS,
                                      RANDOMISATION_IMAGES, CalibrationError, Calibrator, calibrate)
from camserve.lab.calibration_card import build_card, write_card
from camserve.lab.calibration_images import load_half, split_items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="folder of your images: LABELS.tsv, class sub-folders, or plain images (no labels)")
    parser.add_argument("--out", required=True, help="folder for calibration.json and calibration.html")
    parser.add_argument("--max-images", type=int, default=200,
                        help="a seeded sample of this many images when the folder has more (default 200; 0 = all)")
    parser.add_argument("--layers", default=None, help="comma list of stages or module paths (default: every stage)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help=f"comma list of readings (default: {','.join(CANDIDATES)})")
    parser.add_argument("--checks", default=DEFAULT_CHECKS,
                        help="checks a reading must pass: C (rho12 <= LayerCAM's), D (cds, oma > 0), "
                             f"R (rho_rand_all < --max-rho-rand); default {DEFAULT_CHECKS}")
    parser.add_argument("--max-rho-rand", type=float, default=0.5, help="randomisation check bound (default 0.5)")
    parser.add_argument("--steps", type=int, default=MIN_STEPS, help=f"curve steps (at least {MIN_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="sample, tie-breaking and re-initialisation seed")
    parser.add_argument("--composite", default="epsilon_plus", help="LRP composite of Shallow-CAM's relevance pass")
    parser.add_argument("--batch-size", type=int, default=64, help="perturbed images per forward")
    parser.add_argument("--explain-batch", type=int, default=32, help="images per explanation call")
    parser.add_argument("--eliminate-slice", type=int, default=ELIMINATE_SLICE,
                        help="choose-half images per elimination slice: after each slice a candidate clearly "
                             f"behind the best stops (default {ELIMINATE_SLICE}; 0 = measure every candidate "
                             "on every image)")
    parser.add_argument("--eliminate-z", type=float, default=ELIMINATE_Z,
                        help=f"eliminate a candidate more than this many SEM below the best (default {ELIMINATE_Z:g})")
    parser.add_argument("--randomisation-images", type=int, default=RANDOMISATION_IMAGES,
                        help="images per half (the first of the seeded sample) on which the randomisation check "
                             f"is measured (default {RANDOMISATION_IMAGES})")
    parser.add_argument("--curve-forward", choices=("auto", "eager"), default="auto",
                        help="forward of the curves' step images: auto = OpenVINO when installed and in "
                             "agreement with the model, else eager; eager = the PyTorch model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    model = load_local_model(args, device, channels_last=True)  # a spec that cannot be built exits with why
    if model.spec.task != "classify":
        raise SystemExit("camserve calibrate: classifiers only (this spec's task is embed)")
    layers = model.resolve_layers([l.strip() for l in args.layers.split(",")] if args.layers
                                  else list(model.profile.stages))
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    try:
        calibrator = Calibrator(model.module, model.profile.input_size, layers, candidates=candidates,
                                steps=args.steps, seed=args.seed, checks=args.checks, max_rho_rand=args.max_rho_rand,
                                composite=args.composite, batch_size=args.batch_size,
                                explain_batch=args.explain_batch, progress=progress,
                                eliminate_slice=args.eliminate_slice, eliminate_z=args.eliminate_z,
                                curve_forward="off" if args.curve_forward == "eager" else "auto",
                                randomisation_images=args.randomisation_images,
                                last_layer=model.resolve_layers([model.profile.stages[-1]])[0])
    except CalibrationError as error:
        raise SystemExit(f"camserve calibrate: {error}") from None
    labels = labels_for(model.spec, ".", calibrator.explainer.num_classes)  # class folders named as the label map
    split = split_items(args.data, args.max_images, args.seed, labels)
    progress(f"{model.name}: {split.describe()}; {len(layers)} stages × {len(candidates)} candidates")
    choose = load_half(split.data, split.choose, model.profile, device)
    report = load_half(split.data, split.report, model.profile, device)
    result = calibrate(calibrator, model.stage_aliases, choose, report)
    examples = result.pop("_examples")
    command = shlex.join(["camserve", *sys.argv[1:]]) if sys.argv[1:2] == ["calibrate"] else "(in-process)"
    card = build_card(model.name, model.spec.to_mapping(), split, calibrator, result, time.time() - started, command)
    path = write_card(args.out, card, report["crops"], examples)
    for stage in card["stages"]:
        r = stage["report"]
        progress(f"{stage['stage']} ({stage['layer']}): " + (
            f"{stage['chosen']['name']} overall {r['overall']:.3f}, vs LayerCAM {r['vs_layercam']:+.3f} ± {r['sem']:.3f} "
            f"({r['wins']}/{r['n']} wins), rho12 {r['rho12']:.2f} (LayerCAM {r['layercam_rho12']:.2f}), checks "
            f"{r['checks']}" if r else f"no candidate: {stage['reason']}"))
    progress(f"wrote {path} and calibration.html ({card['wall_seconds']} s)")
    missing = [s["stage"] for s in card["stages"] if s["chosen"] is None]
    if missing:
        print(f"camserve calibrate: no candidate passes the checks {calibrator.checks} at {', '.join(missing)} "
              f"(see {path})", file=sys.stderr)
        return 1
    return 0
