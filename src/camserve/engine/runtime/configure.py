"""One call that makes an explainer run the way its settings ask: memory format, then fast path."""

from __future__ import annotations

import torch

from camserve.engine.runtime.fast_path import build_fast_path
from camserve.engine.runtime.memory_format import choose_memory_format
from camserve.engine.runtime.settings import RuntimeSettings


def configure_runtime(explainer, settings: RuntimeSettings, device: torch.device) -> str:
    """Put ``explainer``'s model in the memory format ``settings`` ask for (measured when ``auto``) and
    attach the fast path at its default layer when one can be built; returns what was chosen and why
    (for the worker's log). Runs once, at load; the explainer is read-only afterwards."""
    layout = choose_memory_format(explainer.model, explainer.input_size, settings.memory_format)
    fast, why = build_fast_path(explainer.model, explainer.default_layer, explainer.input_size, settings, device)
    explainer.use_fast_path(fast)
    return f"memory format {layout.describe()}; fast path: {why}"
