"""BatchNorm folding for the relevance path only (the model's parameters are never touched).

In eval mode a BatchNorm that directly reads a convolution's output is an affine map per channel,
``y = a · c + d`` with ``a = γ / √(σ² + eps)`` and ``d = β − a · μ``, so conv + BN is one affine
layer ``y = W'x + b'`` with ``W' = a · W`` and ``b' = a · b + d``. Applying the conv's LRP rule to
the folded layer (and passing relevance through the BN unchanged) treats the pair as the single
layer it is: the z⁺ denominator then sees the BN's scale sign and shift, instead of a conv output
whose relevance the BN has already moved (a BN shift makes ``R_c ≠ 0`` where ``z⁺ = 0``, and that
relevance is lost).

Realisation in the modified-gradient convention of :mod:`.rules`: the BN keeps its pass rule, so
``R_c = R_y``; the conv's rule computes its ``z`` with the folded parameters and divides by it:
``modified = z' ⊙ (c / stab(z'))`` (detached ratio), hence
``g_x = ∂z'ᵀ (g_c ⊙ c / z') = ∂z'ᵀ (R_y / z')`` — the rule of the folded layer.

The folded parameters live on an immutable shallow copy of the conv made once, when the explainer
is built: nothing is mutated at request time, so it is thread-safe.
"""

from __future__ import annotations

import copy
from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from camserve.engine.core.layers import probe_forward
from camserve.engine.lrp.composites import BATCH_NORMS, CONVOLUTIONS
from camserve.engine.lrp.rules import EpsilonRule, Rule, stabilize


def batchnorm_pairs(model: nn.Module, input_size: Tuple[int, int]) -> Dict[str, str]:
    """``{conv name: bn name}`` for every BatchNorm whose input *is* a convolution's output tensor
    (found by one no-grad probe forward on zeros ``(1, 3, H, W)``)."""
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    produced: Dict[int, Tuple[str, torch.Tensor]] = {}  # id(tensor) → (conv name, tensor kept alive)
    pairs: Dict[str, str] = {}

    def conv_hook(module, args, output):
        produced[id(output)] = (names[id(module)], output)

    def bn_hook(module, args):
        found = produced.get(id(args[0]))
        if found is not None and found[1] is args[0]:
            pairs[found[0]] = names[id(module)]

    def register(handles):
        for module in modules.values():
            if isinstance(module, CONVOLUTIONS) and not isinstance(module, nn.ConvTranspose2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, BATCH_NORMS):
                handles.append(module.register_forward_pre_hook(bn_hook))

    probe_forward(model, input_size, register)
    return {conv: bn for conv, bn in pairs.items()
            if not modules[bn].training and modules[bn].running_var is not None}


def folded_conv(conv: nn.Module, bn: nn.Module, keep_bias: bool = True) -> nn.Module:
    """A shallow copy of ``conv`` whose (detached) parameters are ``W' = a·W`` and ``b' = a·b + d``."""
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        weight = conv.weight.detach() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
    clone = copy.copy(conv)
    clone._parameters = {**conv._parameters, "weight": weight, "bias": bias if keep_bias else None}
    clone._forward_hooks, clone._forward_pre_hooks = {}, {}
    return clone


class FoldedRule(Rule):
    """The conv's ``rule`` applied to the conv+BN folded layer (see the module docstring)."""

    name = "folded"

    def __init__(self, rule: Rule, folded: nn.Module):
        self.rule = rule
        self.folded = folded

    def modified(self, module, x, y, call):
        if isinstance(self.rule, EpsilonRule):  # ε reads only the output: give it the folded z'
            z = call(self.folded, {}, x)
            return z * (y / stabilize(z, self.rule.epsilon)).detach()
        return self.rule.modified(self.folded, x, y, call)

    def __repr__(self) -> str:
        return f"FoldedRule({self.rule!r})"


def fold_batchnorm(model: nn.Module, rules: Mapping[str, Rule], input_size: Tuple[int, int],
                   keep_bias: bool = True) -> Dict[str, Rule]:
    """``rules`` with each conv that feeds a BatchNorm given its folded rule (BN rules unchanged)."""
    modules = dict(model.named_modules())
    result = dict(rules)
    for conv, bn in batchnorm_pairs(model, input_size).items():
        if conv in result:
            rule = result[conv]
            if not isinstance(rule, EpsilonRule) and type(rule).modified is Rule.modified:
                raise ValueError(f"BatchNorm folding applies a rule to the folded layer through its modified "
                                 f"output; {rule!r} (at {conv!r}) has none: choose another composite or no canonizer")
            result[conv] = FoldedRule(rule, folded_conv(modules[conv], modules[bn], keep_bias))
    return result


def fold_batchnorm_keeping_bias(model: nn.Module, rules: Mapping[str, Rule], input_size: Tuple[int, int]):
    """Canonizer ``fold_bn``: each BatchNorm folded into the conv before it, shift kept."""
    return fold_batchnorm(model, rules, input_size, keep_bias=True)


def fold_batchnorm_dropping_bias(model: nn.Module, rules: Mapping[str, Rule], input_size: Tuple[int, int]):
    """Canonizer ``fold_bn_nobias``: each BatchNorm folded into the conv before it, its shift dropped
    from the relevance path."""
    return fold_batchnorm(model, rules, input_size, keep_bias=False)


#: canonizer name → ``(model, rules, input_size) → rules``: how the relevance path sees the model
#: (an :class:`~camserve.engine.pipeline.Explainer`'s ``canonizer``, a deployment's ``handler.canonizer``)
CANONIZERS = {"fold_bn": fold_batchnorm_keeping_bias, "fold_bn_nobias": fold_batchnorm_dropping_bias}
