"""FAM — Feature Activation Maps for embedding models (Liao, Gao, Zhang, 2023), batched, on the device.

An embedding model has no class score: its decision is a similarity ``s(q, r)`` between the query's
embedding and a reference's. FAM splits ``s`` into per-channel contributions ``c_k`` of the last
convolutional map ``A`` and draws ``map = ReLU(Σ_k w_k A_k)`` with ``w = c / max_k |c_k|`` (sign
kept), min-max normalised to [0, 1] and upsampled bilinearly. The same weights applied to the
reference's map explain the reference: both heatmaps come out of one call.

Contributions, with ``q = GAP(A_q)``, ``r = GAP(A_r)`` the embeddings (L2-normalised or not):

* ``dot``:       ``c_k = q_k r_k``                      (Σ_k c_k = q·r exactly)
* ``cosine``:    ``c_k = q_k r_k / (‖q‖ ‖r‖)``           (Σ_k c_k = cos(q, r) exactly)
* ``euclidean``: similarity ``−‖q − r‖²``; ``c_k = 2 q_k r_k − r_k²``, the reference-dependent
  part (Σ_k c_k = similarity + ‖q‖²; ``−‖q‖²`` is the same for every reference).

Routes (recorded in ``FamExplanation.route`` and ``.method``):

* ``"pooled"`` / method ``"fam"`` — the embedding is the pooled map: the formulas above, under
  ``torch.no_grad`` — **no backward pass, no autograd graph**.
* ``"jacobian"`` / method ``"fam-jacobian"`` — a projection head (or a user model whose forward
  returns embeddings) sits between pooling and the similarity: ``c_k = f_k · ∂s̃/∂f_k`` at the
  pooled feature ``f = GAP(A_q)`` (computed as ``f_k · Σ_ij ∂s̃/∂A_kij``, one backward through the
  part after A). ``s̃`` is the similarity linearised in the query: the reference side and the
  L2 norms are held constant (``s̃ = ẽ_q·r`` for dot, ``ẽ_q·r/(‖ẽ_q‖‖r‖)`` for cosine,
  ``2 ẽ_q·r`` for euclidean, where ``ẽ_q = u_q/‖u_q‖`` with ‖u_q‖ detached), so that for a linear
  bias-free head Σ c_k = s exactly (differentiating through a normalisation would make the sum 0).
  The reference map uses the query's weights.
* ``"gradient"`` / method ``"gradcam_similarity"`` — the baseline of pytorch-grad-cam's
  similarity tutorial: Grad-CAM on the full similarity ``s``: ``α_k = mean_ij ∂s/∂A_kij``,
  ``map = ReLU(Σ α_k A_k)``; for a reference image its own Grad-CAM from the same backward;
  ``contributions`` then holds the Grad-CAM weights ``α`` (which do not sum to ``s``).
* ``"relevance"`` / method ``"fam-relevance"`` — ``FamSpec(layer=…)`` names a layer **below** the
  last map (a module path of the backbone or a stage alias ``stage1`` …, resolved by the
  classifier's :class:`~camserve.engine.core.layers.LayerCatalog`): the contributions ``c`` above
  (pooled or Jacobian) become the relevance at the pooled feature and are propagated to the layer
  with the LRP rules Shallow-CAM uses, then combined with the layer's activations as Shallow-CAM
  combines them (:mod:`camserve.engine.methods.similarity.layers`). One relevance backward per
  match rank serves every such request of the call, queries and reference images together.
  ``layer`` naming the last map itself (``stageN``, the embedding's feature layer, or a BN/activation
  of it with the same shape) is FAM as above, with ``layer`` recorded. Attention models: 400.

Channel weights (``FamSpec(weights=…)``, the FAM family; formulas in
:mod:`~camserve.engine.methods.similarity.channel_weights`, recorded in ``FamExplanation.weights``):
``auto`` (today's FAM: ``product`` on the pooled route, ``jacobian`` otherwise); ``product`` (the
decomposition above); ``sfam`` (SFAM's contribution importance scores as read here: the cosine lost
when channel k is removed, or ``(1/D)‖q − r‖² − (q_k − r_k)²`` for euclidean); ``neighbour`` (the
contributions averaged over the query's ``neighbours = k`` (default 5) nearest gallery items of the
label their ``exp(cos/0.07)`` vote elects — on the Jacobian route, against their mean reference,
which is the same average since ``s̃`` is linear in the reference); ``jacobian`` (``c = f ⊙ ∂s̃/∂f``,
one backward, any model; on pooled features equal to ``product`` for dot and cosine). ``product``
and ``sfam`` need a model whose embedding is the pooled map. Below the last map the chosen weights
are the relevance seeded at the pooled feature (``relevance["embedding"]`` = their sum over the
channels alive in the query). Few-shot episodes (SimpleShot prototypes, each shot's map):
:mod:`~camserve.engine.methods.similarity.prototypes`.

Public API (everything a handler or a benchmark needs)::

    from camserve.engine.models.embedding import load_effnet_lite0_embedding
    from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
    from camserve.engine.methods.similarity.gallery import Gallery

    model = load_effnet_lite0_embedding(normalize=True)          # D = 1280, pooled route
    gallery = Gallery.load("gallery.npz")                        # or Gallery.build(model, images, labels)
    fam = FamExplainer(model, gallery)
    result = fam.explain(batch, [FamSpec(reference_image=ref),   # (3, H, W), same size as batch
                                 FamSpec(reference_embedding=[...1280 floats...], similarity="dot"),
                                 FamSpec(gallery_topk=3),
                                 FamSpec(reference_image=ref, method="gradcam_similarity"),
                                 None])                          # embedding only
    result.embeddings            # (N, D) from the one forward
    item = result.items[0]       # FamExplanation or None
    item.similarity, item.contributions, item.query_map, item.reference_map, item.route, item.matches
    shallow = fam.explain(batch[:1], [FamSpec(reference_image=ref, layer="stage2")]).items[0]
    shallow.layer, shallow.layer_shape, shallow.relevance   # '_blocks.2', (56, 56), {'embedding', 'layer'}

``FamExplainer.embed(images)`` is the plain embedding (``torch.inference_mode``), the cost baseline.
One forward runs over the queries and all reference images together; a gallery request adds no
forward (its maps come from ``Gallery.feature_maps``); gradient routes add one backward per match
rank (1 for image/embedding references, k for ``gallery_topk = k``) through the layers after A only.
A request with a layer below the last map makes that one forward record from the shallowest such
layer (under a :class:`~camserve.engine.capture.ForwardCapture` with the LRP rules above it) and adds
one relevance backward per match rank (plus one Jacobian backward per rank on a non-pooled model).
Errors are :class:`~camserve.engine.errors.ExplanationInputError` subclasses (HTTP 400):
``InvalidReferenceError`` (reference missing/ambiguous, wrong length, NaN/inf, empty or missing
gallery, k < 1 or k > gallery size, reference image of the wrong shape), ``InvalidInputError`` (the
query batch or spec count), ``InvalidOptionError`` (unknown similarity or route),
``UnknownMethodError`` (unknown method); for ``layer``: ``UnknownLayerError`` (unknown path or stage),
``NotAFeatureMapError`` (no map), ``InvalidOptionError`` (a layer above the last map, an empty name,
``gradcam_similarity`` or a forced route below the last map), ``UnsupportedModelError`` (relevance
through attention or a token layer); for ``weights``/``neighbours``: ``InvalidOptionError`` (unknown
weights; weights with ``gradcam_similarity``; ``product``/``sfam`` on a model with a projection head
or a user embedding model, or with route ``jacobian``; ``jacobian`` with route ``pooled``;
``neighbours`` without weights ``neighbour``, not an integer, or < 1), ``InvalidReferenceError``
(neighbour weights with no or an empty gallery, ``neighbours`` > gallery size).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from camserve.engine.models.embedding import EmbeddingModel, EmbeddingTrace
from camserve.engine.errors import InvalidInputError, InvalidOptionError, InvalidReferenceError, UnknownMethodError
from camserve.engine.core.explanation import check_images
from camserve.engine.methods.similarity.channel_weights import (WEIGHTINGS, jacobian_weights, neighbour_reference,
                                                                neighbour_weights, product_weights, select_neighbours,
                                                                sfam_weights)
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.methods.similarity.layers import LayerRoutes, LazyRoutes, combine, contribution_seed
from camserve.engine.imaging.render import prepare_maps, upsample
from camserve.engine.timing import clock

SIMILARITIES = ("cosine", "dot", "euclidean")


class SimilarityMethod:
    """A similarity explanation as a registered :class:`~camserve.engine.methods.registry.Method`
    (family ``similarity``, task ``embed``): ``fam`` (FAM's per-channel contributions, pooled or
    Jacobian route) or ``gradcam_similarity`` (Grad-CAM on the similarity). Planned by
    :class:`FamExplainer`, whose :class:`FamSpec` carries the options."""

    family = "similarity"
    task = "embed"
    coupled_options: Tuple[Tuple[str, ...], ...] = ()

    def __init__(self, name: str):
        self.name = name

    def accepted_options(self, given=None) -> set:
        return {"similarity", "route", "weights", "neighbours"}


FAM, GRADCAM_SIMILARITY = SimilarityMethod("fam"), SimilarityMethod("gradcam_similarity")
METHODS = (FAM.name, GRADCAM_SIMILARITY.name)
ROUTES = ("auto", "pooled", "jacobian")
EPS = 1e-12
DEFAULT_NEIGHBOURS = 5


@dataclass
class FamSpec:
    """One request: exactly one of ``reference_image`` (normalised ``(3, H, W)`` tensor),
    ``reference_embedding`` (``D`` floats) or ``gallery_topk`` (k best gallery matches);
    ``similarity`` in ``cosine|dot|euclidean``; ``method`` in ``fam|gradcam_similarity``;
    ``route`` ``auto`` (pooled when the model allows it) or forced ``pooled``/``jacobian`` (FAM only);
    ``layer`` (optional, FAM only): a module path of the backbone or a stage alias ``stage1`` … —
    the last map (the one the embedding pools; ``None``) is FAM as above, a layer below it gets the
    relevance route (:mod:`camserve.engine.methods.similarity.layers`: route ``"relevance"``,
    method ``"fam-relevance"``).

    ``weights`` (FAM only): the channel weights of the FAM family
    (:mod:`camserve.engine.methods.similarity.channel_weights`) — ``auto`` (``product`` on the pooled
    route, ``jacobian`` otherwise: today's FAM), ``product``, ``sfam`` (both need a model whose
    embedding is the pooled map), ``neighbour`` (the product or Jacobian contributions averaged over the
    query's ``neighbours`` nearest gallery items of the label their vote elects; needs a labelled
    gallery; ``neighbours`` defaults to 5) or ``jacobian`` (``f ⊙ ∂s̃/∂f``, one backward, any model).
    At a layer below the last map the chosen weights are the relevance seeded at the pooled feature."""

    reference_image: Optional[torch.Tensor] = None
    reference_embedding: Any = None
    gallery_topk: Optional[int] = None
    similarity: str = "cosine"
    method: str = "fam"
    route: str = "auto"
    layer: Optional[str] = None
    weights: str = "auto"
    neighbours: Optional[int] = None


@dataclass
class FamExplanation:
    """The explanation of one query: for a gallery request, the fields describe the best match and
    ``matches`` lists all k (``{index, label, similarity, query_map, reference_map, query_map_layer,
    reference_map_layer}``). ``query_map``/``reference_map`` are at the output size;
    ``query_map_layer``/``reference_map_layer`` the same maps at the map's own resolution
    (``layer_shape``), normalised before upsampling (what ``format=array`` answers).

    ``layer``: the module path the map is at (``None`` when the request named no layer: the last
    map); ``layer_shape``: the map's ``(h, w)`` before upsampling. ``relevance`` (relevance route
    only): ``{"embedding": Σ_k f_k g_k, "layer": Σ_kij R^l_kij}`` of the query — the relevance
    seeded at the embedding (``Σ_k c_k`` up to the channels dead in the query) and how much of it
    reached the layer; for a gallery request, of the best match. ``weights``: the channel weighting
    used (``product|sfam|neighbour|jacobian``; ``gradcam`` for the baseline); ``neighbours``
    (neighbour weights only): ``{"indices": [...], "label": ...}`` of the gallery items averaged."""

    similarity: float
    contributions: torch.Tensor
    query_map: torch.Tensor
    reference_map: Optional[torch.Tensor]
    route: str
    method: str
    metric: str
    reference: str
    matches: Optional[List[Dict[str, Any]]]
    seconds: float
    passes: Dict[str, int]
    batch_seconds: float = 0.0  # the whole batched call; ``seconds`` is this query's share of it
    layer: Optional[str] = None
    layer_shape: Optional[Tuple[int, int]] = None
    relevance: Optional[Dict[str, float]] = None
    weights: str = "product"
    neighbours: Optional[Dict[str, Any]] = None
    query_map_layer: Optional[torch.Tensor] = None
    reference_map_layer: Optional[torch.Tensor] = None


@dataclass
class FamResult:
    """``embeddings (N, D)`` of the queries, from the one forward, and per query its explanation."""

    embeddings: torch.Tensor
    items: List[Optional[FamExplanation]]
    forward_seconds: float = 0.0


@dataclass
class _Plan:
    index: int
    kind: str                       # "image" | "embedding" | "gallery"
    similarity: str
    method: str
    route: str                      # "pooled" | "jacobian" | "gradient" | "relevance"
    layer: Optional[str] = None     # the resolved module path a request named (None: no layer)
    weights: str = "product"        # "product" | "sfam" | "neighbour" | "jacobian" | "gradcam"
    k_neighbours: int = 0
    neighbour_ids: List[int] = field(default_factory=list)
    neighbour_label: Optional[str] = None
    reference: Optional[torch.Tensor] = None   # image (3,H,W) or embedding (D,)
    k: int = 1
    row: int = -1                   # batch row of a reference image
    # filled after the forward: one entry per match rank
    ref_embeddings: List[torch.Tensor] = field(default_factory=list)
    ref_maps: List[Optional[torch.Tensor]] = field(default_factory=list)
    ref_ids: List[Tuple[int, Optional[str]]] = field(default_factory=list)
    relevance: List[Dict[str, float]] = field(default_factory=list)  # relevance route: per match rank


def similarity_scores(query: torch.Tensor, references: torch.Tensor, kind: str) -> torch.Tensor:
    """``s(q, r_m)`` for ``q (D,)`` against ``references (M, D)``: cosine, dot or ``−‖q − r‖²``."""
    if kind == "dot":
        return references @ query
    if kind == "cosine":
        return (references @ query) / (query.norm() * references.norm(dim=-1)).clamp_min(EPS)
    return -((references - query) ** 2).sum(dim=-1)


def contributions(query: torch.Tensor, reference: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-channel ``c_k``: ``q_k r_k`` (dot), ``q_k r_k/(‖q‖‖r‖)`` (cosine), ``2 q_k r_k − r_k²`` (euclidean)
    (:func:`~camserve.engine.methods.similarity.channel_weights.product_weights`)."""
    return product_weights(query, reference, kind)


