"""Captum attributions through camserve's batched interface, as normalised maps with their costs.

``attribute(forward, images, targets, "captum.integrated_gradients", options)`` runs one Captum
algorithm over a whole batch (one target per row) and returns :class:`CaptumOutput`: the raw Captum
attribution, the ``(n, H, W)`` maps in [0, 1] (the channel ``reduction`` of
:mod:`camserve.engine.methods.captum.catalog`, then :func:`render.prepare_maps` — normalised at the
attribution's own resolution and bilinearly upsampled, exactly as the CAM methods), the seconds,
and the model passes Captum made.

**Isolation.** Captum installs hooks and attributes on modules (LayerLRP sets ``module.rule`` on every
leaf, GuidedBackprop hooks every ``nn.ReLU``, layer methods hook their layer). To keep that away
from other requests on the same model, each call runs on a *shadow* of the model: a copy of the
module tree that shares every parameter and buffer (no weight is copied) and starts with no hooks.
Whatever Captum attaches lives and dies with that shadow.

**Passes.** Counted, not derived: a forward pre-hook on the shadow's root counts Captum's forward
calls (``forward``; one per batched call, whatever its size) and the rows they evaluated
(``evaluations``: rows per explained image, e.g. ``steps`` for IG, ``nt_samples × …`` under a noise
tunnel); a tensor hook registered on each gradient-carrying root output counts the backward passes
that reach it (``backward``). For LayerLRP those
backwards are reported as ``relevance`` passes (they run through Captum's LRP rules).

**Embedding models.** :func:`similarity_forward` wraps an embedding model into a classifier-like
forward whose "logit" ``j`` is the similarity of the row's embedding to reference ``j``; the target
of a row is the index of its reference.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine.core.plan import PlannedRow
from camserve.engine.methods.captum.catalog import (DEFAULT_LIMITS, CaptumLimits, CaptumMethod, accepted_options,
                                                  display_name, resolve)
from camserve.engine.core.explanation import ExplainSpec, Explanation
from camserve.engine.errors import InvalidOptionError, InvalidReferenceError, UnknownLayerError, UnsupportedModelError
from camserve.engine.imaging.render import prepare_maps
from camserve.engine.core.targets import resolve_targets, validate_target
from camserve.engine.timing import clock



# -- shadows and pass counting ------------------------------------------------------------------
def shadow_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree sharing its parameters and buffers, with no hooks.

    ``deepcopy`` with a memo pre-filled so that every parameter and buffer maps to itself and every
    hook dictionary maps to a fresh empty one (a hook another thread holds on ``model`` is neither
    copied nor triggered).
    """
    memo: Dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
    for module in model.modules():
        for key, value in vars(module).items():
            if "hook" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def count_passes(root: nn.Module):
    """Count forward calls of ``root``, the rows they evaluated, and backward passes reaching its
    outputs: yields a dict ``{"forward": n, "rows": r, "backward": m}`` that fills while the block runs."""
    counts = {"forward": 0, "rows": 0, "backward": 0}

    def before(module, args):
        counts["forward"] += 1
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            counts["rows"] += int(args[0].shape[0])

    def on_grad(grad):
        counts["backward"] += 1

    def after(module, args, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(on_grad)
                break

    handles = [root.register_forward_pre_hook(before), root.register_forward_hook(after)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """``seed ≥ 0``: run the block on a forked RNG seeded with ``seed`` (the caller's RNG state is
    restored after); ``seed = -1``: the current RNG stream, untouched."""
    if seed < 0:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- layers and model support ---------------------------------------------------------------------
def find_layer(forward: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` in ``forward`` (or in its wrapped ``embedding_model``)."""
    modules = dict(forward.named_modules())
    for candidate in (name, f"embedding_model.{name}"):
        if candidate in modules and candidate:
            return modules[candidate]
    raise UnknownLayerError(f"layer {name!r} is not a module of the model")


def check_lrp_support(model: nn.Module) -> None:
    """Captum's LayerLRP only knows rules for some leaf module types (and ignores functional ops).

    Raises :class:`UnsupportedModelError` naming the leaf types it has no rule for — e.g. the
    ``ReLU6``, ``ZeroPad2d`` and ``Identity`` of EfficientNet-Lite. VGG-style models pass. Note that a
    model with functional residual additions (ResNet) passes this check but Captum then treats the
    addition as invisible (see Captum's ``Addition_Module``).
    """
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS

    known = set(SUPPORTED_LAYERS_WITH_RULES) | set(SUPPORTED_NON_LINEAR_LAYERS)
    missing = sorted({type(m).__name__ for m in model.modules()
                      if not list(m.children()) and type(m) not in known and not hasattr(m, "rule")})
    if missing:
        raise UnsupportedModelError(
            f"captum.layer_lrp cannot explain this model: Captum's LayerLRP has no rule for module type(s) "
            f"{missing} (it supports {sorted(t.__name__ for t in known)}, e.g. VGG-style models)")


# -- one Captum call ------------------------------------------------------------------------------
def reduce_channels(attribution: torch.Tensor, reduction: Optional[str]) -> torch.Tensor:
    """``(n, C, h, w)`` → ``(n, h, w)``: ``abs`` Σ_c|a_c|, ``positive`` max(Σ_c a_c, 0), ``sum`` Σ_c a_c;
    ``None`` for a one-channel attribution (LayerGradCam) just drops the channel."""
    if reduction is None:
        return attribution.sum(dim=1)
    if reduction == "abs":
        return attribution.abs().sum(dim=1)
    if reduction == "positive":
        return attribution.sum(dim=1).clamp(min=0)
    return attribution.sum(dim=1)


def build(method: CaptumMethod, forward: nn.Module, layer: Optional[nn.Module], options: Mapping[str, Any]):
    """The Captum algorithm object (wrapped in a NoiseTunnel when smoothing) and its ``attribute`` kwargs."""
    from captum.attr import (GuidedGradCam, IntegratedGradients, LayerGradCam, LayerLRP, NoiseTunnel, Saliency)

    if method.name == "integrated_gradients":
        algorithm = IntegratedGradients(forward)
        kwargs = dict(n_steps=options["steps"], method=options["integration"],
                      internal_batch_size=options["internal_batch_size"])
    elif method.name == "saliency":
        algorithm, kwargs = Saliency(forward), dict(abs=False)
    elif method.name == "guided_gradcam":
        algorithm, kwargs = GuidedGradCam(forward, layer), dict(interpolate_mode=options["interpolate_mode"])
    elif method.name == "layer_gradcam":
        algorithm, kwargs = LayerGradCam(forward, layer), dict(relu_attributions=options["relu_attributions"])
    elif method.name == "layer_lrp":
        algorithm, kwargs = LayerLRP(forward, layer), {}
    else:  # pragma: no cover - the registry holds only the names above
        raise InvalidOptionError(f"no Captum algorithm for {method.name!r}")
    if options.get("smooth"):
        batch = options["nt_samples_batch_size"] or None
        kwargs = dict(kwargs, nt_type=options["nt_type"], nt_samples=options["nt_samples"],
                      stdevs=options["stdevs"], nt_samples_batch_size=batch)
        algorithm = NoiseTunnel(algorithm)
    return algorithm, kwargs


@dataclass
class CaptumOutput:
    """One Captum call over ``n`` rows: ``raw`` as Captum returned it, ``maps`` ``(n, H, W)`` in [0, 1]."""

    raw: torch.Tensor
    maps: torch.Tensor
    layer_shape: Tuple[int, int]
    seconds: float
    passes: Dict[str, int]


def attribute(forward: nn.Module, images: torch.Tensor, targets, name: str,
              options: Optional[Mapping[str, Any]] = None, layer: Optional[str] = None,
              output_size: Optional[Sequence[int]] = None, layer_resolution: bool = False,
              dtype: torch.dtype = torch.float32, limits: CaptumLimits = DEFAULT_LIMITS,
              validated: Optional[Tuple[CaptumMethod, Dict[str, Any]]] = None) -> CaptumOutput:
    """Run the Captum method ``name`` on ``images`` ``(n, C, H, W)`` for ``targets`` (an int, a list
    or a ``(n,)`` tensor of output indices; ``None`` for a scalar-per-row forward).

    ``layer`` is required by the layer methods. Maps come at ``output_size`` (default: the input's
    size), or at the attribution's own resolution with ``layer_resolution``.
    """
    method, options = validated or resolve(name, options, limits)
    if method.uses_layer and not layer:
        raise UnknownLayerError(f"{method.request_name} needs a layer")
    if method.name == "layer_lrp":
        check_lrp_support(forward)
    start = clock(images.device)
    shadow = shadow_copy(forward)
    layer_module = find_layer(shadow, layer) if method.uses_layer else None
    algorithm, kwargs = build(method, shadow, layer_module, options)
    if isinstance(targets, torch.Tensor):
        targets = targets.to(images.device)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.detach().clone().requires_grad_()
        with count_passes(shadow) as counts, seeded(options.get("seed", -1), images.device):
            raw = algorithm.attribute(inputs, target=targets, **kwargs)
    raw = raw.detach()
    with torch.no_grad():
        reduced = reduce_channels(raw, options.get("reduction"))
        layer_shape = tuple(reduced.shape[-2:])
        size = None if layer_resolution else tuple(output_size or images.shape[-2:])
        maps = prepare_maps(reduced, size, dtype)
    passes = {"forward": counts["forward"], "backward": 0, "relevance": 0,
              "evaluations": round(counts["rows"] / images.shape[0], 3)}
    passes["relevance" if method.relevance else "backward"] = counts["backward"]
    return CaptumOutput(raw, maps, layer_shape, clock(images.device) - start, passes)


# -- embedding models -----------------------------------------------------------------------------
SIMILARITIES = ("cosine", "dot", "neg_l2")


class SimilarityForward(nn.Module):
    """``f(x)[n, j] = sim(E(x_n), r_j)`` for references ``r`` ``(R, D)``: a classifier-shaped forward
    whose target ``j`` attributes the similarity to reference ``j``. ``sim``: ``cosine``
    (``⟨e, r⟩ / (‖e‖‖r‖)``), ``dot`` (``⟨e, r⟩``) or ``neg_l2`` (``−‖e − r‖``)."""

    def __init__(self, embedding_model: nn.Module, reference_embeddings: torch.Tensor, similarity: str = "cosine"):
        super().__init__()
        self.embedding_model = embedding_model
        self.register_buffer("references", reference_embeddings.detach(), persistent=False)
        self.similarity = similarity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding_model(x).flatten(1)
        references = self.references.to(embedding.dtype)
        if self.similarity == "cosine":
            return F.normalize(embedding, dim=1) @ F.normalize(references, dim=1).T
        if self.similarity == "dot":
            return embedding @ references.T
        return -torch.cdist(embedding, references)


def similarity_forward(embedding_model: nn.Module, reference_embeddings: torch.Tensor,
                       similarity: str = "cosine") -> SimilarityForward:
    """Wrap an embedding model for Captum: output ``(N, R)`` similarities to ``R`` references
    (a ``(D,)`` reference is one reference). Attribute row ``n`` with ``target = j`` (its reference's
    index; ``0`` for a single reference) — e.g. ``attribute(similarity_forward(m, refs), images,
    torch.arange(n), "captum.integrated_gradients")`` for per-row references."""
    if not isinstance(reference_embeddings, torch.Tensor) or not reference_embeddings.is_floating_point():
        raise InvalidReferenceError("reference embeddings must be a floating-point tensor")
    references = reference_embeddings.reshape(1, -1) if reference_embeddings.dim() == 1 \
        else reference_embeddings.flatten(1)
    if references.shape[0] == 0 or not torch.isfinite(references).all():
        raise InvalidReferenceError("reference embeddings must be non-empty and finite")
    if similarity not in SIMILARITIES:
        raise InvalidOptionError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
    return SimilarityForward(embedding_model, references, similarity)


# -- the pipeline's Captum rows ---------------------------------------------------------------------
class CaptumAttribution:
    """A Captum attribution as a registered :class:`~camserve.engine.methods.registry.Method`
    (family ``captum``): request name ``captum.<name>`` (``captum.noise_tunnel`` included), options
    validated by :func:`~camserve.engine.methods.captum.catalog.resolve` within the explainer's
    :class:`CaptumLimits`, planned as a row with forwards of its own."""

    family = "captum"
    task = "classify"
    coupled_options: Tuple[Tuple[str, ...], ...] = ()

    def __init__(self, name: str):
        self.name = name

    def accepted_options(self, given: Optional[Mapping[str, Any]] = None) -> set:
        return accepted_options(self.name, given)

    def resolve(self, given: Optional[Mapping[str, Any]], limits: CaptumLimits = DEFAULT_LIMITS
                ) -> Tuple[CaptumMethod, Dict[str, Any]]:
        """The catalog method (a noise tunnel's ``base``) and the canonical options."""
        return resolve(self.name, given, limits)

    def evaluations(self, options: Mapping[str, Any]) -> int:
        """Model evaluations per image and target: ``steps × nt_samples`` (or either, or 1)."""
        return options.get("steps", 1) * (options.get("nt_samples", 1) if options.get("smooth") else 1)

    def plan(self, index: int, spec: ExplainSpec, context: Any) -> PlannedRow:
        """Validate one Captum spec against the explainer's model before any forward: method and
        options (within ``context.captum_limits``), layer (layer methods; default: the explainer's),
        LayerLRP support, target."""
        method, options = self.resolve(spec.options, context.captum_limits)
        layer = None
        catalog = context.catalog
        if method.uses_layer:
            layer = catalog.resolve(spec.layer) if spec.layer else context.default_layer
            catalog.feature_map(layer)
            if catalog.layers[layer].layout != "nchw":
                raise UnsupportedModelError(f"captum.{method.name} reads layer {layer!r} as an (N, C, H, W) map, but it "
                                            f"outputs {catalog.layers[layer].layout} "
                                            f"{catalog.layers[layer].output_shape}; use gradcam, gradcampp or "
                                            f"layercam (which convert token/channels-last maps) or a pixel method")
        if method.name == "layer_lrp":
            check_lrp_support(context.model)
        target = validate_target(spec.target, context.num_classes, context.max_topk)
        return PlannedRow(index, method, layer, target, options, own_forwards=True)


def attribute_rows(model: nn.Module, images: torch.Tensor, rows: Sequence[PlannedRow], logits: torch.Tensor,
                   forward_share: float, output_size=None, layer_resolution: bool = False,
                   dtype: torch.dtype = torch.float32) -> Dict[int, Explanation]:
    """The explanations of the Captum ``rows`` of a batch whose shared forward gave ``logits``: their
    targets resolved from those logits, then each group of rows with the same method, layer and
    options attributed in one Captum call per target round (top-k: k rounds). ``forward_share`` is
    each row's part of the shared forward's seconds."""
    for row in rows:
        row.targets = resolve_targets(row.spec_target, logits[row.index])
    groups: Dict[Tuple, List[PlannedRow]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    explanations: Dict[int, Explanation] = {}
    for group_rows in groups.values():
        first = group_rows[0]
        maps: Dict[int, List[torch.Tensor]] = defaultdict(list)
        passes = {r.index: {"forward": 0, "backward": 0, "relevance": 0, "evaluations": 0} for r in group_rows}
        seconds = {r.index: forward_share for r in group_rows}
        shape = None
        for round_index in range(max(len(r.targets) for r in group_rows)):
            active = [r for r in group_rows if len(r.targets) > round_index]
            idx = torch.tensor([r.index for r in active], device=images.device)
            targets = torch.tensor([r.targets[round_index] for r in active], device=images.device)
            out = attribute(model, images[idx], targets, first.method.request_name,
                            layer=first.layer, output_size=output_size, layer_resolution=layer_resolution,
                            dtype=dtype, validated=(first.method, first.options))
            shape = out.layer_shape
            for r, m in zip(active, out.maps):
                maps[r.index].append(m)
                seconds[r.index] += out.seconds / len(active)  # one Captum call served ``active``
                for key, value in out.passes.items():
                    passes[r.index][key] += value
        for r in group_rows:
            explanations[r.index] = Explanation(
                display_name(r.method, r.options), r.layer or "input", r.targets, torch.stack(maps[r.index]),
                shape, dict(r.options), seconds[r.index], passes[r.index])
    return explanations
