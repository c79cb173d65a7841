"""Handler defaults from the archive's ``model-config.yaml`` (its ``handler:`` section).

Example::

    handler:
      default_method: shallowcam      # used by /explanations and by explain=1|true
      default_layer: _conv_head       # when a request names no layer and its method has no entry below
      method_layers: {shallowcam: _blocks.4}
      method_options: {shallowcam: {temperature: 4, beta_from: auto}}   # defaults a request may override
      topk: 5                         # predictions per answer (a request may ask topk=1..max_topk)
      max_topk: 20
      max_targets: 5                  # target=topK / lists: at most this many maps per image
      max_pixels: 40000000            # larger images → 413
      max_instances: 16               # images in one KServe request
      colormap: jet                   # for overlay=1 when the request names none
      gallery_topk: 3                 # embedder: matches for gallery=true (gallery=k asks for k)
      task_layers: {pair: _blocks.2}  # embedder: FAM's layer per task (pair|gallery|prototypes) when a request names none
      max_response_bytes: 33554432    # an answer larger than this is a 413 (TorchServe's max_response_size)
      overlay_alpha: 0.5
      array_decimals: 3               # format=array rounding
      graph_rows: 4                   # explain a batch in chunks of 4 images' graphs (memory; default: whole batch)
      composite: epsilon_plus         # the LRP rules of relevance passes (default epsilon_plus; see engine/lrp/composites.py)
      canonizer: fold_bn              # how relevance sees the model: fold_bn | fold_bn_nobias (default: none)
      model: {source: torchvision, arch: resnet50, num_classes: 37}   # see engine/models/spec.py
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

from camserve.engine.models.spec import ModelSpec
from camserve.serving.images import DEFAULT_MAX_PIXELS
from camserve.engine.pipeline import check_graph_rows
from camserve.engine.imaging.render import COLORMAPS
from camserve.engine.errors import ExplanationInputError
from camserve.engine import CANONIZERS, get_composite
from camserve.engine.methods import CLASSIC, REGISTRY, get_method
from camserve.engine.runtime import RUNTIME_ENV, RuntimeSettings


#: the FAM tasks of the embedding handler: a reference image or embedding, gallery matches, prototypes
FAM_TASKS = ("pair", "gallery", "prototypes")


@dataclass
class HandlerSettings:
    default_method: str = "shallowcam"
    default_layer: Optional[str] = None
    method_layers: Dict[str, str] = field(default_factory=dict)
    #: per CAM-family method, default method options for what a request does not name
    method_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    topk: int = 5
    max_topk: int = 20
    max_targets: int = 5
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_instances: int = 16
    colormap: str = "jet"
    overlay_alpha: float = 0.5
    array_decimals: int = 3
    graph_rows: Optional[int] = None  # Explainer(graph_rows=…): images whose autograd graph is alive at once
    composite: Optional[str] = None  # Explainer's LRP composite by name (None: epsilon_plus)
    canonizer: Optional[str] = None  # Explainer's canonizer by name (None: the model as it is)
    # embedding handler
    gallery_file: Optional[str] = None
    gallery_topk: int = 3
    max_gallery_topk: int = 10
    similarity: str = "cosine"
    #: per FAM task (pair, gallery, prototypes), the layer a request that names none gets (absent: the last map)
    task_layers: Dict[str, str] = field(default_factory=dict)
    # the model spec (engine/models/spec.py); absent: the bundled EfficientNet-Lite0
    model: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, model_yaml_config: Optional[Mapping[str, Any]]) -> "HandlerSettings":
        """Read ``model_yaml_config["handler"]``; unknown keys are kept in ``extra`` for extensions
        (e.g. an audit log or Captum caps) instead of being rejected."""
        section = dict((model_yaml_config or {}).get("handler") or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in section.items() if k in known}
        settings = cls(**values)
        settings.extra = {k: v for k, v in section.items() if k not in known}
        settings.check()
        return settings

    def check(self) -> None:
        """Configuration errors stop the worker from loading (the reason in the model log) instead
        of answering every request 400."""

        if str(self.colormap).lower() not in COLORMAPS:
            raise ValueError(f"handler.colormap {self.colormap!r} is not one of {list(COLORMAPS)}")
        check_graph_rows(self.graph_rows, "handler.graph_rows")
        if self.composite is not None:
            try:
                get_composite(str(self.composite))
            except ExplanationInputError as error:
                raise ValueError(f"handler.composite: {error}") from None
        if self.canonizer is not None and self.canonizer not in CANONIZERS:
            raise ValueError(f"handler.canonizer {self.canonizer!r} is not one of {sorted(CANONIZERS)}")
        if not isinstance(self.task_layers, Mapping) or set(self.task_layers) - set(FAM_TASKS) \
                or not all(isinstance(v, str) and v.strip() for v in self.task_layers.values()):
            raise ValueError(f"handler.task_layers must map FAM tasks {list(FAM_TASKS)} to layer names, "
                             f"got {self.task_layers!r}")
        if not isinstance(self.model, Mapping):
            raise ValueError(f"handler.model must be a mapping (the model spec), got {self.model!r}")
        self.method_options = check_method_options(self.method_options)

    def layer_for(self, method: str, requested: Optional[str]) -> Optional[str]:
        """The layer a request gets: its own, else the method's configured one, else the default."""
        if requested:
            return requested
        return self.method_layers.get(method) or self.default_layer


    def options_for(self, method: str, given: Mapping[str, Any]) -> Dict[str, Any]:
        """A request's method options over the archive's ``method_options`` for that method: a
        default fills an option the request does not name, except that a request naming one
        option of a coupled group (the method's ``coupled_options``, e.g. ``start`` /
        ``contrastive`` / ``temperature``) takes none of that group from the defaults."""
        defaults = self.method_options.get(method)
        if not defaults:
            return dict(given)

        named = {str(k).lower() for k in given}
        skipped = {name for group in get_method(method).coupled_options if named & set(group) for name in group}
        merged = {k: v for k, v in defaults.items() if k not in named and k not in skipped}
        merged.update(given)
        return merged


