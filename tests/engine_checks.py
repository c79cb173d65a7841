"""Checks the engine tests share: no hook left on a model, and a request refused before the forward."""

from __future__ import annotations

import pytest

from camserve.engine import ExplanationInputError


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def refused_before_forward(explainer, images, specs, error, *fragments) -> str:
    """``explainer.explain(images, specs)`` raises ``error`` (a 400 :class:`ExplanationInputError`)
    whose message holds every fragment, before the model runs, leaving no hook; returns the message."""
    calls = []
    handle = explainer.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(error) as info:
            explainer.explain(images, specs)
    finally:
        handle.remove()
    assert isinstance(info.value, ExplanationInputError) and info.value.status == 400
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert calls == [], "validation must fail before the forward"
    assert no_hooks(explainer.model)
    return str(info.value)
