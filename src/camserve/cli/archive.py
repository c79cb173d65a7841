"""``camserve archive``: one command from a model spec to a TorchServe ``.mar``.

    camserve archive pets --source torchvision --arch resnet50 --num-classes 37 --weights ft.pt \\
        --labels index_to_name.json
    camserve archive vit --source timm --arch vit_small_patch16_224 --weights vit.safetensors
    camserve archive cifar20 --source eager --model-file model.py --class-name CifarResNet \\
        --kwargs '{"depth": 20}' --weights resnet20.th --preprocess crop=32 --labels cifar10.json

It loads the model first, exactly as the worker will (no network, state dicts only), runs the
layer discovery and checks the default method and layers, so a spec that cannot serve fails here
with the reason instead of in a worker's log. Then it writes ``model-config.yaml`` (TorchServe's
batching keys + the ``handler:`` section with the spec and the defaults) and calls
``torch-model-archiver`` with the camserve package, the entry file for the task, the weights, the
model file, the label map (as ``index_to_name.json``), a transformers folder (as ``hf_model/``)
and any ``--extra-file``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import yaml

from camserve.commands.model_args import add_model_arguments, spec_from_args
from camserve.lab.calibration_card import CARD_JSON, read_card
from camserve.engine.pipeline import ExplainSpec
from camserve.engine.models import embedding_model_for, load_spec, profile_with_layers
from camserve.engine import CANONIZERS, ExplanationInputError, FamExplainer
from camserve.serving.classifier import build_explainer
from camserve.serving.monitor import MonitorSettings
from camserve.serving.settings import HandlerSettings
import camserve

#: TorchServe keys when neither --config nor --spec gives them (the bundled archives' values)
DEFAULT_CONFIG: Dict[str, Any] = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 100,
                                  "responseTimeout": 120, "startupTimeout": 300}
ENTRY = {"classify": ("classifier_handler.py", "camserve.serving.classifier", "ImageClassifierHandler"),
         "embed": ("embedding_handler.py", "camserve.serving.embedding", "EmbeddingHandler")}
PACKAGE_SUFFIXES = (".py", ".tsv", ".json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name (the .mar file and the /predictions/<name> route)")
    add_model_arguments(parser)
    parser.add_argument("--config", default=None,
                        help="base model-config.yaml (TorchServe batching keys and handler defaults)")
    parser.add_argument("--default-method", default=None, help="method of /explanations and explain=1")
    parser.add_argument("--default-layer", default=None, help="layer when a request names none (module path or stageN)")
    parser.add_argument("--method-layer", action="append", default=[], metavar="METHOD=LAYER",
                        help="a method's own default layer, e.g. shallowcam=stage2 (repeatable)")
    parser.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                        help="a default method option (handler.method_options; a request's own options win), "
                             "e.g. shallowcam.temperature=4 (repeatable)")
    parser.add_argument("--composite", default=None,
                        help="LRP composite of relevance passes (handler.composite): epsilon_plus (default), "
                             "epsilon, epsilon_alpha2_beta1, epsilon_gamma[:γ], …")
    parser.add_argument("--canonizer", default=None, choices=sorted(CANONIZERS),
                        help="how relevance passes see the model (handler.canonizer): BatchNorm folded into the "
                             "conv before it, its shift kept (fold_bn) or dropped (fold_bn_nobias)")
    parser.add_argument("--extra-file", action="append", default=[], help="another file for the archive (repeatable)")
    parser.add_argument("--calibrate", default=None, metavar="DIR",
                        help="a camserve calibrate --out folder: its calibration.json travels in the archive and sets "
                             "default_method / method_layers / method_options (flags given here win); a --config's "
                             "handler.calibration (relative to the config's folder) does the same")
    parser.add_argument("--export-path", default="model_store", help="folder for the .mar (default: model_store)")
    parser.add_argument("--version", default="1.0", help="model version (default: 1.0)")
    parser.add_argument("--no-check", action="store_true", help="do not load the model before archiving")


def handler_section(args, spec, base: Dict[str, Any]) -> Dict[str, Any]:
    """The ``handler:`` section: the base's, the archive-relative spec, and the defaults given."""
    section = copy.deepcopy(dict(base.get("handler") or {}))
    archived = replace(spec,
                       weights=None,  # the weights travel as the archive's --serialized-file
                       model_file=os.path.basename(spec.model_file) if spec.model_file else None,
                       labels=None,   # the label map travels as index_to_name.json
                       path="hf_model" if spec.path else None)
    model = archived.to_mapping()
    if spec.source == "effnet_lite0" and spec.task == "classify" and set(model) <= {"source", "task"}:
        model = {}
    if model:
        section["model"] = model
    else:
        section.pop("model", None)
    if args.default_method:
        section["default_method"] = args.default_method
    if args.default_layer:
        section["default_layer"] = args.default_layer
    if args.composite:
        section["composite"] = args.composite
    if args.canonizer:
        section["canonizer"] = args.canonizer
    for item in args.method_layer:
        method, sep, layer = item.partition("=")
        if not sep:
            raise SystemExit(f"--method-layer {item!r}: expected METHOD=LAYER")
        section.setdefault("method_layers", {})[method.strip()] = layer.strip()
    for item in args.method_option:
        key, sep, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not method.strip() or not option.strip():
            raise SystemExit(f"--method-option {item!r}: expected METHOD.OPTION=VALUE")
        section.setdefault("method_options", {}).setdefault(method.strip().lower(), {})[option.strip().lower()] = \
            value.strip()
    return section


