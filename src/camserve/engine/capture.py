"""Scoped capture: hooks for exactly one forward pass, removed on exit even on error.

``ForwardCapture`` is a context manager over a model. Inside it, the forward pass that produces
the logits also

* records the output of each named layer (the last call, if a module runs several times), and
* when LRP rules are given, replaces each ruled module's output ``y`` by a *switch* whose value is
  ``y`` and whose backward follows either the ordinary graph (``mode = "gradient"``) or the rule's
  modified graph (``mode = "relevance"``). One forward then serves both gradient-based methods and
  relevance-based methods: the caller runs one backward per mode over the same graph.

Pass-through tails are absorbed: when a module whose rule passes relevance on unchanged
(BatchNorm, activations: ``R_x = R_y``) consumes the output of the switch created just before it,
the switch is extended over it instead of getting one of its own. A segment
``conv → BN → ReLU6`` then has one switch from the conv's input to the ReLU6's output and runs the
conv's rule with ``R_y`` read at the segment's end — the same relevance, since the pass layers keep
it, without the two element-wise ratio passes and without keeping the intermediate tensors for the
backward. A switch stays in the graph for every other consumer of an intermediate tensor, and a
recorded layer output is never absorbed (its relevance is read there).

Gradient passes can drop the module graphs too: given the verified geometry of the model's convs
(``conv_geometry``), a segment whose ordinary gradient follows from its input and output alone
(:mod:`camserve.engine.core.lean_gradient`: conv, eval BatchNorm, ReLU/ReLU6) gets a detached output,
and its switch computes that gradient itself in ``"gradient"`` mode.

Isolation: every hook checks that it runs in the thread that opened the capture, so concurrent
captures on one shared model (threads serving requests) never see each other's tensors; all state
lives on the capture object, none on the model or in globals; every handle is removed in
``__exit__``.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from camserve.engine.core.lean_gradient import ConvGeometry, SegmentGradient, compact_pool_indices
from camserve.engine.lrp.rules import Rule, call_with_params


class _Mode:
    """The backward mode of one capture, shared with its switches, and its hook suspension flag.

    A separate small object on purpose: the autograd nodes keep it alive, and if they kept the
    capture itself (which holds the activations, which hold the nodes) that cycle would run through
    C++ autograd objects the garbage collector cannot traverse — every request's graph would leak.
    """

    __slots__ = ("value", "suspended", "release")

    def __init__(self) -> None:
        self.value = "gradient"
        self.suspended = False
        #: the running backward is the graph's last (``retain_graph=False``): switches drop their
        #: reference to ``y`` once read — autograd frees saved tensors then, but not ``ctx``'s
        #: attributes, and the graph itself stays alive as long as the logits do
        self.release = False

    def call_unhooked(self, module: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Run ``module`` with substituted parameters without re-entering the capture's hooks."""
        self.suspended = True
        try:
            return call_with_params(module, params, x)
        finally:
            self.suspended = False


