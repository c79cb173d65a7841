"""Similarity maps at any layer of an embedding model: FAM's contributions carried down by LRP.

At the map the embedding pools (the *last map*) FAM is what :mod:`.fam` computes. Below it, the
per-channel contributions ``c_k`` of the similarity (FAM's, at the pooled feature ``f = GAP(A)``:
``Σ_k c_k = s`` for cosine and dot) become the initial relevance at the embedding and are
propagated to the requested layer ``l`` with the LRP rules Shallow-CAM uses (the explainer's
composite, default z⁺ for convolutions, ε for linear layers, pass for BatchNorm and activations,
LRP-0 for the average pooling and residual sums), through the switches of a
:class:`~camserve.engine.capture.ForwardCapture` hooked above ``l`` — the classifier's relevance
machinery, seeded at ``f`` instead of at the logits:

    g_f = c / stab(f)          (so R_f = f ⊙ g_f = c: the relevance at the embedding)
    g^l = ∂_LRP f / ∂A^l ᵀ g_f  (one relevance backward; R^l = A^l ⊙ g^l)

(an L2-normalisation after ``f`` is a positive per-row scale and passes relevance unchanged; a
projection head or a user model's layers above the map are crossed by FAM's Jacobian
contributions ``c = f ⊙ ∂s̃/∂f``, as at the last map). The map at ``l`` is then combined the way
Shallow-CAM combines it (its defaults ``beta=signed, spatial=relevance``):

    map_l = ReLU(Σ_k β_k · ReLU(g^l_k) ⊙ A^l_k),  β_k = Σ_ij R^l_kij / max_k |Σ_ij R^l_kij|

The reference image's map is the same with the same ``c`` seeded at its own ``f_r``
(``g_{f_r} = c / f_r``); both sides' rows are seeded in the same relevance backward (one per
match rank). Attention (token) models answer :class:`UnsupportedModelError` (400): LRP has no
rules for attention, as for the classifier's relevance methods.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Sequence, Tuple

import torch
from torch import nn

from camserve.engine.capture import ForwardCapture
from camserve.engine.core.layers import LayerCatalog
from camserve.engine.core.lean_gradient import trace_conv_geometries
from camserve.engine.errors import InvalidOptionError, UnsupportedModelError
from camserve.engine.lrp.canonizers import CANONIZERS
from camserve.engine.lrp.composites import Composite, epsilon_plus
from camserve.engine.lrp.rules import Rule, stabilize

SEED_EPS = 1e-12
BETA_EPS = 1e-12  # ShallowCAM.eps


@dataclass(frozen=True)
class ResolvedLayer:
    """A requested layer: its module path, whether FAM itself serves it (the last map), and its
    ``(h, w)`` in the traced input size."""

    path: str
    last: bool
    shape: Tuple[int, int]


class LayerRoutes:
    """The layer catalog, LRP rules and probe facts of an embedding model's backbone, built once
    (lazily, by :class:`~camserve.engine.methods.similarity.fam.FamExplainer`) and read-only
    afterwards: safe to share between threads."""

    def __init__(self, embedding_model, input_size: Tuple[int, int], composite: Optional[Composite] = None,
                 canonizer: Optional[str] = None, stages: Optional[Sequence[str]] = None):
        backbone: nn.Module = embedding_model.backbone
        self.input_size = tuple(input_size)
        self.catalog = LayerCatalog.trace(backbone, self.input_size).with_stages(stages)
        self.composite = composite or epsilon_plus()
        rules = self.composite.assign(backbone.named_modules())
        if canonizer is not None:
            if canonizer not in CANONIZERS:
                raise ValueError(f"unknown canonizer {canonizer!r}; choose one of {sorted(CANONIZERS)}")
            rules = CANONIZERS[canonizer](backbone, rules, self.input_size)
        self.rules: Dict[str, Rule] = rules
        overwritten: set = set()
        self.conv_geometry, _ = trace_conv_geometries(backbone, self.input_size, overwritten)
        self.overwritten: FrozenSet[str] = frozenset(overwritten)
        self.last = embedding_model.feature_layer or self.catalog.default_layer()
        with torch.no_grad():
            probe = embedding_model.trace(torch.zeros(1, 3, *self.input_size, device=embedding_model.device))
        self.map_shape = tuple(probe.maps.shape[1:])

    def resolve(self, name: str) -> ResolvedLayer:
        """Module path or stage alias → :class:`ResolvedLayer`; 400s for an unknown layer, a layer
        that is no feature map, one above the map the embedding pools, or a relevance route
        through attention."""
        catalog = self.catalog
        path = catalog.resolve(name)
        info = catalog.feature_map(path)
        if info.layout == "tokens":
            raise UnsupportedModelError(
                f"FAM at layer {path!r} propagates LRP relevance from the embedding down to the layer, and LRP has no "
                f"rules for attention or token mixing; {path!r} is a token sequence ({info.output_shape[0]} tokens) "
                f"of a transformer — ask for FAM at the last map (no layer) instead")
        shape = tuple(info.map_shape[1:]) if info.map_shape else tuple(info.output_shape[1:])
        last = catalog.get(self.last) if self.last in catalog.layers else None
        if last is None or path == self.last or (info.exited >= last.exited and tuple(info.map_shape or ())
                                                  == tuple(self.map_shape)):
            return ResolvedLayer(path, True, tuple(self.map_shape[1:]))
        if info.exited > last.exited:
            raise InvalidOptionError(
                f"layer {path!r} runs after {self.last!r}, the map the embedding pools; FAM explains that map "
                f"(no layer) or a layer below it")
        attention = catalog.attention_above(path)
        if attention is not None:
            raise UnsupportedModelError(
                f"FAM at layer {path!r} propagates LRP relevance from the embedding down to the layer, and LRP has no "
                f"rules for attention; the pass crosses {attention!r} ({catalog.get(attention).type_name}) — ask "
                f"for FAM at the last map (no layer) instead")
        return ResolvedLayer(path, False, shape)

    def rules_above(self, layers: Sequence[str]) -> Dict[str, Rule]:
        """The rules of the modules that run after the shallowest of ``layers`` is left (as the
        classifier's :meth:`Explainer._rules_above <camserve.engine.pipeline.Explainer._rules_above>`)."""
        floor = min(self.catalog.get(name).exited for name in layers)
        return {name: rule for name, rule in self.rules.items()
                if name in self.catalog.layers and self.catalog.layers[name].exited > floor}

    def capture(self, backbone: nn.Module, layers: Sequence[str], gradient_passes: bool) -> ForwardCapture:
        """A capture of ``layers`` with the rules above the shallowest, recording from it only."""
        floor = min(layers, key=lambda name: self.catalog.get(name).exited)
        return ForwardCapture(backbone, layers, self.rules_above(layers), grad_from=floor,
                              gradient_passes=gradient_passes, conv_geometry=self.conv_geometry,
                              overwritten=self.overwritten, relevance_passes=True)

    def as_map(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.catalog.as_map(name, tensor)


def contribution_seed(contributions: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``g_f = c / stab(f)``: the gradient at the pooled feature whose relevance ``f ⊙ g_f`` is ``c``
    (exactly, where ``f_k ≠ 0``; a channel dead in the image carries none)."""
    return contributions / stabilize(pooled, SEED_EPS)


def combine(activations: torch.Tensor, relevance_gradients: torch.Tensor) -> torch.Tensor:
    """Shallow-CAM's combination at its defaults (``beta=signed, beta_from=layer, spatial=relevance``;
    :class:`~camserve.engine.methods.lrp.shallowcam.ShallowCAM`, the same operations in the same order —
    the method families stay independent, so it is restated here and tested equal):
    ``ReLU(Σ_k β_k ReLU(g_k) A_k)``, ``β_k = Σ_ij R_kij / max_k |Σ_ij R_kij|``, ``R = A ⊙ g``;
    ``(n, C, h, w)`` → ``(n, h, w)``."""
    beta = (activations * relevance_gradients).sum(dim=(2, 3))
    beta = beta / beta.abs().amax(dim=1, keepdim=True).clamp_min(BETA_EPS)
    spatial = torch.relu(relevance_gradients)
    return torch.relu(spatial.mul_(beta[:, :, None, None]).mul_(activations).sum(dim=1))


class LazyRoutes:
    """Builds :class:`LayerRoutes` on first use (one probe set per explainer), under a lock."""

    def __init__(self, factory):
        self._factory = factory
        self._value: Optional[LayerRoutes] = None
        self._lock = threading.Lock()

    def get(self) -> LayerRoutes:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
        return self._value
