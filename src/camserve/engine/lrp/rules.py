"""LRP rules, one per layer type, written as *modified gradients*.

Convention (Montavon et al., "Layer-wise relevance propagation: an overview", 2019, sec. 10.2.2):
the relevance of any tensor ``t`` of the forward pass is ``R_t = t ⊙ g_t``, where ``g_t`` is the
gradient that flows back to ``t`` when every hooked layer replaces its output ``y = f(x)`` by a
*modified* tensor of the same value whose derivative implements the rule. Each rule below states
that modified tensor; :mod:`camserve.engine.capture` applies its derivative during relevance
backward passes.

Why this convention: a residual addition ``out = a + b`` needs no canonizer. Its ordinary gradient
sends ``g`` to both branches, so ``R_a = a ⊙ g = a / (a + b) · R_out`` — exactly the proportional
split of the sum (LRP-0 on the sum) — and relevance arriving at a tensor from several consumers adds
up. A module called several times in one forward (EfficientNet-Lite's shared ``ReLU6``) is hooked
per call, so each call gets its own rule. Depthwise convolutions are ordinary convolutions with
``groups``; the rules use the module's own forward, so padding modules and ``groups`` are honoured.

Every rule is stateless; its numerical parameters live on the instance and never change.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from camserve.engine.core.lean_gradient import max_pool_input_grad

ModuleCall = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]
#: what a rule's backward returns: (gradient for the ordinary graph of ``y``, gradient for ``x``)
RelevanceGrad = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps · sign(z)`` with ``sign(±0) = ±1``, safe to divide by.

    ``copysign`` builds ``±eps`` in one pass (zennit writes ``sign(0) = +1``; the two differ only
    at ``z = −0.0``, where every rule multiplies the ratio by a zero anyway)."""
    out = torch.copysign(z.new_full((), eps), z)  # a 0-d tensor on z's device: no host copy
    return out.add_(z)


def scaled_ratio(grad: torch.Tensor, y: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``grad ⊙ y / stab(z)`` in one new buffer (on a CPU, fresh large buffers cost page faults)."""
    out = stabilize(z, eps)
    torch.div(y, out, out=out)
    return out.mul_(grad)


class Rule:
    """A relevance rule for one layer type.

    ``modified(module, x, y, call)`` returns a tensor equal in value to ``y = module(x)`` whose
    gradient with respect to ``x`` realises the rule. ``call(module, params, x)`` evaluates the
    module with some parameters replaced (and without re-entering the explainer's hooks).

    ``relevance_grad(module, x, y, grad, call)`` is what the capture runs in a relevance backward:
    the vector-Jacobian product of ``modified`` with ``grad``, returned as ``(g_y, g_x)`` — a
    gradient to send through the module's ordinary graph, or one for its input directly. The
    default differentiates :meth:`modified` on a detached copy of ``x``; rules override it to skip
    work (no graph at all for element-wise rules), and a rule whose override needs no
    :meth:`modified` (pass, ε) states it in its docstring only. Nothing of a rule runs in the
    forward pass.
    """

    name = "rule"
    #: whether :meth:`relevance_grad` returns a gradient for ``y``'s ordinary graph (else only for ``x``)
    uses_output_graph = False
    #: whether :meth:`relevance_grad` reads ``y``'s values (else it may be given ``None``)
    reads_output = True
    #: a max pool's rule reads, as ``y``, the forward's argmax indices (:class:`MaxPoolGradientRule`)
    reads_indices = False
    #: whether this rule only passes relevance on unchanged (``R_x = R_y``, element-wise layers)
    passes_relevance = False
    #: whether :meth:`relevance_grad` reads ``y`` and ``grad`` only through ``R_y = y ⊙ grad``: then
    #: pass-through layers right after the module can be absorbed into it (``R_y`` is the same at
    #: their output), see :mod:`camserve.engine.capture`
    reads_output_relevance = False

    def reads_input(self, modules: Tuple[nn.Module, ...]) -> bool:
        """Whether :meth:`relevance_grad` reads the values of the input ``x`` of the segment
        ``modules`` (its head, then absorbed pass-through modules); else it is given ``None`` and
        the capture need not keep ``x`` alive for the backward."""
        return True

    def modified(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, call: ModuleCall) -> torch.Tensor:
        raise NotImplementedError

    def relevance_grad(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor,
                       call: ModuleCall) -> RelevanceGrad:
        """``g_x = ∂modifiedᵀ grad``, by autograd on ``modified(module, x, y)`` recomputed in the backward."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = self.modified(module, x, y.detach(), call)
            (grad_x,) = torch.autograd.grad(out, x, grad, allow_unused=True)
        return None, grad_x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GradientRule(Rule):
    """Plain gradient: ``R_x = x ⊙ ∂y/∂xᵀ g_y``. Exact LRP-0 for linear maps without bias (sums,
    average pooling, padding) and winner-take-all for max pooling."""

    name = "gradient"

    def modified(self, module, x, y, call):
        return y


class PassRule(Rule):
    """Pass-through for element-wise layers (activations, BatchNorm): ``R_x = R_y``.

    Realised as ``g_x = g_y ⊙ y / x``, i.e. ``x ⊙ (y / x)`` with the ratio detached.

    A segment that is one ``ReLU`` needs only ``y``: where ``y > 0``, ``x = y`` (the same float),
    and where ``y = 0`` the ratio is a zero whatever ``x`` is (``0 / stab(x)``; only the sign of
    that zero can differ, and every later step multiplies or adds it). So its ``x`` (a residual
    block's pre-activation sum) need not outlive the forward (:meth:`reads_input`).
    """

    name = "pass"
    passes_relevance = True
    reads_output_relevance = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def reads_input(self, modules):
        return not (len(modules) == 1 and type(modules[0]) is nn.ReLU)

    def relevance_grad(self, module, x, y, grad, call):
        """``g_x = g_y ⊙ y / stab(x)`` (``stab(y)`` for a lone ReLU given no ``x``): element-wise, no graph."""
        return None, scaled_ratio(grad, y, y if x is None else x, self.stabilizer)


class EpsilonRule(Rule):
    """LRP-ε: ``R_x = x ⊙ Wᵀ (R_y / (z + ε·sign z))`` with ``z = Wx + b = y``.

    Realised as ``y ⊙ (y / stab(y))`` with the ratio detached: ``g_x = Wᵀ (g_y ⊙ y / stab(y))``.
    Costs nothing beyond the gradient: the forward output is the denominator.
    """

    name = "epsilon"
    uses_output_graph = True

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def reads_input(self, modules):
        return False  # the module's own graph keeps what its gradient needs

    def relevance_grad(self, module, x, y, grad, call):
        """``g_y ⊙ y / stab(y)`` sent through the module's own graph (its gradient is ``Wᵀ``)."""
        return scaled_ratio(grad, y, y, self.epsilon), None

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon})"


