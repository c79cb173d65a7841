"""Scoped capture: hooks for exactly one forward pass, removed on exit even on error.

``ForwardCapture`` is a context manager over a model. Inside it, the forward pass that produces
the logits also

* records the output of each named layer (the last call, if a module runs several times), and
* when LRP rules are given, replaces each ruled module's output ``y`` by a *switch* whose value is
  ``y`` and whose backward follows either the ordinary graph (``mode = "gradient"``) or the rule's
  modified graph (``mode = "relevance"``). One forward then serves both gradient-based methods and
  relevance-based methods: the caller runs one backward per mode over the same graph.

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

from .relevance.rules import Rule, call_with_params


class _Mode:
    """The backward mode of one capture, shared with its switches.

    A separate small object on purpose: the autograd nodes keep it alive, and if they kept the
    capture itself (which holds the activations, which hold the nodes) that cycle would run through
    C++ autograd objects the garbage collector cannot traverse — every request's graph would leak.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = "gradient"


class _Switch(torch.autograd.Function):
    """Value of ``original``; gradient to ``original`` or to ``modified`` by the capture's mode."""

    @staticmethod
    def forward(ctx, original, modified, mode):
        ctx.mode = mode
        return original.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.mode.value == "relevance":
            return None, grad, None
        return grad, None, None


class ForwardCapture:
    """Hook ``layers`` (and LRP ``rules``) of ``model`` for the forward passes run inside ``with``.

    Attributes after the forward: ``activations[name]`` — the layer's output tensor (part of the
    autograd graph when gradients are enabled). ``mode`` selects what a backward pass through the
    ruled modules computes: ``"gradient"`` (default) or ``"relevance"``.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], rules: Optional[Mapping[str, Rule]] = None):
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.rules = dict(rules or {})
        self.activations: Dict[str, torch.Tensor] = {}
        self._mode = _Mode()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._thread: Optional[int] = None
        self._suspended = False

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> "ForwardCapture":
        modules = dict(self.model.named_modules())
        self._thread = threading.get_ident()
        try:
            for name, rule in self.rules.items():  # rules first: capture sees the switched output
                self._handles.append(modules[name].register_forward_hook(self._rule_hook(rule)))
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._capture_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
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
    def active_hooks(self) -> int:
        """Number of hooks this capture still holds on the model (0 after exit)."""
        return len(self._handles)

    # -- hooks ----------------------------------------------------------------------------------
    def _mine(self) -> bool:
        return not self._suspended and threading.get_ident() == self._thread

    def _capture_hook(self, name: str):
        def hook(module, args, output):
            if self._mine():
                self.activations[name] = output
        return hook

    def _rule_hook(self, rule: Rule):
        def hook(module, args, output):
            if not self._mine() or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            x = args[0]
            modified = rule.modified(module, x, output, self._call_unhooked)
            if modified is output:
                return None
            return _Switch.apply(output, modified, self._mode)
        return hook

    def _call_unhooked(self, module: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Run ``module`` with substituted parameters without re-entering this capture's hooks."""
        self._suspended = True
        try:
            return call_with_params(module, params, x)
        finally:
            self._suspended = False
