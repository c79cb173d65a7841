"""From a :class:`ModelSpec` to what a worker serves: the module on its device, its profile, its
labels, and for ``embed`` the :class:`~camserve.engine.models.embedding.EmbeddingModel`.

Layers are discovered once, by the probe forward the explainer runs anyway
(:meth:`ModelProfile`'s ``default_layer`` and ``stages`` come from that catalog, see
:func:`profile_with_layers`); the bundled EfficientNet-Lite0 keeps its hand-written profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, Mapping, Optional, Tuple

import torch
from torch import nn

from camserve.engine.core.layers import LayerCatalog, probe_forward
from camserve.engine.models.bundled import effnet_lite_weights_path, profile_for
from camserve.engine.models.labels import class_names
from camserve.engine.models.profile import ModelProfile, default_profile, preprocessing_values
from camserve.engine.models.sources import build_model
from camserve.engine.models.spec import BUNDLED_SOURCES, ModelSpec
from camserve.engine.models.embedding import EmbeddingModel

#: the embedding equals GAP(feature map) when they agree to this tolerance on the probe
POOLED_TOLERANCE = 1e-4


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    profile: ModelProfile


def archive_path(base_dir: str, name: Optional[str]) -> Optional[str]:
    """``name`` inside ``base_dir`` (absolute names kept); ``None`` for no name."""
    if not name:
        return None
    return name if os.path.isabs(name) else os.path.join(base_dir, name)


def load_spec(spec: ModelSpec, base_dir: str = ".", device: Optional[torch.device] = None,
              serialized_file: Optional[str] = None) -> LoadedModel:
    """Build the spec's model (weights: ``spec.weights``, else the archive's serialized file) in eval
    mode on ``device``; its profile has the preprocessing (spec > source metadata > defaults)."""
    weights = archive_path(base_dir, spec.weights or serialized_file)
    if spec.source in BUNDLED_SOURCES:
        weights = weights or effnet_lite_weights_path(spec.source)
    model, meta = build_model(spec, weights, base_dir)
    if spec.source in BUNDLED_SOURCES:
        profile = profile_for(spec.source)
    else:
        profile = replace(default_profile(spec.arch or spec.class_name or spec.source), **preprocessing_values(meta))
    profile = profile.with_preprocessing(spec.preprocess)
    if not profile.stages:
        profile = replace(profile, stages=declared_stages(model))
    return LoadedModel(spec, model.to(device or "cpu"), profile)


def declared_stages(model: nn.Module) -> Tuple[str, ...]:
    """The stages a model declares itself, shallow → deep: timm's ``feature_info`` (its entries'
    ``module`` paths) where the model has one and each entry names one of its modules; else none,
    and the probe forward discovers them (:meth:`LayerCatalog.stages`)."""
    info = getattr(model, "feature_info", None)
    if info is None or isinstance(info, nn.Module):
        return ()
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info if isinstance(info, (list, tuple)) else ()
    names = [entry.get("module") for entry in entries if isinstance(entry, Mapping)]
    modules = dict(model.named_modules())
    if not names or any(not isinstance(n, str) or n not in modules for n in names):
        return ()
    return tuple(names)


def profile_with_layers(profile: ModelProfile, catalog: LayerCatalog) -> ModelProfile:
    """``profile`` with the discovered default layer and stages where it has none of its own."""
    if profile.default_layer and profile.stages:
        return profile
    return replace(profile, default_layer=profile.default_layer or catalog.default_layer(),
                   stages=profile.stages or tuple(catalog.stages()))


def labels_for(spec: ModelSpec, base_dir: str, num_classes: int) -> List[str]:
    """Class names: ``spec.labels`` (or the archive's ``index_to_name.json``), else ImageNet's for
    1000 outputs, else indices."""
    path = archive_path(base_dir, spec.labels)
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"model.labels: {spec.labels!r} not found in the archive")
    if path is None:
        default = os.path.join(base_dir, "index_to_name.json")
        path = default if os.path.isfile(default) else None
    return class_names(num_classes, path)


def embedding_is_pooled(model: nn.Module, layer: str, input_size: Tuple[int, int]) -> bool:
    """Whether the model's output is ``GAP(A)`` of ``layer`` (e.g. a ResNet with ``fc = Identity``),
    checked on a seeded random probe."""
    captured = {}

    def register(handles):
        module = model.get_submodule(layer)
        handles.append(module.register_forward_hook(lambda m, a, out: captured.setdefault("map", out)))

    output = probe_forward(model, input_size, register, seed=0)
    maps = captured.get("map")
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or not isinstance(maps, torch.Tensor) \
            or maps.dim() != 4 or maps.shape[1] != output.shape[1]:
        return False
    pooled = maps.mean(dim=(2, 3))
    return bool(torch.allclose(output, pooled, rtol=POOLED_TOLERANCE, atol=POOLED_TOLERANCE))


def embedding_model_for(loaded: LoadedModel, catalog: Optional[LayerCatalog] = None):
    """The :class:`EmbeddingModel` of an ``embed`` spec and its route (``"pooled"`` or ``"jacobian"``).

    ``embedding: pooled`` — the embedding is ``GAP(A)`` of ``feature_layer`` (FAM is exact and
    gradient-free; the model's own head is ignored); ``output`` — the model's output is the
    embedding and FAM takes the Jacobian route through whatever lies between ``A`` and it; ``auto`` —
    pooled when the output equals ``GAP(A)`` on a probe, else output."""

    spec = loaded.spec
    if spec.source in BUNDLED_SOURCES and spec.feature_layer is None and spec.embedding in ("auto", "pooled"):
        # the bundled EfficientNet-Lites: the pooled map of extract_features (after the head's BN + ReLU6)
        return EmbeddingModel.from_classifier(loaded.module, normalize=spec.normalize), "pooled"
    catalog = catalog or LayerCatalog.trace(loaded.module, loaded.profile.input_size)
    layer = spec.feature_layer or profile_with_layers(loaded.profile, catalog).default_layer
    layer = catalog.resolve(layer)
    catalog.feature_map(layer)
    mode = spec.embedding
    if mode == "auto":
        mode = "pooled" if embedding_is_pooled(loaded.module, layer, loaded.profile.input_size) else "output"
    if mode == "pooled":
        return EmbeddingModel.from_classifier(loaded.module, feature_layer=layer, normalize=spec.normalize), "pooled"
    return EmbeddingModel.from_embedding_model(loaded.module, layer, normalize=spec.normalize), "jacobian"