def _signed_z(module: nn.Module, x: torch.Tensor, call: ModuleCall, positive: bool,
              nonnegative: bool = False) -> torch.Tensor:
    """``z⁺ = W⁺x⁺ + W⁻x⁻ + b⁺`` (``positive``) or ``z⁻ = W⁻x⁺ + W⁺x⁻ + b⁻``: the module evaluated
    with its weights and bias split by sign, so each product ``x_i w_ij`` keeps one sign.

    ``nonnegative`` (the caller checked ``x ≥ 0``, e.g. after a ReLU): ``x⁻ = 0``, so only the
    first term is evaluated — same value, half the work. Its gradient then omits the ``x⁻`` term's
    contribution at the entries where ``x = 0`` exactly, which carry no relevance (``R = x ⊙ g = 0``)."""
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    # the second half is built only when used (a 512×512×3×3 conv's half is 9.4 MiB of transient)
    first = {"weight": weight.clamp(min=0) if positive else weight.clamp(max=0)}
    if bias is not None:
        bias = bias.detach()
        first["bias"] = bias.clamp(min=0) if positive else bias.clamp(max=0)
    if nonnegative:
        return call(module, first, x)
    second = {"weight": weight.clamp(max=0) if positive else weight.clamp(min=0)}
    if bias is not None:
        second["bias"] = torch.zeros_like(bias)
    return call(module, first, x.clamp(min=0)) + call(module, second, x.clamp(max=0))


def _nonnegative(x: torch.Tensor) -> bool:
    return bool(x.min() >= 0)


