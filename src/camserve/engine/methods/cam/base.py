"""The contract every CAM-family method follows (torch-cam's ``_CAM`` idea).

The explainer runs the forward and the backward passes; a method only turns what was captured into
a map. Most methods override :meth:`CamMethod.weights` and inherit the combination
``map = ReLU(Σ_k w_k · A_k)``; a method whose weights are spatial (shape ``(n, C, h, w)``) gets the
element-wise product instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from camserve.engine.core.values import parse_bool
from camserve.engine.core.plan import PlannedRow
from camserve.engine.core.targets import validate_target
from camserve.engine.errors import InvalidOptionError, UnsupportedModelError
from camserve.engine.core.layers import LayerCatalog


@dataclass
class Captured:
    """What one group of rows (same method, layer and options) sees after the passes.

    ``activations[l]`` is ``A^l`` (n, C, h, w); ``gradients[l]`` is ``∂y_c/∂A^l``;
    ``relevance_gradients[l]`` is the LRP modified gradient ``g^l``, so that the relevance is
    ``R^l = A^l ⊙ g^l``; ``targets`` (n,) are the explained classes; ``logits`` (n, classes).
    Maps of token or channels-last layers arrive converted (:meth:`LayerCatalog.as_map`);
    ``catalog`` is the model's layer catalog.
    """

    activations: Dict[str, torch.Tensor]
    gradients: Dict[str, torch.Tensor] = field(default_factory=dict)
    relevance_gradients: Dict[str, torch.Tensor] = field(default_factory=dict)
    targets: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    model: Optional[nn.Module] = None
    catalog: Optional[LayerCatalog] = None

    def relevance(self, layer: str) -> torch.Tensor:
        """``R^l = A^l ⊙ g^l`` (relevance at the layer's output)."""
        return self.activations[layer] * self.relevance_gradients[layer]




def check_relevance_support(method: str, layers: Sequence[str], catalog: LayerCatalog) -> None:
    """LRP relevance passes have rules for convolutions, linear layers, pooling, BatchNorm and
    activations, none for attention or token mixing: refuse a token layer or a layer with an
    attention module above it (:class:`UnsupportedModelError`, a 400)."""
    for name in layers:
        info = catalog.get(name)
        if info.layout == "tokens":
            raise UnsupportedModelError(
                f"{method} propagates LRP relevance, which has no rules for attention or token mixing; layer "
                f"{name!r} is a token sequence ({info.output_shape[0]} tokens) of a transformer — use gradcam, "
                f"gradcampp or layercam")
        attention = catalog.attention_above(name)
        if attention is not None:
            raise UnsupportedModelError(
                f"{method} propagates LRP relevance, which has no rules for attention; the pass from the "
                f"logits down to {name!r} crosses {attention!r} ({catalog.get(attention).type_name}) — "
                f"use gradcam, gradcampp or layercam")


class CamMethod:
    """A class activation map method. Subclasses set the flags and override :meth:`weights`."""

    name = "cam_method"
    family = "cam"
    task = "classify"
    needs_gradient = False
    needs_relevance = False
    #: option name → (default, allowed values or None for bool)
    option_choices: Mapping[str, Tuple[Any, Optional[Tuple[Any, ...]]]] = {}
    #: groups of options that only make sense together (e.g. a start and its temperature): a
    #: request that names one of a group takes none of the group from a deployment's defaults
    coupled_options: Tuple[Tuple[str, ...], ...] = ()

    def options(self, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """Merge ``given`` into the defaults, coercing strings; unknown names are an error."""
        given = dict(given or {})
        unknown = set(given) - set(self.option_choices)
        if unknown:
            raise InvalidOptionError(
                f"method {self.name!r} has no option {sorted(unknown)}; it takes {sorted(self.option_choices) or 'none'}")
        result = {}
        for key, (default, choices) in self.option_choices.items():
            value = given.get(key, default)
            if choices is None:
                value = parse_bool(key, value)
            elif value not in choices:
                raise InvalidOptionError(f"option {key!r} of {self.name!r} must be one of {list(choices)}, got {value!r}")
            result[key] = value
        return result

    def accepted_options(self, given: Optional[Mapping[str, Any]] = None) -> set:
        """The option names a request for this method may carry."""
        return set(self.option_choices)

    def plan(self, index: int, spec: Any, context: Any) -> PlannedRow:
        """Validate ``spec`` against ``context`` (the explainer: catalog, default layer, model, number
        of classes, top-k cap) before any forward: options, layer or stage alias, what the method
        needs of the layer, LRP support where a relevance pass runs, target."""
        options = self.options(spec.options)
        catalog = context.catalog
        layer = catalog.resolve(spec.layer) if spec.layer else context.default_layer
        catalog.feature_map(layer)
        self.validate(layer, catalog, context.model)
        names = self.layers(layer, catalog, options)  # validates l+1 where needed
        if self.needs_relevance_for(options):
            check_relevance_support(self.name, names, catalog)
        target = validate_target(spec.target, context.num_classes, context.max_topk)
        return PlannedRow(index, self, layer, target, options, layers=tuple(names))

    def needs_gradient_for(self, options: Mapping[str, Any]) -> bool:
        """Whether an ordinary backward pass (``∂y_c/∂A``) is needed with these options."""
        return self.needs_gradient

    def needs_relevance_for(self, options: Mapping[str, Any]) -> bool:
        """Whether an LRP relevance backward pass is needed with these options."""
        return self.needs_relevance

    def layers(self, layer: str, catalog: LayerCatalog, options: Mapping[str, Any]) -> List[str]:
        """The layers whose activations this method needs (``layer`` itself by default)."""
        return [layer]

    def validate(self, layer: str, catalog: LayerCatalog, model: nn.Module) -> None:
        """Raise an :class:`ExplanationInputError` if the method cannot explain ``layer``."""

    def weights(self, layer: str, captured: Captured, options: Mapping[str, Any]) -> torch.Tensor:
        """Channel weights ``(n, C)`` or spatial weights ``(n, C, h, w)``."""
        raise NotImplementedError

    def compute(self, layer: str, captured: Captured, options: Mapping[str, Any]) -> torch.Tensor:
        """``map = ReLU(Σ_k w_k · A_k)`` at layer resolution, shape ``(n, h, w)``."""
        activations = captured.activations[layer]
        weights = self.weights(layer, captured, options)
        if weights.dim() == 2:
            weights = weights[:, :, None, None]
        return torch.relu((weights * activations).sum(dim=1))