class _Switch(torch.autograd.Function):
    """Value of ``y = segment(x)``; its backward sends the gradient to ``y``'s ordinary graph
    (``"gradient"`` mode) or runs the rule of the segment's first module (``"relevance"`` mode).

    ``modules`` is the segment: one ruled module, possibly followed by absorbed pass-through
    modules. The forward does nothing but keep what the backward will read (``keep``, decided by
    the capture): ``x`` (its values, or only its shape), and ``y`` (a reference, a copy, a
    :meth:`SegmentGradient.mask <camserve.engine.core.lean_gradient.SegmentGradient.mask>`,
    or nothing). All rule work (z⁺'s extra convolutions, the ratios) happens in the relevance
    backward, via ``rule.relevance_grad``. ``lean`` (a :class:`SegmentGradient`, when ``y`` was
    detached from the segment's graph) computes the ordinary gradient in ``"gradient"`` mode;
    ``geometry`` (the head conv's verified :class:`ConvGeometry`, if any) evaluates it with
    modified weights for the rule. The output shares ``y``'s storage (no copy) unless ``keep.y``
    is ``"copy"``; if a later in-place op (ResNet's ``out += identity``) changes a kept reference,
    the backward recomputes ``y`` by running the segment on ``x``.
    """

    @staticmethod
    def forward(ctx, y, x, rule, modules, mode, lean, geometry, keep):
        ctx.mode, ctx.rule, ctx.modules, ctx.lean, ctx.geometry = mode, rule, modules, lean, geometry
        ctx.keep_x, ctx.x_shape, ctx.y_kind = keep.x, x.shape, keep.y
        ctx.y = None
        if keep.y == "mask":  # a snapshot: later in-place changes of y do not reach it
            ctx.y = lean.mask(y.detach())
        elif keep.y == "indices":  # a max pool's argmax, read off the forward's node (or None)
            ctx.y = keep.indices
        elif keep.y is not None:
            ctx.y, ctx.y_version = y, y._version  # an input: no reference cycle through the node
        if keep.x:
            ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)  # no gradient arrived (a segment absorbed this output): skip
        # ``copy``: a later in-place op overwrites this output (known from the model's probe); it
        # gets a copy, so ``y`` stays as it was and the backward need not recompute the segment
        return y.clone() if keep.y == "copy" else y.detach()

    @staticmethod
    def backward(ctx, grad):
        none = (None,) * 8
        kept = ctx.y
        if ctx.mode.release:  # the graph's last backward: y is read below at most once
            ctx.y = None
        if grad is None:
            return none
        relevance = ctx.mode.value == "relevance"
        if not relevance and ctx.lean is None:
            return (grad if ctx.needs_input_grad[0] else None,) + none[1:]
        if not ctx.needs_input_grad[1]:  # nothing below this module needs a gradient
            return none
        x = ctx.saved_tensors[0] if ctx.keep_x else None
        mode = ctx.mode
        y = kept.detach() if kept is not None else None
        if ctx.y_kind in ("ref", "copy") and kept._version != ctx.y_version and (relevance or ctx.lean.reads_output):
            if x is None:
                raise RuntimeError(
                    f"the output of {type(ctx.modules[-1]).__name__} was changed in place after the forward, and its "
                    f"input was not kept to recompute it (the explainer's probe found no such in-place op)")
            with torch.no_grad():
                y = x
                for module in ctx.modules:
                    y = mode.call_unhooked(module, {}, y)
        if not relevance:
            return (None, ctx.lean(ctx.modules[0], x if x is not None else ctx.x_shape, y, grad)) + none[2:]
        call = ctx.geometry.call if ctx.geometry is not None else mode.call_unhooked
        grad_y, grad_x = ctx.rule.relevance_grad(ctx.modules[0], x, y, grad, call)
        return (grad_y, grad_x) + none[2:]


class _Keep:
    """What a switch keeps for its backward: ``x`` (``True``: its values; else its shape only) and
    ``y`` (``"ref"``, ``"copy"`` — a later in-place op overwrites the output —, ``"mask"``,
    ``"indices"`` — a max pool's argmax, ``indices`` — or ``None``)."""

    __slots__ = ("x", "y", "indices")

    def __init__(self, x: bool, y: Optional[str], indices: Optional[torch.Tensor] = None):
        self.x, self.y, self.indices = x, y, indices


class _Segment:
    """The switch created last: its output (which the next module may consume), the segment's
    input, rule and modules. Held only until the next switch replaces it."""

    __slots__ = ("output", "version", "x", "rule", "modules", "lean", "geometry")

    def __init__(self, output, x, rule, modules, lean, geometry):
        self.output, self.version, self.x, self.rule, self.modules = output, output._version, x, rule, modules
        self.lean, self.geometry = lean, geometry


