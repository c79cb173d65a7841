"""The head: what a classifier computes from its last feature map, rebuilt as a chain of its modules.

The gradient-free fast path runs the body on an optimised runtime and needs ``∂y_c/∂A`` at the last
map ``A`` only for Grad-CAM, Grad-CAM++ and LayerCAM. That gradient goes through the few modules
after ``A`` (EfficientNet-Lite: BatchNorm, ReLU6, average pooling, dropout, the linear classifier), so
:func:`trace_head` records, in one probe forward, the leaf modules that run after ``A`` is produced,
in call order, and :class:`ModelHead` re-runs them in PyTorch on the runtime's ``A`` (flattening before
a linear layer that reads a pooled ``(N, C, 1, 1)`` map). A head written with functional calls or a
skip connection is not a chain of modules: the rebuilt head then disagrees with the model on the
probe images and :func:`trace_head` returns ``None`` with the reason — such models keep gradient rows
on the eager engine.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


class ModelHead(nn.Module):
    """``y = head(A)``: the modules after the last map, applied in the order the model calls them."""

    def __init__(self, names: List[str], modules: List[nn.Module]):
        super().__init__()
        self.names = list(names)
        self.chain = nn.ModuleList(modules)  # the model's own modules (shared, not copied)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for module in self.chain:
            if isinstance(module, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = module(x)
        return x


def _leaves(model: nn.Module):
    return [(name, module) for name, module in model.named_modules() if name and not any(module.children())]


def trace_head(model: nn.Module, layer: str, input_size: Tuple[int, int], probes: int = 2,
               tolerance: float = 1e-4) -> Tuple[Optional[ModelHead], str, Optional[torch.Tensor]]:
    """``(head, reason, features)``: the chain of leaf modules that run after ``layer`` is left, checked
    on ``probes`` seeded random images (``max |head(A) − model(x)| ≤ tolerance · max(1, max |y|)``);
    ``head`` is ``None`` when the check fails or nothing runs after the layer, ``reason`` says why.
    Every hook is removed before this returns."""
    modules = dict(model.named_modules())
    target = modules[layer]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    calls: List[str] = []
    captured: List[torch.Tensor] = []
    after = [False]

    def on_layer(module, args, output):
        captured.append(output)
        after[0] = True
        calls.clear()

    def on_leaf(name):
        def hook(module, args, output):
            if after[0] and module is not target:
                calls.append(name)
        return hook

    handles = [target.register_forward_hook(on_layer)]
    try:
        handles += [module.register_forward_hook(on_leaf(name)) for name, module in _leaves(model)]
        generator = torch.Generator().manual_seed(0)
        worst, head, features = 0.0, None, None
        with torch.inference_mode():
            for _ in range(probes):
                captured.clear()
                after[0] = False
                x = torch.randn(1, 3, *input_size, generator=generator).to(device=device, dtype=dtype)
                y = model(x)
                if not captured:
                    return None, f"layer {layer!r} did not run in the probe forward", None
                if not calls:
                    return None, f"no module runs after layer {layer!r}", None
                head = ModelHead(list(calls), [modules[n] for n in calls])
                features = captured[-1]
                try:
                    rebuilt = head(features)
                except Exception as error:  # noqa: BLE001 - a head that is not a chain of modules
                    return None, f"the modules after {layer!r} ({', '.join(calls)}) are not a chain: {error}", None
                if rebuilt.shape != y.shape:
                    return None, (f"the modules after {layer!r} give shape {tuple(rebuilt.shape)}, the model "
                                  f"{tuple(y.shape)}"), None
                worst = max(worst, float((rebuilt - y).abs().max()) / max(1.0, float(y.abs().max())))
    finally:
        for handle in handles:
            handle.remove()
    if worst > tolerance:
        return None, (f"the modules after {layer!r} ({', '.join(head.names)}) do not reproduce the model's output "
                      f"(relative difference {worst:.2e}): the head has functional calls or a skip"), None
    return head, f"head {' → '.join(head.names)} (checked on {probes} probes, relative difference {worst:.1e})", features