#: the spec keys a calibration must share with the archived model
CALIBRATION_SPEC_KEYS = ("source", "arch", "class_name", "kwargs", "num_classes", "task", "preprocess")


def apply_calibration(section: Dict[str, Any], card: Dict[str, Any], spec) -> Dict[str, Any]:
    """The handler section with a calibration's served defaults (``camserve calibrate``'s
    ``served``: ``default_method``, ``method_layers``, ``method_options``) and
    ``calibration: calibration.json``; a card of another model exits with why."""
    mine, theirs = spec.to_mapping(), dict(card.get("spec") or {})
    differ = [k for k in CALIBRATION_SPEC_KEYS if mine.get(k) != theirs.get(k)]
    if differ:
        what = ", ".join(f"{k}: {theirs.get(k)!r} vs {mine.get(k)!r}" for k in differ)
        raise SystemExit(f"--calibrate: the calibration is of another model ({what})")
    served = dict(card.get("served") or {})
    if not served.get("default_method"):
        raise SystemExit("--calibrate: the calibration chose no reading at any stage (see its calibration.html)")
    section = copy.deepcopy(section)
    section["default_method"] = served["default_method"]
    section["method_layers"] = {**dict(section.get("method_layers") or {}), **dict(served.get("method_layers") or {})}
    options = dict(section.get("method_options") or {})
    for method in dict(served.get("method_layers") or {}):  # a calibrated method serves exactly its reading
        values = dict((served.get("method_options") or {}).get(method) or {})
        if values:
            options[method] = values
        else:
            options.pop(method, None)
    if options:
        section["method_options"] = options
    section["calibration"] = CARD_JSON
    return section


def config_card(config: Any, base: Dict[str, Any]) -> Any:
    """The card a ``--config`` names as ``handler.calibration`` (a path relative to the config's folder, as
    the KServe predictor reads it from ``--model-config``), so that it travels in the archive as with
    ``--calibrate``; ``None`` when the config names none."""
    name = (base.get("handler") or {}).get("calibration")
    if not config or not name:
        return None
    return read_card(Path(config).resolve().parent / str(name), "handler.calibration of --config:")


def check_servable(spec, section: Dict[str, Any]) -> str:
    """Load the model as a worker would and check the defaults; returns a one-line summary."""
    try:  # the worker's reading of the section (method names lower-cased), used for the checks below too
        settings = HandlerSettings.from_model_config({"handler": section})
    except ValueError as error:
        raise SystemExit(str(error)) from None
    defaults = settings.method_options
    loaded = load_spec(spec, os.getcwd())
    if spec.task == "embed":
        model, route = embedding_model_for(loaded)
        fam = FamExplainer(model, None, loaded.profile.input_size, stages=loaded.profile.stages or None)
        for task, layer in settings.task_layers.items():
            try:
                fam.resolve_layer(layer)
            except ExplanationInputError as error:  # the engine's reason, as the worker would log it
                raise SystemExit(f"handler.task_layers.{task}: {error}") from None
        layers = "".join(f", {task} at {layer}" for task, layer in settings.task_layers.items())
        return f"embed: D = {fam.dim}, feature map {fam.channels} channels, FAM route {route}{layers}"
    try:
        explainer = build_explainer(loaded.module, loaded.profile, settings)
    except ValueError as error:  # e.g. handler.captum caps
        raise SystemExit(str(error)) from None
    profile = profile_with_layers(loaded.profile, explainer.catalog)
    method = section.get("default_method", "shallowcam")
    layers = dict(section.get("method_layers") or {})
    for name, layer in [(method, layers.get(method) or section.get("default_layer"))] + list(layers.items()):
        try:
            explainer.validate(ExplainSpec(name, layer=layer, options=dict(defaults.get(name) or {})))
        except Exception as error:  # noqa: BLE001 - reported as the archive's configuration error
            raise SystemExit(f"default method {name!r} at layer {layer or explainer.default_layer!r} cannot serve "
                             f"this model: {error}") from None
    try:  # handler.monitor (its audit log may come from the server's environment: not required here)
        MonitorSettings.from_config(settings, explainer, audit_on=True)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return (f"classify: {explainer.num_classes} classes, default layer {explainer.default_layer}, "
            f"stages {', '.join(profile.stages)}")