def check_method_options(section: Any) -> Dict[str, Dict[str, Any]]:
    """``handler.method_options`` checked at load: CAM-family methods only, each one's defaults
    accepted by the method (an unknown method or option, or a bad value, stops the worker)."""

    if not section:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"handler.method_options must map methods to their default options, got {section!r}")
    checked = {}
    for method, options in section.items():
        name = str(method).lower()
        classic = REGISTRY.names(family=CLASSIC)
        if name not in classic:
            raise ValueError(f"handler.method_options: {method!r} is not a CAM-family method ({classic})")
        if not isinstance(options, Mapping):
            raise ValueError(f"handler.method_options.{method} must be a mapping of options, got {options!r}")
        options = {str(k).lower(): v for k, v in options.items()}
        try:
            get_method(name).options(options)
        except ExplanationInputError as error:
            raise ValueError(f"handler.method_options.{method}: {error}") from None
        checked[name] = options
    return checked


def model_spec(settings: HandlerSettings, manifest: Optional[Mapping[str, Any]], task: str) -> ModelSpec:
    """The archive's :class:`ModelSpec` for a handler serving ``task``; ``model_file`` defaults to the
    archive's ``--model-file``. A spec for the other task is a configuration error (``ValueError``)."""
    section = dict(settings.model or {})
    model_file = ((manifest or {}).get("model") or {}).get("modelFile")
    if model_file and "model_file" not in section and section.get("source") == "eager":
        section["model_file"] = model_file
    spec = ModelSpec.from_mapping(section, task=task)
    if spec.task != task:
        raise ValueError(f"handler.model.task is {spec.task!r}, but this archive's handler serves {task!r}: "
                         f"build it with `camserve archive --task {spec.task}`")
    return spec


def runtime_settings(settings: HandlerSettings) -> RuntimeSettings:
    """The archive's ``handler.runtime`` with ``$CAMSERVE_RUNTIME``'s ``key=value`` pairs in its place:
    an operator can turn the fast path off, or pin a memory format, on one server without rebuilding
    the archive. Bad keys or values stop the worker with the reason."""
    return RuntimeSettings.from_mapping(settings.extra.get("runtime")).overridden(
        os.environ.get(RUNTIME_ENV, ""), f"${RUNTIME_ENV}")
