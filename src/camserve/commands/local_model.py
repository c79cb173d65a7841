"""A model spec loaded in this process for the evaluation and bench CLIs.

:func:`load_local_model` turns the model-spec flags (:mod:`.model_args`) into a :class:`LocalModel`:
the module in eval mode on the device, its profile with the stages and default layer (hand-written
for the bundled EfficientNet-Lite0, else discovered by one probe forward), the layer catalog, and
the name the reports give it. :meth:`LocalModel.resolve_layers` reads user layer lists (module
paths or stage aliases), :meth:`LocalModel.embedding` the embedding FAM explains.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from camserve.engine.errors import ExplanationInputError
from camserve.engine.core.layers import LayerCatalog
from camserve.engine.models import LoadedModel, ModelProfile, ModelSpec, embedding_model_for, profile_with_layers
from camserve.commands.model_args import load_for_cli, spec_from_args
from camserve.engine.models.embedding import EmbeddingModel
from camserve.engine.models.spec import BUNDLED_SOURCES
from camserve.engine.models import ModelSourceError, WeightsError


@dataclass
class LocalModel:
    spec: ModelSpec
    module: nn.Module
    profile: ModelProfile  # with stages and default layer
    catalog: LayerCatalog  # with the profile's stages

    @property
    def bundled(self) -> bool:
        return self.spec.source in BUNDLED_SOURCES

    @property
    def name(self) -> str:
        """``efficientnet-lite0``, ``torchvision resnet18``, ``eager CifarResNet(depth=20)``, …"""
        spec = self.spec
        if self.bundled:
            return self.profile.name
        what = spec.arch or spec.class_name or (spec.path and str(spec.path).rstrip("/").rsplit("/", 1)[-1]) \
            or type(self.module).__name__
        args = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in dict(spec.kwargs).items())
        return f"{spec.source} {what}" + (f"({args})" if args else "")

    @property
    def stage_aliases(self) -> Dict[str, str]:
        """``{"stage1": module path, …}``."""
        return {f"stage{i + 1}": name for i, name in enumerate(self.profile.stages)}

    def meta(self) -> Dict[str, Any]:
        """What a report records of the model: name, spec, input, preprocessing, stages."""
        return {"model": self.name, "spec": self.spec.to_mapping(), "input_size": list(self.profile.input_size),
                "preprocess": self.profile.preprocessing(), "stages": self.stage_aliases}

    def resolve_layers(self, names: Sequence[str], flag: str = "--layers") -> List[str]:
        """Module paths of ``names`` (module paths or stage aliases), each a feature map; exits with
        ``flag`` and the engine's message (valid layers, stages) on an unknown one."""
        resolved = []
        for name in names:
            try:
                path = self.catalog.resolve(name)
                self.catalog.feature_map(path)
            except ExplanationInputError as error:
                raise SystemExit(f"{flag}: {error}") from None
            resolved.append(path)
        return list(dict.fromkeys(resolved))

    def embedding(self) -> Tuple[nn.Module, str]:
        """``(EmbeddingModel, route)``: an ``embed`` spec's embedding (:func:`embedding_model_for`); for
        a classifier the pooled map of its default layer (EfficientNet-Lite0: its ``extract_features``)."""

        if self.spec.task == "embed":
            try:
                return embedding_model_for(LoadedModel(self.spec, self.module, self.profile), self.catalog)
            except ExplanationInputError as error:
                raise SystemExit(f"--feature-layer: {error}") from None
        if self.bundled:
            return EmbeddingModel.from_classifier(self.module, normalize=True), "pooled"
        return EmbeddingModel.from_classifier(self.module, feature_layer=self.profile.default_layer), "pooled"


def load_local_model(args: argparse.Namespace, device: torch.device, task_default: str = "classify",
                     channels_last: bool = False) -> LocalModel:
    """The model the spec flags describe (default: the bundled EfficientNet-Lite0), ready to explain;
    a spec that cannot be built exits with why."""

    spec, _config = spec_from_args(args, task_default=task_default)
    try:
        loaded = load_for_cli(spec, device)
    except (ModelSourceError, WeightsError, OSError) as error:
        raise SystemExit(f"model spec: {error}") from None
    module = loaded.module.eval()
    if channels_last:  # ~1.1-1.5× faster convolutions on CPU; 4-D weights only
        module = module.to(memory_format=torch.channels_last)
    catalog = LayerCatalog.trace(module, loaded.profile.input_size)
    try:
        catalog = catalog.with_stages(loaded.profile.stages)
    except ExplanationInputError as error:
        raise SystemExit(f"model profile: {error}") from None
    profile = profile_with_layers(loaded.profile, catalog)
    if not profile.default_layer:
        raise SystemExit(f"{spec.source}: the model has no layer with a (C, H, W) feature map output")
    return LocalModel(spec, module, profile, catalog)
