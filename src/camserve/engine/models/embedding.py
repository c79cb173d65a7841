"""Embedding models: a CNN turned into ``images → embeddings (N, D)`` without a classifier.

Two kinds, one interface (:class:`EmbeddingModel`):

* **Wrapped backbone** — ``A = features(x)`` is the last convolutional map ``(N, C, h, w)``;
  the embedding is ``f = GAP(A) = (1/hw) Σ_ij A_kij`` (the *pooled feature*), then optionally a
  projection head ``u = P(f)`` and an L2-normalisation ``e = u / ‖u‖``. The backbone can be given
  as a callable (``model.extract_features`` for EfficientNet) or as a module path of a classifier
  whose output at that layer is captured (:meth:`EmbeddingModel.from_classifier`).
* **User embedding model** — its ``forward`` already returns embeddings; the feature map of a named
  layer is captured with :class:`~camserve.engine.capture.ForwardCapture` during the same forward
  (:meth:`EmbeddingModel.from_embedding_model`). What lies between that map and the embedding is
  unknown, so FAM explains it through the Jacobian route.

``pooled_route`` is true when the embedding is the pooled map itself (no projection, not a user
model): then FAM needs no gradient at all.

The bundled default, :func:`load_effnet_lite0_embedding`, is the pretrained EfficientNet-Lite0
without its classifier: ``A = ReLU6(BN(conv_head(blocks(stem(x)))))`` (1280 × 7 × 7 at 224²), D = 1280.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine.capture import ForwardCapture
from camserve.engine.errors import NotAFeatureMapError, UnknownLayerError
from camserve.engine.models.bundled import load_effnet_lite0

NORM_EPS = 1e-12


@dataclass
class EmbeddingTrace:
    """Everything FAM needs from one forward over a batch.

    ``maps`` A ``(N, C, h, w)``; ``pooled`` f = GAP(A) ``(N, C)``; ``raw`` u (embedding before
    L2-normalisation, ``(N, D)``); ``embedding`` e ``(N, D)``. With ``grad=True`` the tensors after
    ``maps`` are in an autograd graph rooted at ``maps`` (``maps.requires_grad``), so a gradient
    with respect to A can be taken; with ``grad=False`` nothing is recorded.
    """

    maps: torch.Tensor
    pooled: torch.Tensor
    raw: torch.Tensor
    embedding: torch.Tensor


class EmbeddingModel(nn.Module):
    """``forward(images) → embeddings (N, D)``; ``features(images) → (N, C, h, w)``.

    Build with :meth:`from_classifier`, :meth:`from_embedding_model` or directly with a
    ``feature_fn`` (a callable returning the last conv map, e.g. ``effnet.extract_features``).
    ``backbone`` is registered as a submodule so ``.to(device)``/``.eval()`` reach it.
    """

    def __init__(self, backbone: nn.Module, feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 feature_layer: Optional[str] = None, normalize: bool = True,
                 projection: Optional[nn.Module] = None, output_is_embedding: bool = False):
        super().__init__()
        if feature_fn is None and feature_layer is None:
            raise ValueError("give feature_fn (a callable returning the conv map) or feature_layer (a module path)")
        if feature_layer is not None and feature_layer not in dict(backbone.named_modules()):
            raise UnknownLayerError(f"layer {feature_layer!r} is not a module of the backbone")
        if output_is_embedding and feature_layer is None:
            raise ValueError("a user embedding model needs feature_layer (the conv map to explain)")
        if output_is_embedding and projection is not None:
            raise ValueError("a user embedding model already returns embeddings: no projection head")
        self.backbone = backbone.eval()
        self.feature_fn = feature_fn
        #: the same map from an optimised runtime (:mod:`camserve.engine.runtime.embedding_features`), set
        #: once at load; ``features`` uses it, a capture of the backbone's own layers needs ``eager=True``
        self.fast_features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.feature_layer = feature_layer
        self.normalize = normalize
        self.projection = projection
        self.output_is_embedding = output_is_embedding
        for module in self.backbone.modules():  # captured maps must not be overwritten in place
            if getattr(module, "inplace", False) is True:
                module.inplace = False

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_classifier(cls, classifier: nn.Module, feature_layer: Optional[str] = None, normalize: bool = True,
                        projection: Optional[nn.Module] = None) -> "EmbeddingModel":
        """A classifier without its classifier: the pooled map of ``feature_layer`` (module path).

        Without ``feature_layer`` the classifier must have ``extract_features`` (EfficientNet).
        With a layer name the classifier's forward runs and the layer's output is captured (the
        logits are discarded; the head costs one small matrix product)."""
        if feature_layer is None:
            if not hasattr(classifier, "extract_features"):
                raise ValueError("name the feature_layer: this classifier has no extract_features()")
            return cls(classifier, feature_fn=classifier.extract_features, normalize=normalize, projection=projection)
        return cls(classifier, feature_layer=feature_layer, normalize=normalize, projection=projection)

    @classmethod
    def from_embedding_model(cls, model: nn.Module, feature_layer: str, normalize: bool = False) -> "EmbeddingModel":
        """A model whose forward returns embeddings; ``feature_layer`` names the conv map to explain.
        ``normalize`` adds an L2-normalisation after the model's output (leave it off if the model
        normalises itself)."""
        return cls(model, feature_layer=feature_layer, normalize=normalize, output_is_embedding=True)

    # -- properties -----------------------------------------------------------------------------
    @property
    def pooled_route(self) -> bool:
        """True when the embedding is (the L2-normalised) GAP of the map: FAM is gradient-free."""
        return self.projection is None and not self.output_is_embedding

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- computation ----------------------------------------------------------------------------
    def _captured_forward(self, images: torch.Tensor):
        """Run the backbone with the feature layer captured: ``(map, output)``."""
        with ForwardCapture(self.backbone, [self.feature_layer]) as capture:
            output = self.backbone(images)
        maps = capture.activations.get(self.feature_layer)
        if maps is None:
            raise NotAFeatureMapError(f"layer {self.feature_layer!r} did not run in the forward")
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
            raise NotAFeatureMapError(f"layer {self.feature_layer!r} does not output a (N, C, H, W) map")
        return maps, output

    def features(self, images: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """The feature map ``A`` ``(N, C, h, w)`` whose pooled form the embedding is built from (from
        ``fast_features`` when set, unless ``eager``: the backbone's own modules run)."""
        if self.fast_features is not None and not eager:
            return self.fast_features(images)
        if self.feature_fn is not None:
            return self.feature_fn(images)
        return self._captured_forward(images)[0]

    def head(self, maps: torch.Tensor):
        """``f = GAP(A)``; ``u = P(f)`` (or ``f``); ``e = u/‖u‖`` (if normalising). Returns ``(f, u, e)``."""
        pooled = maps.mean(dim=(2, 3))
        raw = self.projection(pooled) if self.projection is not None else pooled
        return pooled, raw, self._normalise(raw)

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return F.normalize(raw, dim=-1, eps=NORM_EPS) if self.normalize else raw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, D)``."""
        return self.trace(images, grad=False).embedding

    def trace(self, images: torch.Tensor, grad: bool = False) -> EmbeddingTrace:
        """One forward returning map, pooled feature, raw and final embedding.

        ``grad=False``: run under ``torch.no_grad`` (no graph). ``grad=True``: for a wrapped backbone
        the backbone still runs without a graph and only the head ``A → f → u → e`` is recorded
        (gradients w.r.t. A never need the backbone); a user model runs fully with a graph."""
        if not grad:
            with torch.no_grad():
                return self._trace(images)
        if self.output_is_embedding:
            with torch.enable_grad():
                return self._trace(images)
        with torch.no_grad():
            maps = self.features(images)
        maps = maps.detach().requires_grad_(True)
        with torch.enable_grad():
            pooled, raw, embedding = self.head(maps)
        return EmbeddingTrace(maps, pooled, raw, embedding)

    def _trace(self, images: torch.Tensor, eager: bool = False) -> EmbeddingTrace:
        if self.output_is_embedding:
            maps, output = self._captured_forward(images)
            if output.dim() != 2:
                raise NotAFeatureMapError(f"the embedding model must return (N, D) embeddings, got {tuple(output.shape)}")
            return EmbeddingTrace(maps, maps.mean(dim=(2, 3)), output, self._normalise(output))
        maps = self.features(images, eager=eager)
        pooled, raw, embedding = self.head(maps)
        return EmbeddingTrace(maps, pooled, raw, embedding)


def projection_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """A two-layer projection head without biases, ``u = W₂ ReLU(W₁ f)``: positively homogeneous in
    ``f`` (``u(λf) = λ u(f)`` for λ > 0), so FAM's Jacobian contributions ``c = f ⊙ ∂s̃/∂f`` sum to the
    linearised similarity ``s̃`` exactly (Euler's identity). Trained by
    :mod:`camserve.lab.train_contrastive_head`."""
    return nn.Sequential(nn.Linear(in_features, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, out_features, bias=False))


def load_effnet_lite0_embedding(normalize: bool = True, projection: Optional[nn.Module] = None,
                                device: Optional[torch.device] = None, backbone: Optional[nn.Module] = None
                                ) -> EmbeddingModel:
    """The bundled default: pretrained EfficientNet-Lite0 without its classifier, D = 1280.

    ``backbone`` reuses an already loaded EfficientNet-Lite0 (weights are shared, not copied)."""

    model = backbone if backbone is not None else load_effnet_lite0(device=device)
    embedding = EmbeddingModel.from_classifier(model, normalize=normalize, projection=projection)
    return embedding.to(device) if device is not None else embedding