class AlphaBetaRule(Rule):
    """LRP-αβ (Bach et al., 2015), ``α − β = 1``:
    ``R_x = α · x ⊙ ∂z⁺ᵀ(R_y / z⁺) − β · x ⊙ ∂z⁻ᵀ(R_y / z⁻)``,
    with ``z⁺ = W⁺x⁺ + W⁻x⁻ + b⁺`` and ``z⁻ = W⁻x⁺ + W⁺x⁻ + b⁻``.
    """

    name = "alpha_beta"
    reads_output_relevance = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if abs(alpha - beta - 1.0) > 1e-9:
            raise ValueError("alpha - beta must be 1")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def modified(self, module, x, y, call):
        z_pos = _signed_z(module, x, call, positive=True)
        out = self.alpha * z_pos * (y / stabilize(z_pos, self.stabilizer)).detach()
        if self.beta:
            z_neg = _signed_z(module, x, call, positive=False)
            out = out - self.beta * z_neg * (y / stabilize(z_neg, self.stabilizer)).detach()
        return out

    def relevance_grad(self, module, x, y, grad, call):
        """``g_x = α ∂z⁺ᵀ(g_y ⊙ y / stab z⁺) − β ∂z⁻ᵀ(g_y ⊙ y / stab z⁻)``, ``z±`` recomputed here."""
        nonnegative = _nonnegative(x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            z_pos = _signed_z(module, x, call, positive=True, nonnegative=nonnegative)
            seed = scaled_ratio(grad, y, z_pos.detach(), self.stabilizer)
            zs, seeds = [z_pos], [seed.mul_(self.alpha) if self.alpha != 1 else seed]
            if self.beta:
                z_neg = _signed_z(module, x, call, positive=False, nonnegative=nonnegative)
                zs.append(z_neg)
                seeds.append(scaled_ratio(grad, y, z_neg.detach(), self.stabilizer).mul_(-self.beta))
            (grad_x,) = torch.autograd.grad(zs, x, seeds)
        return None, grad_x

    def __repr__(self) -> str:
        return f"AlphaBetaRule(alpha={self.alpha}, beta={self.beta})"


class ZPlusRule(AlphaBetaRule):
    """LRP-z⁺ (= αβ with α=1, β=0, zennit's ``ZPlus``):
    ``R_x = x⁺ ⊙ W⁺ᵀ(R_y / z⁺) + x⁻ ⊙ W⁻ᵀ(R_y / z⁺)`` with ``z⁺ = W⁺x⁺ + W⁻x⁻ + b⁺``.

    For non-negative inputs (after ReLU) this is the classic ``x_i w⁺_ij / Σ_i x_i w⁺_ij``.
    """

    name = "zplus"

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__(1.0, 0.0, stabilizer)

    def __repr__(self) -> str:
        return "ZPlusRule()"


class GammaRule(Rule):
    """LRP-γ (Montavon et al. 2019, sec. 10.2.3; zennit's ``Gamma``): the signed contributions
    with the ones that agree with the output's sign favoured by ``γ``,
    ``R_x = x ⊙ ∂z_γᵀ (R_y / z_γ)``, ``z_γ = z + γ z⁺`` where ``y ≥ 0`` and ``z + γ z⁻`` where
    ``y < 0`` (``z = Wx + b = y``; ``z±`` as in :class:`AlphaBetaRule`, so for ``x ≥ 0`` the
    weights are ``w + γw⁺``). ``γ = 0`` is LRP-0, ``γ → ∞`` z⁺ (for ``y > 0``): a knob between the
    class-contrastive signed rule and the stable, class-blind z⁺.
    """

    name = "gamma"
    reads_output_relevance = True

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        if not gamma >= 0:
            raise ValueError("gamma must be >= 0")
        self.gamma, self.stabilizer = gamma, stabilizer

    def relevance_grad(self, module, x, y, grad, call):
        """``g_x = ∂zᵀ s + γ ∂z⁺ᵀ (s ⊙ [y ≥ 0]) + γ ∂z⁻ᵀ (s ⊙ [y < 0])``, ``s = g_y ⊙ y / stab z_γ``."""
        nonnegative = _nonnegative(x)
        positive = y >= 0
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            params = {"weight": module.weight.detach()}
            if getattr(module, "bias", None) is not None:
                params["bias"] = module.bias.detach()
            z = call(module, params, x)
            z_pos = _signed_z(module, x, call, positive=True, nonnegative=nonnegative)
            zs, favoured = [z, z_pos], z_pos.detach() * self.gamma
            negative = None if bool(positive.all()) else ~positive
            if negative is not None:
                z_neg = _signed_z(module, x, call, positive=False, nonnegative=nonnegative)
                zs.append(z_neg)
                favoured = torch.where(positive, favoured, z_neg.detach() * self.gamma)
            seed = scaled_ratio(grad, y, favoured.add_(z.detach()), self.stabilizer)
            seeds = [seed, seed * positive * self.gamma]
            if negative is not None:
                seeds.append(seed * negative * self.gamma)
            (grad_x,) = torch.autograd.grad(zs, x, seeds)
        return None, grad_x

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma})"


class ProportionalPoolRule(Rule):
    """Proportional rule for max pooling: ``R_i = x_i / Σ_window x · R_window`` (instead of the
    gradient's winner-take-all), realised through an average pool with the same geometry."""

    name = "proportional"
    reads_output_relevance = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def modified(self, module, x, y, call):
        z = F.avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode)
        return z * (y / stabilize(z, self.stabilizer)).detach()


class MaxPoolGradientRule(Rule):
    """The plain gradient of a 2-D max pool (winner-take-all, as :class:`GradientRule`) from its
    input and the forward's argmax indices, which the capture keeps in a narrow integer type
    (``y`` here; autograd keeps int64, twice the output's bytes: 12.25 MiB after ResNet-18's stem
    at batch 8, 3.06 as int16). Bit-identical to autograd's backward (the same kernel and indices)."""

    name = "gradient"
    reads_output = False
    #: the capture hands :meth:`relevance_grad` the forward's argmax indices as ``y`` (or ``None``)
    reads_indices = True

    def relevance_grad(self, module, x, y, grad, call):

        return None, max_pool_input_grad(module, x, grad, y)


def call_with_params(module: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Evaluate ``module.forward(x)`` with ``params`` substituted, without touching ``module``.

    A shallow copy of the module gets its own parameter dictionary with ``params`` merged in, and
    its ``forward`` is called (so the module's own padding, stride and ``groups`` apply and no hook
    of the module runs). ``torch.func.functional_call`` is not used on purpose: it swaps the
    tensors *on the shared module* for the duration of the call, which a concurrent forward in
    another thread would see (and two overlapping swaps can leave the model with modified weights).
    """
    clone = copy.copy(module)
    clone._parameters = {**module._parameters, **params}
    return clone.forward(x)
