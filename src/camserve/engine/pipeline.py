"""The classifier explainer: predictions and explanations for a batch from one forward pass.

``Explainer.explain(images, specs)`` takes a batch ``(N, 3, H, W)`` already on the model's device
and one :class:`ExplainSpec` (or ``None`` for a plain prediction) per image. It

1. validates everything it can before touching the model (input, methods, layers, targets, options);
2. runs **one** forward inside a :class:`ForwardCapture` over the union of requested layers, with
   switches (LRP rules for relevance passes, lean gradients for gradient passes) hooked only above
   the shallowest requested layer; autograd records only above that layer;
3. per target round (top-1 needs one round; top-k needs k), runs at most one ordinary backward and
   one relevance backward over that same graph, each seeded per row;
4. lets each method compute its maps, grouped by (method, layer, options), vectorised over rows;
5. normalises each map to [0, 1] at layer resolution and upsamples it on the device.

The logits of that forward are returned with the maps, so the prediction and its explanation
always come from the same pass. The explainer holds no per-request state: it is safe to call from
several threads on one model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from camserve.engine.capture import ForwardCapture
from camserve.engine.core.explanation import ExplainResult, ExplainSpec, Explanation, check_images, model_device
from camserve.engine.core.layers import LayerCatalog
from camserve.engine.core.lean_gradient import trace_conv_geometries
from camserve.engine.core.plan import PlannedRow
from camserve.engine.core.targets import one_hot_seed, resolve_targets
from camserve.engine.errors import InvalidTargetError
from camserve.engine.imaging.render import prepare_maps
from camserve.engine.lrp.canonizers import CANONIZERS
from camserve.engine.lrp.composites import Composite, epsilon_plus, get_composite
from camserve.engine.lrp.starts import relevance_seed, start_of, temperature_of
from camserve.engine.methods import REGISTRY, Captured, Registry
from camserve.engine.methods.captum.attribute import attribute_rows
from camserve.engine.methods.captum.catalog import DEFAULT_LIMITS, CaptumLimits
from camserve.engine.runtime.fast_path import EAGER, FastPath
from camserve.engine.runtime.memory_format import format_of
from camserve.engine.timing import clock


def check_graph_rows(value, what: str = "graph_rows"):
    """``value`` if it is ``None`` or a positive integer (the chunk size of :class:`Explainer`), else a
    ``ValueError`` naming ``what``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
    return value

@dataclass
class HeadCapture:
    """What :meth:`Explainer._backward_rounds` reads of a capture, for the fast path: the runtime's map
    (a leaf that requires grad when a gradient pass follows; the head's plain autograd graph above it)."""

    activations: Dict[str, torch.Tensor]
    mode: str = "gradient"
    release_graph: bool = False