class _Reattach(torch.autograd.Function):
    """Identity on a fresh leaf, so the re-attached layer output is not itself a leaf: a later
    in-place op on it (ResNet's ``out += identity``) stays legal. No copy."""

    @staticmethod
    def forward(ctx, leaf):
        return leaf.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


class ForwardCapture:
    """Hook ``layers`` (and LRP ``rules``) of ``model`` for the forward passes run inside ``with``.

    Attributes after the forward: ``activations[name]`` — the layer's output tensor (part of the
    autograd graph when gradients are enabled). ``mode`` selects what a backward pass through the
    ruled modules computes: ``"gradient"`` (default) or ``"relevance"``.

    ``grad_from`` (one of ``layers``): run the forward under ``torch.no_grad()``; when this layer's
    output appears it becomes a leaf that requires grad and gradient recording is switched on for
    the rest of the forward (grad mode is thread-local; the caller's ``no_grad`` block restores
    it). Nothing below that layer is recorded: backward passes stop there, which is all a method
    reading layers at or above it needs.

    ``gradient_passes=False`` promises that only relevance backward passes will run: each ruled
    module's own graph is then dropped (its switch keeps ``x`` and ``y`` only), which frees what
    the module saved for an ordinary backward (e.g. the padded input of a same-padding conv).
    With gradient passes, ``conv_geometry`` (``{name: ConvGeometry}``, see
    :func:`camserve.engine.core.lean_gradient.trace_conv_geometries`) lets segments whose gradient
    needs only ``x`` and ``y`` drop their graph as well.

    ``overwritten``: modules whose output a later in-place op changes (torchvision's
    ``out += identity``; found by the same probe). A switch ending there whose backward reads ``y``'s
    values (a rule's ``R_y`` — unless ``relevance_passes=False`` promises none) hands on a copy: one
    copy instead of re-running the segment in the backward.

    Each switch keeps only what its backward passes read (:meth:`_keep`): e.g. no ``x`` for a lone
    ReLU's pass rule or a conv's lean gradient, a boolean mask instead of an activation's ``y`` when
    no relevance pass follows, a max pool's argmax as int16 — so the graph holds, per segment, the
    tensors a rule reads and nothing else.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], rules: Optional[Mapping[str, Rule]] = None,
                 grad_from: Optional[str] = None, gradient_passes: bool = True,
                 conv_geometry: Optional[Mapping[str, ConvGeometry]] = None, overwritten: Iterable[str] = (),
                 relevance_passes: bool = True):
        self.model = model
        #: ``False`` promises that no relevance backward will run (only gradient passes)
        self.relevance_passes = relevance_passes
        #: modules whose output a later in-place op changes (probe-verified): their switches copy
        self.overwritten = frozenset(overwritten)
        self.grad_from = grad_from
        self.gradient_passes = gradient_passes
        self.conv_geometry = dict(conv_geometry or {})
        self.layers = list(dict.fromkeys(layers))
        self.rules = dict(rules or {})
        self.activations: Dict[str, torch.Tensor] = {}
        self._mode = _Mode()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._thread: Optional[int] = None
        self._last: Optional[_Segment] = None  # the switch a following pass-through module may extend
        #: module calls that got a switch, and those among them absorbed into the switch before
        #: (the backward runs a rule once per segment: ``switches - absorbed`` rules)
        self.switches = self.absorbed = 0
        #: switches whose segment dropped its autograd graph for gradient passes (lean_gradient.py)
        self.lean = 0

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> "ForwardCapture":
        modules = dict(self.model.named_modules())
        self._thread = threading.get_ident()
        try:
            for name, rule in self.rules.items():  # rules first: capture sees the switched output
                hook = self._rule_hook(rule, self.conv_geometry.get(name), name in self.overwritten)
                self._handles.append(modules[name].register_forward_hook(hook))
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._capture_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def mode(self) -> str:
        """``"gradient"`` or ``"relevance"``: what a backward through the ruled modules computes."""
        return self._mode.value

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("gradient", "relevance"):
            raise ValueError(f"mode must be 'gradient' or 'relevance', not {value!r}")
        self._mode.value = value

    @property
    def release_graph(self) -> bool:
        """Set while running the graph's last backward (``retain_graph=False``): the switches then
        drop their references to the forward's tensors as they run, so that nothing of the graph
        outlives that pass (autograd frees only the saved tensors)."""
        return self._mode.release

    @release_graph.setter
    def release_graph(self, value: bool) -> None:
        self._mode.release = bool(value)

    @property
    def active_hooks(self) -> int:
        """Number of hooks this capture still holds on the model (0 after exit)."""
        return len(self._handles)

    # -- hooks ----------------------------------------------------------------------------------
    def _keep(self, head: Rule, modules, lean: Optional[SegmentGradient], overwritten: bool,
              output: torch.Tensor, x: torch.Tensor) -> _Keep:
        """What a new switch keeps: only what its backward passes will read. A relevance pass
        reads ``x`` and ``y`` as the rule says (:meth:`Rule.reads_input`, :attr:`Rule.reads_output`);
        a lean gradient pass reads ``x``'s shape (a max pool: its values) and, if the segment
        ends in an activation, where ``y``'s derivative vanishes — a boolean mask when no relevance
        pass needs ``y`` itself. ``y`` kept by reference is copied instead where a later in-place
        op overwrites the output (``overwritten``): one copy instead of re-running the segment."""
        relevance = self.relevance_passes
        lean_x = lean is not None and lean.reads_input
        lean_y = lean is not None and lean.reads_output
        keep_x = (relevance and head.reads_input(modules)) or lean_x
        if (relevance and head.reads_indices) or (lean is not None and lean.pool):
            return _Keep(keep_x, "indices", compact_pool_indices(output, x))
        if (relevance and head.reads_output) or (lean_y and lean.mask is None):
            keep_y = "copy" if overwritten else "ref"
        else:
            keep_y = "mask" if lean_y else None
        return _Keep(keep_x, keep_y)

    def _mine(self) -> bool:
        return not self._mode.suspended and threading.get_ident() == self._thread

    def _capture_hook(self, name: str):
        reattach = name == self.grad_from

        def hook(module, args, output):
            if not self._mine():
                return None
            if self._last is not None and output is self._last.output:
                self._last = None  # relevance is read at this output: no later module absorbs it
            if reattach and not torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                torch.set_grad_enabled(True)  # from here on; the caller's no_grad block restores it
                output = _Reattach.apply(output.detach().requires_grad_(True))
                self.activations[name] = output
                return output
            self.activations[name] = output
            return None
        return hook

    def _rule_hook(self, rule: Rule, geometry: Optional[ConvGeometry], overwritten: bool = False):
        mode = self._mode  # the switch gets the small mode object, never the capture

        def hook(module, args, output):
            if not self._mine() or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            x, last = args[0], self._last
            if rule.passes_relevance and last is not None and x is last.output and x._version == last.version:
                head, x, modules = last.rule, last.x, last.modules + (module,)  # absorb: R_x = R_y
                lean = last.lean.extend(module) if last.lean is not None else None
                head_geometry = last.geometry
                self.absorbed += 1
            else:
                head, modules, head_geometry = rule, (module,), geometry
                lean = SegmentGradient.start(module, geometry) if self.gradient_passes else None
            if head.uses_output_graph:
                detach_output, lean = False, None
            else:
                detach_output = not self.gradient_passes or lean is not None
            if not output.requires_grad or (detach_output and not x.requires_grad):
                self._last = None
                return None
            switched = _Switch.apply(output.detach() if detach_output else output, x, head, modules, mode, lean,
                                     head_geometry, self._keep(head, modules, lean, overwritten, output, x))
            self.switches += 1
            self.lean += lean is not None
            self._last = (_Segment(switched, x, head, modules, lean, head_geometry)
                          if head.reads_output_relevance else None)
            return switched
        return hook
