"""Composites: which LRP rule each layer of a model gets (zennit's ``LayerMapComposite`` idea).

A composite is an ordered list of ``(module types, rule)`` pairs; the first pair whose types
match a leaf module decides its rule. Layers that match nothing keep their plain gradient, which
is already exact LRP for linear bias-free maps (sums, padding, average pooling, flatten, dropout
in eval) — see :mod:`camserve.engine.lrp.rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Type

from torch import nn

from camserve.engine.errors import InvalidOptionError
from camserve.engine.core.lean_gradient import supported_max_pool
from camserve.engine.lrp.rules import (AlphaBetaRule, EpsilonRule, GammaRule, GradientRule, MaxPoolGradientRule, PassRule, ProportionalPoolRule,
                    Rule, ZPlusRule)

CONVOLUTIONS: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
BATCH_NORMS: Tuple[Type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATIONS: Tuple[Type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                                            nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Softplus)
MAX_POOLS: Tuple[Type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@dataclass(frozen=True)
class Composite:
    """Ordered ``(types, rule)`` pairs; :meth:`rule_for` gives a module's rule or ``None``."""

    name: str
    layer_map: Tuple[Tuple[Tuple[Type[nn.Module], ...], Rule], ...]

    def rule_for(self, module: nn.Module) -> Optional[Rule]:
        """The first rule whose types match ``module``; ``None`` for containers and unmatched leaves."""
        if next(module.children(), None) is not None and not isinstance(module, CONVOLUTIONS):
            return None  # containers get no rule; their leaves do
        for types, rule in self.layer_map:
            if isinstance(module, types):
                if isinstance(rule, MaxPoolGradientRule) and not supported_max_pool(module):
                    continue  # e.g. a subclass or return_indices: autograd's own gradient (GradientRule)
                return None if isinstance(rule, GradientRule) else rule
        return None

    def assign(self, modules: Iterable[Tuple[str, nn.Module]]) -> Dict[str, Rule]:
        """Map each named module that needs a rule to it."""
        rules = {}
        for name, module in modules:
            rule = self.rule_for(module)
            if rule is not None:
                rules[name] = rule
        return rules


def _base(stabilizer: float, max_pool: Rule) -> List[Tuple[Tuple[Type[nn.Module], ...], Rule]]:
    # winner-take-all 2-D max pools get their gradient from a switch that keeps no indices
    pools = [((nn.MaxPool2d,), MaxPoolGradientRule())] if isinstance(max_pool, GradientRule) else []
    return [(ACTIVATIONS, PassRule(stabilizer)), (BATCH_NORMS, PassRule(stabilizer))] + pools + [(MAX_POOLS, max_pool)]


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6, proportional_pool: bool = False) -> Composite:
    """z⁺ for convolutions, ε for linear layers, pass for activations and BatchNorm (zennit's
    ``EpsilonPlus``), winner-take-all (or proportional) max pooling."""
    pool = ProportionalPoolRule(stabilizer) if proportional_pool else GradientRule()
    return Composite("epsilon_plus", tuple(_base(stabilizer, pool) + [
        (CONVOLUTIONS, ZPlusRule(stabilizer)), ((nn.Linear,), EpsilonRule(epsilon))]))


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """αβ (α=2, β=1) for convolutions, ε for linear layers (zennit's ``EpsilonAlpha2Beta1``)."""
    return Composite("epsilon_alpha2_beta1", tuple(_base(stabilizer, GradientRule()) + [
        (CONVOLUTIONS, AlphaBetaRule(2.0, 1.0, stabilizer)), ((nn.Linear,), EpsilonRule(epsilon))]))


def epsilon_gamma(epsilon: float = 1e-6, stabilizer: float = 1e-6, gamma: float = 0.25) -> Composite:
    """LRP-γ (γ = 0.25) for convolutions, ε for linear layers (zennit's ``EpsilonGammaBox`` without
    the box rule for the first layer: LRP-γ is what Montavon et al. 2019 recommend for lower layers)."""
    name = "epsilon_gamma" if gamma == 0.25 else f"epsilon_gamma:{gamma:g}"
    return Composite(name, tuple(_base(stabilizer, GradientRule()) + [
        (CONVOLUTIONS, GammaRule(gamma, stabilizer)), ((nn.Linear,), EpsilonRule(epsilon))]))


def epsilon_only(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """ε for convolutions and linear layers: the cheapest rule set (no extra forward)."""
    return Composite("epsilon", tuple(_base(stabilizer, GradientRule()) + [
        (CONVOLUTIONS, EpsilonRule(epsilon)), ((nn.Linear,), EpsilonRule(epsilon))]))


COMPOSITES = {
    "epsilon_plus": epsilon_plus,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon": epsilon_only,
    "epsilon_gamma": epsilon_gamma,
}


def get_composite(name: str) -> Composite:
    """Build the named composite with default parameters; ``epsilon_gamma:γ`` sets LRP-γ's ``γ``."""
    base, _, parameter = name.partition(":")
    if base not in COMPOSITES:
        raise InvalidOptionError(f"unknown LRP composite {name!r}; choose one of {sorted(COMPOSITES)}")
    if not parameter:
        return COMPOSITES[base]()
    try:
        gamma = float(parameter)
    except ValueError:
        gamma = float("nan")
    if base != "epsilon_gamma" or not 0 <= gamma < float("inf"):
        raise InvalidOptionError(f"LRP composite {name!r}: only 'epsilon_gamma:γ' takes a parameter, a number γ ≥ 0")
    return epsilon_gamma(gamma=gamma)