class Explainer:
    """Explanations for an image classifier, batched, in the forward that predicts.

    ``default_layer`` (a module path or a stage alias) is used when a spec names none (default:
    the catalog's, :meth:`LayerCatalog.default_layer` — the last map before pooling, or a ViT's last
    block's first norm); ``stages`` (e.g. a hand-written profile's) replace the discovered stages
    that the aliases ``stage1`` … name; ``composite`` chooses the LRP rules. A request's layer may
    be a module path or a stage alias; token (ViT) and channels-last (Swin) layers are converted to
    ``(N, C, h, w)`` maps with :meth:`LayerCatalog.as_map` before a method sees them.
    ``captum_limits`` caps the Captum baselines' work (:class:`CaptumLimits`, e.g. from the archive's
    ``handler.captum``); it is read-only after construction, like everything here.
    ``graph_rows`` bounds how many images' autograd graphs are alive at once: a larger batch is
    explained in consecutive chunks of that many rows, each image still in exactly one forward
    (memory of the graph ∝ ``graph_rows`` instead of the batch; logits and maps equal the whole
    batch's up to the float rounding of a smaller convolution batch). ``None``: the whole batch.
    ``fast_path`` (:mod:`camserve.engine.runtime.fast_path`, set with :meth:`use_fast_path`) answers the
    rows that need only its layer's map and the head on an optimised runtime, the others run here;
    inputs are given to the model in its own memory format (contiguous or channels-last).
    """

    def __init__(self, model: nn.Module, input_size: Tuple[int, int] = (224, 224),
                 default_layer: Optional[str] = None, composite: Optional[Composite] = None,
                 max_topk: int = 5, stages: Optional[Sequence[str]] = None,
                 captum_limits: Optional[CaptumLimits] = None, graph_rows: Optional[int] = None,
                 canonizer: Optional[str] = None, registry: Registry = REGISTRY):
        self.graph_rows = check_graph_rows(graph_rows)
        self.model = model.eval()
        self.captum_limits = captum_limits or DEFAULT_LIMITS
        self.input_size = tuple(input_size)
        self._disable_inplace()
        self.catalog = LayerCatalog.trace(model, self.input_size).with_stages(stages)
        maps = self.catalog.feature_map_layers()
        if not maps:
            raise ValueError("the model has no layer with a (C, H, W) feature map output")
        self.default_layer = self.catalog.resolve(default_layer) if default_layer else self.catalog.default_layer()
        self.catalog.feature_map(self.default_layer)
        self.composite = composite or epsilon_plus()
        self.registry = registry
        self._rules = self.composite.assign(model.named_modules())
        if canonizer is not None:
            if canonizer not in CANONIZERS:
                raise ValueError(f"unknown canonizer {canonizer!r}; choose one of {sorted(CANONIZERS)}")
            self._rules = CANONIZERS[canonizer](model, self._rules, self.input_size)
        self.canonizer = canonizer
        self.max_topk = max_topk
        # read-only after this: which convs' gradient the capture may compute from x and y alone
        # and whose outputs a later in-place op overwrites (their switches hand on a copy)
        overwritten: set = set()
        self._conv_geometry, probe = trace_conv_geometries(model, self.input_size, overwritten)
        self._overwritten = frozenset(overwritten)
        self.num_classes = int(probe.shape[-1])
        self.fast_path: Optional[FastPath] = None

    @property
    def _input_format(self) -> torch.memory_format:
        """The model's memory format (:func:`~camserve.engine.runtime.memory_format.format_of`): inputs are
        given in it, so a channels-last model converts nothing at its first convolution."""
        return format_of(self.model)

    def use_fast_path(self, fast_path: Optional[FastPath]) -> "Explainer":
        """Serve the rows it qualifies for from ``fast_path`` (built once at load; ``None``: none)."""
        self.fast_path = fast_path
        return self

    @classmethod
    def for_profile(cls, model: nn.Module, profile: Any, default_layer: Optional[str] = None,
                    composite: Optional[str] = None, **options: Any) -> "Explainer":
        """The explainer every door builds for a loaded model: at the profile's input size with its
        stages; default layer the given one, else the profile's, else the one the probe forward finds;
        ``composite`` a composite's name (:func:`~camserve.engine.lrp.composites.get_composite`);
        the other ``options`` as for the constructor (``max_topk``, ``captum_limits``, ``graph_rows``,
        ``canonizer``, ``registry``)."""
        return cls(model, profile.input_size, default_layer=default_layer or profile.default_layer,
                   stages=profile.stages or None, composite=get_composite(composite) if composite else None,
                   **options)

    def _disable_inplace(self) -> None:
        """In-place activations would overwrite captured tensors; switch them off (same values)."""
        for module in self.model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    # -- public API ---------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Plain inference: logits under ``torch.inference_mode``."""
        check_images(images)
        with torch.inference_mode():
            return self.model(images.contiguous(memory_format=self._input_format))

    def explain(self, images: torch.Tensor, specs: Sequence[Optional[ExplainSpec]],
                output_size: Optional[Tuple[int, int]] = None, layer_resolution: bool = False,
                dtype: torch.dtype = torch.float32) -> ExplainResult:
        """Logits and maps for a batch; ``specs[i] is None`` means prediction only for image ``i``.

        Maps are normalised to [0, 1] per map and upsampled to ``output_size`` (default: the
        input's size) unless ``layer_resolution``; they stay on the model's device.
        """
        check_images(images)
        if len(specs) != images.shape[0]:
            raise InvalidTargetError(f"got {len(specs)} explanation specs for a batch of {images.shape[0]} images")
        rows = [self._plan(i, spec) for i, spec in enumerate(specs) if spec is not None]  # all, before any forward
        if self.fast_path is not None:
            planned = {row.index: row for row in rows}
            quick = [i for i in range(len(specs)) if self.fast_path.serves(planned.get(i))]
            if quick:
                return self._explain_split(images, specs, rows, quick, output_size, layer_resolution, dtype)
        return self._explain_eager(images, specs, rows, output_size, layer_resolution, dtype)

    def _explain_split(self, images, specs, rows, quick: List[int], output_size, layer_resolution,
                       dtype) -> ExplainResult:
        """The images at ``quick`` on the fast path, the others on the eager engine; each image is
        forwarded once, by one of them; ``batch_seconds`` is the whole call."""
        start = clock(images.device)
        count = len(specs)
        chosen = set(quick)
        slow = [i for i in range(count) if i not in chosen]
        parts = []
        for indices, run in ((quick, self._explain_fast), (slow, self._explain_eager)):
            if not indices:
                continue
            position = {old: new for new, old in enumerate(indices)}
            part_rows = [replace(row, index=position[row.index], targets=[]) for row in rows if row.index in position]
            part_images = images if len(indices) == count else images[indices]  # all of them: no copy
            part = run(part_images, [specs[i] for i in indices], part_rows, output_size, layer_resolution, dtype)
            parts.append((indices, part))
        if len(parts) == 1:
            return parts[0][1]
        logits = torch.empty(count, parts[0][1].logits.shape[-1], dtype=parts[0][1].logits.dtype,
                             device=parts[0][1].logits.device)
        explanations: List[Optional[Explanation]] = [None] * count
        paths = [EAGER] * count
        for indices, part in parts:
            logits[indices] = part.logits.to(logits.device, logits.dtype)
            for k, i in enumerate(indices):
                explanations[i] = part.explanations[k]
                paths[i] = part.paths[k] if part.paths else EAGER
        seconds = clock(images.device) - start
        for explanation in explanations:
            if explanation is not None:
                explanation.batch_seconds = seconds
        return ExplainResult(logits, explanations, sum(part.forward_seconds for _, part in parts), paths)

    def _explain_fast(self, images, specs, rows, output_size, layer_resolution, dtype) -> ExplainResult:
        """Rows the fast path serves: one forward on its runtime (logits and the map), maps from the map
        and, for gradient methods, a backward through the head alone."""
        fast = self.fast_path
        device = images.device
        start = clock(device)
        logits, features = fast.forward(images)
        logits, features = logits.to(device), features.to(device)
        paths = [fast.name] * len(specs)
        if not rows:
            return ExplainResult(logits, [None] * len(specs), clock(device) - start, paths)
        gradient = any(row.method.needs_gradient_for(row.options) for row in rows)
        with torch.enable_grad():
            if gradient:  # the head's logits (equal to the runtime's up to rounding) carry the gradient
                features.requires_grad_(True)
                logits = fast.head(features)
            forward_seconds = clock(device) - start
            shares = {row.index: forward_seconds / images.shape[0] for row in rows}
            for row in rows:
                row.targets = resolve_targets(row.spec_target, logits[row.index].detach())
            maps, passes = self._backward_rounds(HeadCapture({fast.layer: features}), logits, rows, shares)
        result = self._explanations(images, specs, rows, maps, passes, shares, logits, start, forward_seconds,
                                    output_size, layer_resolution, dtype)
        result.paths = paths
        return result

    def _explain_eager(self, images, specs, rows, output_size, layer_resolution, dtype) -> ExplainResult:
        """Rows on the eager engine (the shared captured forward, then Captum's own forwards)."""
        own = [row for row in rows if row.own_forwards]
        if not own:
            return self._explain_captured(images, specs, rows, output_size, layer_resolution, dtype)
        # rows with forwards of their own (Captum): the shared forward first (it predicts every image
        # and answers the other rows), then theirs, their targets read from its logits
        start = clock(images.device)
        own_indices = {r.index for r in own}
        shared = [None if i in own_indices else spec for i, spec in enumerate(specs)]
        result = self._explain_captured(images, shared, [r for r in rows if not r.own_forwards], output_size,
                                        layer_resolution, dtype)
        forward_share = result.forward_seconds / images.shape[0]  # every row's part of the shared forward
        for index, explanation in attribute_rows(self.model, images, own, result.logits, forward_share, output_size,
                                                 layer_resolution, dtype).items():
            result.explanations[index] = explanation
        total = clock(images.device) - start
        for explanation in result.explanations:
            if explanation is not None:
                explanation.batch_seconds = total
        return result

    def _explain_captured(self, images, specs, rows, output_size, layer_resolution, dtype) -> ExplainResult:
        """The rows that read the shared forward's capture: in chunks of ``graph_rows`` or at once."""
        chunk = self.graph_rows
        if rows and chunk and images.shape[0] > chunk:
            return self._explain_in_chunks(images, specs, rows, chunk, output_size, layer_resolution, dtype)
        return self._explain_batch(images, specs, rows, output_size, layer_resolution, dtype)

    def _explain_in_chunks(self, images, specs, rows, chunk: int, output_size, layer_resolution,
                           dtype) -> ExplainResult:
        """``explain`` over consecutive chunks of ``chunk`` rows (``graph_rows``): only one chunk's
        graph is alive at a time; every image waited for the whole batch (``batch_seconds``). The
        rows planned for the batch are re-indexed into their chunk, not planned again."""
        start = clock(images.device)
        parts = []
        for begin in range(0, images.shape[0], chunk):
            part_specs = specs[begin:begin + chunk]
            part_rows = [replace(row, index=row.index - begin, targets=[]) for row in rows
                         if begin <= row.index < begin + chunk]
            parts.append(self._explain_batch(images[begin:begin + chunk], part_specs, part_rows, output_size,
                                             layer_resolution, dtype))
        seconds = clock(images.device) - start
        explanations = [e for part in parts for e in part.explanations]
        for explanation in explanations:
            if explanation is not None:
                explanation.batch_seconds = seconds
        return ExplainResult(torch.cat([part.logits for part in parts]), explanations,
                             sum(part.forward_seconds for part in parts))

    def _explain_batch(self, images, specs, rows, output_size, layer_resolution, dtype) -> ExplainResult:
        """One forward over the whole ``images`` batch and the backward rounds its ``rows`` need."""
        device = images.device
        if not rows:
            start = clock(device)
            logits = self.predict(images)
            return ExplainResult(logits, [None] * len(specs), clock(device) - start)

        layers = [name for row in rows for name in row.layers]
        # switches above the shallowest layer: they carry the LRP rules for relevance passes and
        # compute lean gradients (lean_gradient.py) for gradient passes
        rules = self._rules_above(layers)
        floor = min(layers, key=lambda name: self.catalog.get(name).exited)  # no gradient needed below it
        start = clock(device)
        gradient_passes = any(row.method.needs_gradient_for(row.options) for row in rows)
        relevance_passes = any(row.method.needs_relevance_for(row.options) for row in rows)
        with ForwardCapture(self.model, layers, rules, grad_from=floor, gradient_passes=gradient_passes,
                            conv_geometry=self._conv_geometry, overwritten=self._overwritten,
                            relevance_passes=relevance_passes) as capture, \
                torch.enable_grad():
            with torch.no_grad():  # the capture switches grad on at ``floor``; this block restores the mode
                logits = self.model(images.contiguous(memory_format=self._input_format))
            forward_seconds = clock(device) - start
            shares = {row.index: forward_seconds / images.shape[0] for row in rows}  # the shared forward
            for row in rows:
                row.targets = resolve_targets(row.spec_target, logits[row.index].detach())
            maps, passes = self._backward_rounds(capture, logits, rows, shares)
        return self._explanations(images, specs, rows, maps, passes, shares, logits, start, forward_seconds,
                                  output_size, layer_resolution, dtype)

    def _explanations(self, images, specs, rows, maps, passes, shares, logits, start, forward_seconds,
                      output_size, layer_resolution, dtype) -> ExplainResult:
        """Each row's maps normalised and upsampled (its own time added to its share) as an
        :class:`Explanation`; ``batch_seconds`` from ``start``."""
        device = images.device
        size = None if layer_resolution else (output_size or tuple(images.shape[-2:]))
        explanations: List[Optional[Explanation]] = [None] * len(specs)
        for row in rows:
            own = clock(device)
            stacked = torch.stack(maps[row.index])
            layer_shape = tuple(stacked.shape[-2:])
            prepared = prepare_maps(stacked, size, dtype)
            shares[row.index] += clock(device) - own
            explanations[row.index] = Explanation(
                row.method.name, row.layer, row.targets, prepared, layer_shape, row.options, shares[row.index],
                passes[row.index])
        seconds = clock(device) - start
        for row in rows:
            explanations[row.index].batch_seconds = seconds
        return ExplainResult(logits.detach(), explanations, forward_seconds)

    # -- planning -----------------------------------------------------------------------------
    def validate(self, spec: ExplainSpec) -> None:
        """Check a spec against the model before any forward (method, layer or alias, target,
        options, Captum caps); raises the :class:`ExplanationInputError` a request would get."""
        self._plan(0, spec)

    def _plan(self, index: int, spec: ExplainSpec) -> PlannedRow:
        """The one planner: the registry's method for the spec validates it (:meth:`Method.plan`)."""
        return self.registry.lookup(spec.method).plan(index, spec, self)

    def _rules_above(self, layers: Sequence[str]):
        """LRP rules for the modules that run (at least once) after the shallowest requested layer
        is left. A module called several times (EfficientNet's shared ``_swish``: after the stem
        *and* after the head) is judged by its last call, so its calls above the layer keep their
        rule; its calls below are hooked too, which changes nothing above."""
        if not layers:
            return {}
        floor = min(self.catalog.get(name).exited for name in layers)
        return {name: rule for name, rule in self._rules.items()
                if name in self.catalog.layers and self.catalog.layers[name].exited > floor}

    # -- passes -------------------------------------------------------------------------------
    def _backward_rounds(self, capture: ForwardCapture, logits: torch.Tensor, rows: List[PlannedRow],
                         shares: Optional[Dict[int, float]] = None):
        """Per round ``r`` (the r-th target of each row): one gradient and/or one relevance backward.
        ``shares[row]`` accumulates the row's part of each pass (split over the rows it served) and
        of its group's map computation (split over the group)."""
        shares = {} if shares is None else shares
        device = logits.device

        def charge(members, since):
            spent = clock(device) - since
            for member in members:
                shares[member.index] = shares.get(member.index, 0.0) + spent / len(members)
        maps: Dict[int, List[torch.Tensor]] = defaultdict(list)
        passes: Dict[int, Dict[str, int]] = {r.index: {"forward": 1, "backward": 0, "relevance": 0} for r in rows}
        rounds = max(len(r.targets) for r in rows)
        for round_index in range(rounds):
            active = [r for r in rows if len(r.targets) > round_index]
            targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            for r in active:
                targets[r.index] = r.targets[round_index]
            last = round_index == rounds - 1
            relevance_follows = any(r.method.needs_relevance_for(r.options) for r in active)
            since = clock(device)
            gradients = self._pass(capture, logits, targets, active, "gradient", passes,
                                   retain=not last or relevance_follows)
            charge([r for r in active if r.method.needs_gradient_for(r.options)] or active, since)
            since = clock(device)
            relevance = self._pass(capture, logits, targets, active, "relevance", passes, retain=not last)
            charge([r for r in active if r.method.needs_relevance_for(r.options)] or active, since)
            groups: Dict[Tuple, List[PlannedRow]] = defaultdict(list)
            for r in active:
                groups[r.group].append(r)
            for group_rows in groups.values():
                since = clock(device)
                first = group_rows[0]
                indices = [r.index for r in group_rows]
                idx = torch.tensor(indices, device=logits.device)
                # a group of the whole batch in order reads the tensors themselves: no copy of a
                # (shallow, large) layer's activations and gradients; methods never write to them
                rows_of = (lambda t: t) if indices == list(range(logits.shape[0])) else (lambda t: t[idx])
                names = first.layers
                as_map = self.catalog.as_map  # (N, C, h, w): NCHW as is, NHWC permuted, tokens on the grid
                captured = Captured(
                    activations={n: as_map(n, rows_of(capture.activations[n].detach())) for n in names},
                    gradients={n: as_map(n, rows_of(gradients[n])) for n in names if n in gradients},
                    relevance_gradients={n: as_map(n, rows_of(relevance[n])) for n in names if n in relevance},
                    targets=targets[idx], logits=logits.detach()[idx], model=self.model, catalog=self.catalog)
                with torch.no_grad():
                    cams = first.method.compute(first.layer, captured, first.options)
                for r, cam in zip(group_rows, cams):
                    maps[r.index].append(cam)
                charge(group_rows, since)
        return maps, passes

    def _pass(self, capture, logits, targets, active, mode, passes, retain) -> Dict[str, torch.Tensor]:
        """One backward in ``mode`` for the rows that need it; returns ``{layer: ∂/∂A^l}``."""
        if mode == "gradient":
            needing = [r for r in active if r.method.needs_gradient_for(r.options)]
        else:
            needing = [r for r in active if r.method.needs_relevance_for(r.options)]
        if not needing:
            return {}
        names = list(dict.fromkeys(n for r in needing for n in r.layers))
        mask = torch.zeros(logits.shape[0], 1, device=logits.device, dtype=logits.dtype)
        mask[[r.index for r in needing]] = 1.0
        with torch.no_grad():
            if mode == "gradient":
                seed = one_hot_seed(logits, targets) * mask
            else:  # per row: the start its options ask for (targets.relevance_seed; R_logits = logits ⊙ g)
                starts = ["target"] * logits.shape[0]
                temperatures = [1.0] * logits.shape[0]
                for r in needing:
                    starts[r.index] = start_of(r.options)
                    temperatures[r.index] = temperature_of(r.options)
                seed = relevance_seed(logits, targets, starts, temperatures) * mask
        capture.mode = mode
        capture.release_graph = not retain  # the graph's last pass: nothing of it outlives this backward
        try:
            grads = torch.autograd.grad(logits, [capture.activations[n] for n in names], seed,
                                        retain_graph=retain, allow_unused=True)
        finally:
            capture.mode = "gradient"
            capture.release_graph = False
        for r in needing:
            passes[r.index]["backward" if mode == "gradient" else "relevance"] += 1
        return {n: (g if g is not None else torch.zeros_like(capture.activations[n])) for n, g in zip(names, grads)}