def stage_package(stage: Path) -> Path:
    """A copy of the camserve package (sources and data only) under ``stage/pkg/camserve``."""

    source = Path(camserve.__file__).resolve().parent
    target = stage / "pkg" / "camserve"
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in PACKAGE_SUFFIXES:
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
    return stage / "pkg"


def entry_file(task: str, stage: Path) -> Path:
    """The task's entry file: the repository's ``handlers/<kind>_handler.py`` (beside ``src/``), else a
    generated one."""

    name, module, base = ENTRY[task]
    repo_entry = Path(camserve.__file__).resolve().parents[2] / "handlers" / name
    if repo_entry.is_file():
        return repo_entry
    generated = stage / name
    generated.write_text(f'"""TorchServe entry file written by camserve archive."""\n\nfrom {module} import {base}\n\n\n'
                         f'class Camserve{base}({base}):\n    """All logic in {module}."""\n')
    return generated


def archiver() -> str:
    local = Path(sys.executable).parent / "torch-model-archiver"
    found = str(local) if local.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise SystemExit("torch-model-archiver not found: pip install 'camserve[serve]'")
    return found


def run(args: argparse.Namespace) -> int:
    spec, spec_config = spec_from_args(args)
    base = copy.deepcopy(DEFAULT_CONFIG)
    for config in (spec_config, yaml.safe_load(Path(args.config).read_text()) if args.config else {}):
        for key, value in (config or {}).items():
            if key == "handler":
                base["handler"] = {**dict(base.get("handler") or {}), **dict(value or {})}
            else:
                base[key] = value
    for path, what in ((spec.weights, "--weights"), (spec.model_file, "--model-file"), (spec.labels, "--labels"),
                       (spec.path, "--hf-dir"), *[(f, "--extra-file") for f in args.extra_file]):
        if path and not os.path.exists(path):
            raise SystemExit(f"{what} {path!r} not found")
    card = read_card(Path(args.calibrate)) if getattr(args, "calibrate", None) else config_card(args.config, base)
    if card is not None:
        base["handler"] = apply_calibration(dict(base.get("handler") or {}), card, spec)
    base["handler"] = handler_section(args, spec, base)
    if not args.no_check:
        try:
            print(f"checked {args.name}: {check_servable(spec, base['handler'])}")
        except SystemExit:
            raise
        except Exception as error:  # noqa: BLE001 - any load failure stops the archive with its reason
            raise SystemExit(f"{args.name}: the model cannot be served: {type(error).__name__}: {error}") from None
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as tmp:
        stage = Path(tmp)
        pkg = stage_package(stage)
        if spec.labels:
            shutil.copy2(spec.labels, pkg / "index_to_name.json")
        if spec.path:
            shutil.copytree(spec.path, pkg / "hf_model")
        for extra in args.extra_file:
            shutil.copy2(extra, pkg / os.path.basename(extra))
        if card is not None:
            (pkg / CARD_JSON).write_text(json.dumps(card, indent=1))
        config_file = stage / "model-config.yaml"
        config_file.write_text(f"# model-config.yaml of {args.name}.mar, written by camserve archive\n"
                               + yaml.safe_dump(base, sort_keys=False))
        os.makedirs(args.export_path, exist_ok=True)
        cmd: List[str] = [archiver(), "--force", "--model-name", args.name, "--version", args.version,
                          "--handler", str(entry_file(spec.task, stage)), "--extra-files", str(pkg),
                          "--config-file", str(config_file), "--export-path", args.export_path]
        if spec.weights:
            cmd += ["--serialized-file", os.path.abspath(spec.weights)]
        if spec.model_file:
            cmd += ["--model-file", os.path.abspath(spec.model_file)]
        env = dict(os.environ, TMPDIR=str(stage))  # the archiver stages in $TMPDIR/<name>: keep builds apart
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torch-model-archiver failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    mar = Path(args.export_path) / f"{args.name}.mar"
    print(f"built {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return 0