def _reported_similarity(query: torch.Tensor, reference: torch.Tensor, kind: str) -> float:
    """The similarity of one pair, accumulated in float64 (the float32 dot of 1280 terms drifts by ~1e-7·|s|)."""
    return float(similarity_scores(query.double(), reference.double()[None], kind)[0])


def weighted_map(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``ReLU(Σ_k w_k A_k)`` for ``weights (C,)`` and ``maps (C, h, w)``."""
    return torch.relu(torch.einsum("c,chw->hw", weights.float(), maps.float()))


def normalised_weights(c: torch.Tensor) -> torch.Tensor:
    """``w = c / max_k |c_k|`` (sign kept)."""
    return c / c.abs().max().clamp_min(EPS)


class FamExplainer:
    """FAM and the Grad-CAM-on-similarity baseline for an :class:`EmbeddingModel`.

    Holds no per-request state: safe to share between threads. ``gallery`` (optional) serves
    ``gallery_topk`` requests; it is moved to the model's device once here. ``composite``,
    ``canonizer`` and ``stages`` apply to requests that name a layer below the last map (the LRP
    rules and stage aliases, as for the classifier's :class:`~camserve.engine.pipeline.Explainer`;
    the catalog and rules are built on the first such request)."""

    def __init__(self, embedding_model: EmbeddingModel, gallery: Optional[Gallery] = None,
                 input_size: Tuple[int, int] = (224, 224), composite=None, canonizer: Optional[str] = None,
                 stages: Optional[Sequence[str]] = None):
        self.model = embedding_model.eval()
        self.input_size = tuple(input_size)
        self._routes = LazyRoutes(lambda: LayerRoutes(self.model, self.input_size, composite, canonizer, stages))
        with torch.no_grad():
            probe = self.model.trace(torch.zeros(1, 3, *input_size, device=self.device))
        self.dim = int(probe.embedding.shape[-1])
        self.channels = int(probe.maps.shape[1])
        if gallery is not None and len(gallery) and gallery.dim != self.dim:
            raise InvalidReferenceError(f"gallery embeddings have {gallery.dim} dimensions, the model gives {self.dim}")
        if gallery is not None and gallery.feature_maps is not None and len(gallery) \
                and gallery.feature_maps.shape[1] != self.channels:
            raise InvalidReferenceError(f"gallery feature maps have {gallery.feature_maps.shape[1]} channels, "
                                        f"the model's map has {self.channels}")
        self.gallery = gallery.to(self.device) if gallery is not None else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- public API ---------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Plain embeddings ``(N, D)`` under ``torch.inference_mode`` (the cost baseline)."""
        check_images(images)
        with torch.inference_mode():
            return self.model(images)

    @property
    def layers(self) -> LayerRoutes:
        """The backbone's layer catalog and LRP rules (built on first use)."""
        return self._routes.get()

    def resolve_layer(self, name: str):
        """A layer a request may name (module path or stage alias) → its resolved
        :class:`~camserve.engine.methods.similarity.layers.ResolvedLayer`; raises the 400 a request gets."""
        return self.layers.resolve(name)

    def explain(self, images: torch.Tensor, specs: Sequence[Optional[FamSpec]],
                output_size: Optional[Tuple[int, int]] = None) -> FamResult:
        """Embeddings of ``images (N, 3, H, W)`` and, where ``specs[i]`` is not ``None``, its FAM.

        Maps are ``(H, W)`` (or ``output_size``) in [0, 1] on the model's device."""
        check_images(images)
        if len(specs) != images.shape[0]:
            raise InvalidInputError(f"got {len(specs)} FAM specs for a batch of {images.shape[0]} images")
        plans = [self._plan(i, spec, images) for i, spec in enumerate(specs) if spec is not None]
        start = clock(images.device)
        n = images.shape[0]
        ref_rows = [p for p in plans if p.kind == "image"]
        for offset, plan in enumerate(ref_rows):
            plan.row = n + offset
        batch = torch.cat([images] + [p.reference[None].to(images) for p in ref_rows]) if ref_rows else images
        layered = [p for p in plans if p.route == "relevance"]
        with ExitStack() as stack:
            if layered:
                capture, trace = self._captured_trace(stack, batch, plans, layered)
            else:
                capture, trace = None, self.model.trace(batch, grad=any(p.route != "pooled" for p in plans))
            forward_seconds = clock(images.device) - start
            items, embeddings, seconds = self._explain_traced(images, batch, plans, layered, capture, trace,
                                                              output_size, start, forward_seconds)
        return FamResult(embeddings[:n], items, forward_seconds)

    def _captured_trace(self, stack: ExitStack, batch: torch.Tensor, plans: List[_Plan], layered: List[_Plan]):
        """The one forward of a call with relevance-route plans: the backbone under a capture of their
        layers with the LRP rules above the shallowest (autograd records from there on)."""
        names = list(dict.fromkeys(p.layer for p in layered))
        # ordinary gradients cross the backbone's switches only for a user model's Jacobian weights
        gradient_passes = self.model.output_is_embedding and any(p.route != "pooled" for p in plans)
        capture = stack.enter_context(self.layers.capture(self.model.backbone, names, gradient_passes))
        stack.enter_context(torch.enable_grad())
        with torch.no_grad():  # the capture switches grad on at the shallowest layer; the backbone's own
            trace = self.model._trace(batch, eager=True)  # modules run (not a runtime's compiled copy)
        return capture, trace

    def _explain_traced(self, images, batch, plans, layered, capture, trace, output_size, start, forward_seconds):
        n = images.shape[0]
        embeddings = trace.embedding.detach()
        maps = trace.maps.detach()
        size = tuple(output_size) if output_size is not None else tuple(images.shape[-2:])

        items: List[Optional[FamExplanation]] = [None] * n
        raw: Dict[int, List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float]]] = {}
        with torch.no_grad():
            for plan in plans:
                self._resolve_references(plan, embeddings, maps)
        passes = {p.index: {"forward": 1, "backward": 0} for p in plans}
        for plan in layered:
            passes[plan.index]["relevance"] = 0
        with torch.no_grad():
            for plan in (p for p in plans if p.route == "pooled"):
                raw[plan.index] = [self._pooled_pair(plan, m, embeddings, maps) for m in range(len(plan.ref_ids))]
        gradient_plans = [p for p in plans if p.route in ("jacobian", "gradient")]
        if gradient_plans:
            raw.update(self._gradient_pairs(gradient_plans, trace, embeddings, maps, passes, keep_graph=bool(layered)))
        if layered:
            raw.update(self._relevance_pairs(layered, trace, capture, embeddings, passes))

        seconds = clock(images.device) - start
        rows = batch.shape[0]
        pair_share = (seconds - forward_seconds) / max(1, len(plans))  # the pairs' work, split over the plans
        for plan in plans:
            pairs = raw[plan.index]
            layer_q = prepare_maps(torch.stack([q for _, q, _, _ in pairs]), None)  # normalised, (h, w) of A
            stacked_q = upsample(layer_q, size)
            ref_present = [r is not None for _, _, r, _ in pairs]
            layer_r = (prepare_maps(torch.stack([r for _, _, r, _ in pairs if r is not None]), None)
                       if any(ref_present) else None)
            stacked_r = upsample(layer_r, size) if layer_r is not None else None
            ref_maps, ref_layer_maps, cursor = [], [], 0
            for present in ref_present:
                ref_maps.append(stacked_r[cursor] if present else None)
                ref_layer_maps.append(layer_r[cursor] if present else None)
                cursor += int(present)
            matches = None
            if plan.kind == "gallery":
                matches = [{"index": idx, "label": label, "similarity": sim, "query_map": stacked_q[m],
                            "reference_map": ref_maps[m], "query_map_layer": layer_q[m],
                            "reference_map_layer": ref_layer_maps[m]}
                           for m, ((idx, label), (_, _, _, sim)) in enumerate(zip(plan.ref_ids, pairs))]
            method = {"pooled": "fam", "jacobian": "fam-jacobian", "gradient": "gradcam_similarity",
                      "relevance": "fam-relevance"}[plan.route]
            items[plan.index] = FamExplanation(
                similarity=pairs[0][3], contributions=pairs[0][0], query_map=stacked_q[0], reference_map=ref_maps[0],
                query_map_layer=layer_q[0], reference_map_layer=ref_layer_maps[0],
                route=plan.route, method=method, metric=plan.similarity, reference=plan.kind, matches=matches,
                seconds=forward_seconds * (1 + (plan.kind == "image")) / rows + pair_share,
                passes=passes[plan.index], batch_seconds=seconds, layer=plan.layer,
                layer_shape=tuple(pairs[0][1].shape[-2:]),
                relevance=plan.relevance[0] if plan.relevance else None, weights=plan.weights,
                neighbours=({"indices": list(plan.neighbour_ids), "label": plan.neighbour_label}
                            if plan.weights == "neighbour" else None))
        return items, embeddings, seconds

    # -- planning -----------------------------------------------------------------------------
    def _plan(self, index: int, spec: FamSpec, images: torch.Tensor) -> _Plan:
        if not isinstance(spec, FamSpec):
            raise InvalidInputError(f"spec {index} must be a FamSpec or None, got {type(spec).__name__}")
        if spec.similarity not in SIMILARITIES:
            raise InvalidOptionError(f"unknown similarity {spec.similarity!r}; choose one of {list(SIMILARITIES)}")
        if spec.method not in METHODS:
            raise UnknownMethodError(f"unknown FAM method {spec.method!r}; choose one of {list(METHODS)}")
        if spec.route not in ROUTES:
            raise InvalidOptionError(f"unknown FAM route {spec.route!r}; choose one of {list(ROUTES)}")
        given = [name for name, value in (("reference_image", spec.reference_image),
                                          ("reference_embedding", spec.reference_embedding),
                                          ("gallery_topk", spec.gallery_topk)) if value is not None]
        if not given:
            raise InvalidReferenceError(f"request {index}: no reference given (reference_image, "
                                        "reference_embedding or gallery_topk)")
        if len(given) > 1:
            raise InvalidReferenceError(f"request {index}: give exactly one reference, got {given}")
        weights, k_neighbours = self._check_weights(index, spec)
        route = self._route(spec, weights)
        if weights == "auto":
            weights = {"pooled": "product", "jacobian": "jacobian", "gradient": "gradcam"}[route]
        layer = None
        if spec.layer is not None:
            if not isinstance(spec.layer, str) or not spec.layer.strip():
                raise InvalidOptionError(f"request {index}: layer must be a module path or a stage alias, "
                                         f"got {spec.layer!r}")
            resolved = self.resolve_layer(spec.layer)
            layer = resolved.path
            if not resolved.last:
                if route == "gradient":
                    raise InvalidOptionError(f"request {index}: gradcam_similarity is served at the last map only; "
                                             f"layer {layer!r} lies below it (use method 'fam')")
                if spec.route != "auto":
                    raise InvalidOptionError(f"request {index}: route {spec.route!r} is the last map's; a layer below "
                                             f"it ({layer!r}) takes the relevance route (leave route 'auto')")
                route = "relevance"
        plan = _Plan(index, "", spec.similarity, spec.method, route, layer=layer, weights=weights,
                     k_neighbours=k_neighbours)
        if spec.reference_image is not None:
            plan.kind, plan.reference = "image", self._check_image(index, spec.reference_image, images)
        elif spec.reference_embedding is not None:
            plan.kind, plan.reference = "embedding", self._check_embedding(index, spec.reference_embedding)
        else:
            plan.kind, plan.k = "gallery", self._check_topk(index, spec.gallery_topk)
        return plan

    def _route(self, spec: FamSpec, weights: str) -> str:
        if spec.method == "gradcam_similarity":
            return "gradient"
        if spec.route == "pooled" and not self.model.pooled_route:
            raise InvalidOptionError("the pooled route needs an embedding that is the pooled map itself "
                                     "(this model has a projection head or is a user embedding model)")
        if weights == "jacobian":
            if spec.route == "pooled":
                raise InvalidOptionError("weights 'jacobian' take the jacobian route (one backward); "
                                         "leave route 'auto' or ask for weights 'product'")
            return "jacobian"
        if spec.route == "auto":
            return "pooled" if self.model.pooled_route else "jacobian"
        return spec.route

    def _check_weights(self, index: int, spec: FamSpec) -> Tuple[str, int]:
        """The channel weighting a request asks for and its neighbour count (0 unless ``neighbour``)."""
        weights = spec.weights
        if not isinstance(weights, str) or weights not in WEIGHTINGS:
            raise InvalidOptionError(f"request {index}: unknown FAM weights {weights!r}; choose one of {list(WEIGHTINGS)}")
        if spec.method == "gradcam_similarity" and weights != "auto":
            raise InvalidOptionError(f"request {index}: weights {weights!r} are FAM's; gradcam_similarity has its "
                                     "own (the mean gradient of the similarity) — leave weights 'auto'")
        if weights in ("product", "sfam"):
            if not self.model.pooled_route:
                raise InvalidOptionError(f"request {index}: weights {weights!r} decompose a similarity of pooled maps; "
                                         "this model has a projection head or is a user embedding model "
                                         "(use weights 'jacobian', 'neighbour' or 'auto')")
            if spec.route == "jacobian":
                raise InvalidOptionError(f"request {index}: weights {weights!r} are computed on the pooled route; "
                                         "route 'jacobian' computes weights 'jacobian'")
        if weights != "neighbour":
            if spec.neighbours is not None:
                raise InvalidOptionError(f"request {index}: neighbours applies to weights 'neighbour' only, "
                                         f"got weights {weights!r}")
            return weights, 0
        k = DEFAULT_NEIGHBOURS if spec.neighbours is None else spec.neighbours
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidOptionError(f"request {index}: neighbours must be an integer, got {k!r}")
        if k < 1:
            raise InvalidOptionError(f"request {index}: neighbours must be ≥ 1, got {k}")
        if self.gallery is None or len(self.gallery) == 0:
            raise InvalidReferenceError(f"request {index}: neighbour weights average over the query's nearest "
                                        "labelled gallery items, but the gallery is empty")
        if k > len(self.gallery):
            raise InvalidReferenceError(f"request {index}: neighbours = {k} exceeds the gallery size {len(self.gallery)}")
        return weights, k

    def _check_image(self, index: int, image, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise InvalidReferenceError(f"request {index}: reference_image must be a tensor")
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or tuple(image.shape) != tuple(images.shape[1:]):
            raise InvalidReferenceError(f"request {index}: reference image must have shape {tuple(images.shape[1:])} "
                                        f"like the queries, got {tuple(image.shape)}")
        if not image.is_floating_point() or not torch.isfinite(image).all():
            raise InvalidReferenceError(f"request {index}: reference image must be finite floats")
        return image

    def _check_embedding(self, index: int, value) -> torch.Tensor:
        try:
            vector = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidReferenceError(f"request {index}: reference embedding is not a list of numbers ({error})") from None
        if vector.dim() != 1 or vector.shape[0] != self.dim:
            raise InvalidReferenceError(f"request {index}: reference embedding must have {self.dim} values, "
                                        f"got shape {tuple(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise InvalidReferenceError(f"request {index}: reference embedding contains NaN or infinite values")
        return vector

    def _check_topk(self, index: int, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidReferenceError(f"request {index}: gallery_topk must be an integer, got {k!r}")
        if self.gallery is None or len(self.gallery) == 0:
            raise InvalidReferenceError(f"request {index}: gallery_topk needs a gallery, but the gallery is empty")
        if k < 1:
            raise InvalidReferenceError(f"request {index}: gallery_topk must be ≥ 1, got {k}")
        if k > len(self.gallery):
            raise InvalidReferenceError(f"request {index}: gallery_topk = {k} exceeds the gallery size {len(self.gallery)}")
        return k

    # -- pairs --------------------------------------------------------------------------------
    def _resolve_references(self, plan: _Plan, embeddings: torch.Tensor, maps: torch.Tensor) -> None:
        """Fill the plan's per-rank reference embeddings, reference maps (or None) and ids."""
        if plan.kind == "image":
            plan.ref_embeddings, plan.ref_maps, plan.ref_ids = [embeddings[plan.row]], [maps[plan.row]], [(0, None)]
        elif plan.kind == "embedding":
            plan.ref_embeddings, plan.ref_maps, plan.ref_ids = [plan.reference], [None], [(0, None)]
        else:
            scores = similarity_scores(embeddings[plan.index], self.gallery.embeddings, plan.similarity)
            top = torch.topk(scores, plan.k).indices.tolist()
            plan.ref_embeddings = [self.gallery.embeddings[i] for i in top]
            fmaps = self.gallery.feature_maps
            plan.ref_maps = [fmaps[i] if fmaps is not None else None for i in top]
            plan.ref_ids = [(i, self.gallery.labels[i]) for i in top]
        if plan.weights == "neighbour":
            plan.neighbour_ids, plan.neighbour_label = select_neighbours(
                embeddings[plan.index], self.gallery.embeddings, self.gallery.labels, plan.k_neighbours)

    def _pooled_weights(self, plan: _Plan, rank: int, embeddings: torch.Tensor) -> torch.Tensor:
        """The gradient-free channel weights of a plan (product, SFAM or neighbour-averaged)."""
        query = embeddings[plan.index]
        if plan.weights == "neighbour":
            return neighbour_weights(query, self.gallery.embeddings[plan.neighbour_ids], plan.similarity)
        if plan.weights == "sfam":
            return sfam_weights(query, plan.ref_embeddings[rank], plan.similarity)
        return product_weights(query, plan.ref_embeddings[rank], plan.similarity)

    def _pooled_pair(self, plan: _Plan, rank: int, embeddings: torch.Tensor, maps: torch.Tensor):
        """Gradient-free FAM for one (query, reference) pair: ``(c, query map, reference map, s)``."""
        query, reference = embeddings[plan.index], plan.ref_embeddings[rank]
        c = self._pooled_weights(plan, rank, embeddings)
        w = normalised_weights(c)
        ref_map = plan.ref_maps[rank]
        sim = _reported_similarity(query, reference, plan.similarity)
        return (c, weighted_map(w, maps[plan.index]), weighted_map(w, ref_map) if ref_map is not None else None, sim)

    def _gradient_pairs(self, plans: List[_Plan], trace: EmbeddingTrace, embeddings: torch.Tensor,
                        maps: torch.Tensor, passes, keep_graph: bool = False):
        """Jacobian FAM and Grad-CAM-on-similarity: one backward per match rank for all such plans.
        ``keep_graph``: relevance passes follow over the same graph."""
        out: Dict[int, list] = {p.index: [] for p in plans}
        rounds = max(len(p.ref_ids) for p in plans)
        for rank in range(rounds):
            active = [p for p in plans if len(p.ref_ids) > rank]
            scalar = sum(self._differentiable_score(p, rank, trace) for p in active)
            grads = torch.autograd.grad(scalar, trace.maps, retain_graph=keep_graph or rank < rounds - 1)[0].detach()
            with torch.no_grad():
                for p in active:
                    passes[p.index]["backward"] += 1
                    q = p.index
                    reference = p.ref_embeddings[rank]
                    sim = _reported_similarity(embeddings[q], reference, p.similarity)
                    ref_map = p.ref_maps[rank]
                    if p.route == "jacobian":
                        c = jacobian_weights(trace.pooled[q].detach(), grads[q])
                        w = normalised_weights(c)
                        pair = (c, weighted_map(w, maps[q]), weighted_map(w, ref_map) if ref_map is not None else None, sim)
                    else:
                        alpha = grads[q].mean(dim=(1, 2))
                        ref = weighted_map(grads[p.row].mean(dim=(1, 2)), maps[p.row]) if p.kind == "image" else None
                        pair = (alpha, weighted_map(alpha, maps[q]), ref, sim)
                    out[q].append(pair)
        return out

    def _relevance_pairs(self, plans: List[_Plan], trace: EmbeddingTrace, capture, embeddings: torch.Tensor,
                         passes) -> Dict[int, list]:
        """The relevance route (:mod:`camserve.engine.methods.similarity.layers`), per match rank: the
        contributions ``c`` at the pooled feature (FAM's: from the embeddings on the pooled route, else
        ``c = f ⊙ ∂s̃/∂f`` from one Jacobian backward), then **one** relevance backward seeded with
        ``c / f`` at every query row and every reference-image row of the rank, read at each plan's
        layer, and Shallow-CAM's combination of that relevance with the layer's activations."""
        out: Dict[int, list] = {p.index: [] for p in plans}
        routes = self.layers
        pooled = trace.pooled.detach()
        rounds = max(len(p.ref_ids) for p in plans)
        for rank in range(rounds):
            active = [p for p in plans if len(p.ref_ids) > rank]
            last = rank == rounds - 1
            jacobian = [p for p in active if p.weights == "jacobian" or not self.model.pooled_route]
            gradient_free = [p for p in active if not (p.weights == "jacobian" or not self.model.pooled_route)]
            with torch.no_grad():
                weights = {p.index: self._pooled_weights(p, rank, embeddings) for p in gradient_free}
            if jacobian:
                scalar = sum(self._differentiable_score(p, rank, trace) for p in jacobian)
                grads = torch.autograd.grad(scalar, trace.maps, retain_graph=True)[0].detach()
                weights.update({p.index: jacobian_weights(pooled[p.index], grads[p.index]) for p in jacobian})
                for p in jacobian:
                    passes[p.index]["backward"] += 1
            with torch.no_grad():
                seed = torch.zeros_like(pooled)
                for p in active:
                    c = weights[p.index].to(pooled.dtype)
                    seed[p.index] = contribution_seed(c, pooled[p.index])
                    if p.kind == "image":
                        seed[p.row] = contribution_seed(c, pooled[p.row])
            names = list(dict.fromkeys(p.layer for p in active))
            capture.mode = "relevance"
            capture.release_graph = last
            try:
                found = torch.autograd.grad(trace.pooled, [capture.activations[n] for n in names], seed,
                                            retain_graph=not last, allow_unused=True)
            finally:
                capture.mode = "gradient"
                capture.release_graph = False
            with torch.no_grad():
                relevance_grads = {n: (g if g is not None else torch.zeros_like(capture.activations[n]))
                                   for n, g in zip(names, found)}
                for p in active:
                    passes[p.index]["relevance"] += 1
                    rows = [p.index] + ([p.row] if p.kind == "image" else [])
                    activations = routes.as_map(p.layer, capture.activations[p.layer].detach()[rows])
                    gradients = routes.as_map(p.layer, relevance_grads[p.layer][rows])
                    cams = combine(activations, gradients)
                    p.relevance.append({"embedding": float((pooled[p.index].double() * seed[p.index].double()).sum()),
                                        "layer": float((activations[0].double() * gradients[0].double()).sum())})
                    sim = _reported_similarity(embeddings[p.index], p.ref_embeddings[rank], p.similarity)
                    out[p.index].append((weights[p.index], cams[0], cams[1] if len(rows) > 1 else None, sim))
        return out

    def _differentiable_score(self, plan: _Plan, rank: int, trace: EmbeddingTrace) -> torch.Tensor:
        """The scalar whose gradient w.r.t. A gives the channel weights of this plan and rank.

        Jacobian: ``s̃`` linear in the query with reference and norms held constant (see module
        docstring). Baseline: the full similarity ``s`` (reference image in the graph)."""
        q = plan.index
        if plan.route == "gradient":
            query = trace.embedding[q]
            reference = trace.embedding[plan.row] if plan.kind == "image" else plan.ref_embeddings[rank]
            return similarity_scores(query, reference[None].float(), plan.similarity)[0]
        raw = trace.raw[q]
        query = raw / raw.detach().norm().clamp_min(EPS) if self.model.normalize else raw
        if plan.weights == "neighbour":  # s̃ is linear in the reference: the neighbours' mean reference
            reference = neighbour_reference(self.gallery.embeddings[plan.neighbour_ids], plan.similarity).float()
            scale = {"dot": 1.0, "cosine": 1.0 / float(query.detach().norm().clamp_min(EPS)), "euclidean": 2.0}
            return (query @ reference) * scale[plan.similarity]
        reference = plan.ref_embeddings[rank].detach().float()
        if plan.similarity == "dot":
            return query @ reference
        if plan.similarity == "cosine":
            return (query @ reference) / (query.detach().norm() * reference.norm()).clamp_min(EPS)
        return 2 * (query @ reference)
