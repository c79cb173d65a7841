"""The model-spec flags every CLI shares (``camserve archive``, ``camserve layers``, …).

``--source/--arch/--weights/--num-classes/--model-file/--class-name/--kwargs/--hf-dir/--task/
--embedding/--feature-layer/--preprocess/--labels``, or ``--spec FILE`` (a YAML ``model-config.yaml``
whose ``handler.model`` is the spec, or a bare spec mapping); flags override the file.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import yaml

from camserve.engine.models.spec import EMBEDDINGS, SOURCES, TASKS, ModelSpec
from camserve.engine.models import load_spec


def add_model_arguments(parser: argparse.ArgumentParser, task_default: Optional[str] = "classify") -> None:
    group = parser.add_argument_group("model spec")
    group.add_argument("--spec", type=str, default=None,
                       help="YAML file: a model-config.yaml (its handler.model) or a bare model spec")
    group.add_argument("--source", choices=SOURCES, default=None, help="where the model comes from (default: effnet_lite0)")
    group.add_argument("--arch", default=None, help="torchvision / timm architecture name (resnet50, convnext_tiny, …)")
    group.add_argument("--weights", default=None, help="state dict file (.pt/.pth/.th with tensors only, or .safetensors)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier outputs; 0 removes the classifier")
    group.add_argument("--model-file", default=None, help="eager: the Python file defining the nn.Module class")
    group.add_argument("--class-name", default=None, help="eager: the class to build when the file defines several")
    group.add_argument("--kwargs", default=None, help='eager/torchvision/timm constructor arguments as JSON, e.g. \'{"depth": 20}\'')
    group.add_argument("--hf-dir", default=None, help="transformers: a saved model folder (config.json + weights)")
    group.add_argument("--task", choices=TASKS, default=None, help=f"classify or embed (default: {task_default})")
    group.add_argument("--embedding", choices=EMBEDDINGS, default=None,
                       help="embed: the embedding is the pooled map of --feature-layer, the model's output, or auto")
    group.add_argument("--feature-layer", default=None, help="embed: the feature map FAM explains (default: discovered)")
    group.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                       help="resize=256, crop=224, mean=0.485,0.456,0.406, std=…, interpolation=bilinear|bicubic|nearest")
    group.add_argument("--labels", default=None, help="index_to_name.json (TorchServe's label map)")


def parse_preprocess(items) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise SystemExit(f"--preprocess {item!r}: expected KEY=VALUE")
        key = key.strip()
        if key in ("resize", "crop"):
            out[key] = int(value)
        elif key in ("mean", "std"):
            out[key] = [float(v) for v in value.split(",")]
        else:
            out[key] = value
    return out


def read_spec_file(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(model spec mapping, whole model-config mapping or {})`` from a YAML file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a YAML mapping")
    if "handler" in data:
        return dict((data.get("handler") or {}).get("model") or {}), data
    return data, {}


def spec_from_args(args: argparse.Namespace, task_default: str = "classify") -> Tuple[ModelSpec, Dict[str, Any]]:
    """The :class:`ModelSpec` the flags describe (file paths kept as given) and the base model-config."""
    section, config = read_spec_file(args.spec) if args.spec else ({}, {})
    flags = {"source": args.source, "arch": args.arch, "weights": args.weights, "num_classes": args.num_classes,
             "model_file": args.model_file, "class_name": args.class_name, "path": args.hf_dir,
             "task": args.task, "embedding": args.embedding, "feature_layer": args.feature_layer,
             "labels": args.labels}
    section.update({k: v for k, v in flags.items() if v is not None})
    if args.kwargs:
        try:
            section["kwargs"] = json.loads(args.kwargs)
        except ValueError as error:
            raise SystemExit(f"--kwargs: not JSON ({error})") from None
    if args.preprocess:
        section["preprocess"] = {**dict(section.get("preprocess") or {}), **parse_preprocess(args.preprocess)}
    if "source" not in section and any(k in section for k in ("arch", "model_file", "path")):
        raise SystemExit("name the --source (torchvision, timm, eager, transformers) of this model")
    try:
        spec = ModelSpec.from_mapping(section, task=section.get("task") or task_default)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"model spec: {error}") from None
    return spec, config


#: the single-valued spec flags, by their argparse dest
SPEC_FLAGS = ("spec", "source", "arch", "weights", "num_classes", "model_file", "class_name", "kwargs", "hf_dir",
              "task", "embedding", "feature_layer", "labels")


def model_argv(args: argparse.Namespace) -> List[str]:
    """The spec flags of ``args`` as a command line again (to hand the same model to a child process)."""
    argv: List[str] = []
    for dest in SPEC_FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            argv += ["--" + dest.replace("_", "-"), str(value)]
    for item in getattr(args, "preprocess", None) or []:
        argv += ["--preprocess", str(item)]
    return argv


def load_for_cli(spec: ModelSpec, device=None):
    """Load a spec whose file paths are local (relative to the working directory)."""

    base = os.getcwd()
    return load_spec(spec, base, device)
