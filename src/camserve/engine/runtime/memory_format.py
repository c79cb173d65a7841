"""Contiguous or channels-last: measured on the worker's own device when it loads, not assumed.

Channels-last (NHWC) lets oneDNN and cuDNN run convolutions without layout conversions, which on this
project's CPUs took EfficientNet-Lite0 from 33.8 to 21.3 ms per image at batch 1 — and made it slower
at batch 8 in another run. So :func:`choose_memory_format` times both formats on the model itself,
interleaved, at batch 1 and at the serving batch size, and keeps channels-last only when it wins the
sum of the best times by at least ``margin``. Maps computed in either format are equal up to float
rounding (the golden answers' tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from camserve.engine.timing import clock

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class MemoryFormatChoice:
    """The chosen format's name and what the probe measured (best seconds per format; empty when the
    format was set, not measured)."""

    name: str
    measured: Dict[str, float]
    reason: str

    @property
    def torch_format(self) -> torch.memory_format:
        return FORMATS[self.name]

    def describe(self) -> str:
        times = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.measured.items())
        return f"{self.name} ({self.reason}{'; ' + times if times else ''})"


def format_of(model: nn.Module) -> torch.memory_format:
    """The memory format of ``model``'s 4-D parameters (channels-last or contiguous): the format its
    inputs are given in."""
    for param in model.parameters():  # a 1×1 kernel is both at once: the first one that tells
        if param.dim() == 4 and param.is_contiguous() != param.is_contiguous(memory_format=torch.channels_last):
            return torch.contiguous_format if param.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def apply_memory_format(model: nn.Module, name: str) -> nn.Module:
    """``model`` with its 4-D parameters and buffers in the named format (in place, returned)."""
    return model.to(memory_format=FORMATS[name])


def _timed_forward(model: nn.Module, images: torch.Tensor, name: str, device: torch.device) -> float:
    """Seconds of one inference-mode forward in format ``name`` (the parameters are converted outside
    inference mode: converted inside, they would become inference tensors that autograd refuses)."""
    apply_memory_format(model, name)
    with torch.inference_mode():
        start = clock(device)
        model(images.contiguous(memory_format=FORMATS[name]))
        return clock(device) - start


def choose_memory_format(model: nn.Module, input_size: Tuple[int, int], setting: str = "auto",
                         batch_sizes: Tuple[int, ...] = (1, 8), rounds: int = 3,
                         margin: float = 0.05) -> MemoryFormatChoice:
    """The format to serve in. ``setting`` other than ``auto`` is taken as is. ``auto`` times one
    inference-mode forward per format, batch size and round (a random image; formats interleaved so
    that a load change hits both), and picks channels-last when ``Σ_batch min(time)`` is at least
    ``margin`` below contiguous's. The model is left in the chosen format."""
    if setting != "auto":
        apply_memory_format(model, setting)
        return MemoryFormatChoice(setting, {}, "set by the archive")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    best = {name: {b: float("inf") for b in batch_sizes} for name in FORMATS}
    for batch in batch_sizes:
        images = torch.randn(batch, 3, *input_size, generator=generator).to(device=device, dtype=dtype)
        for name in FORMATS:  # warm-up: the first call of a format pays its one-time costs
            _timed_forward(model, images, name, device)
        for _ in range(rounds):
            for name in FORMATS:
                best[name][batch] = min(best[name][batch], _timed_forward(model, images, name, device))
    totals = {name: sum(times.values()) for name, times in best.items()}
    chosen = "channels_last" if totals["channels_last"] <= (1.0 - margin) * totals["contiguous"] else "contiguous"
    apply_memory_format(model, chosen)
    return MemoryFormatChoice(chosen, totals, f"measured at batch {'+'.join(map(str, batch_sizes))}")


__all__ = ["MemoryFormatChoice", "apply_memory_format", "choose_memory_format", "format_of", "FORMATS"]
