"""The contract every CAM-family method follows (torch-cam's ``_CAM`` idea).

The explainer runs the forward and the backward passes; a method only turns what was captured into
a map. Most methods override :meth:`CamMethod.weights` and inherit the combination
``map = ReLU(Σ_k w_k · A_k)``; a method whose weights are spatial (shape ``(n, C, h, w)``) gets the
element-wise product instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from camserve.engine.errors import InvalidOptionError
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


def parse_bool(name: str, value: Any) -> bool:
    """Accept booleans and their usual query-string spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidOptionError(f"option {name!r} must be a boolean, got {value!r}")


class CamMethod:
    """A class activation map method. Subclasses set the flags and override :meth:`weights`."""

    name = "cam_method"
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
