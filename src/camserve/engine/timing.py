"""Honest wall-clock timing on any device.

CUDA kernels run asynchronously: ``time.perf_counter()`` read right after a kernel launch measures
the launch, not the work. :func:`clock` first waits for the device's queued work
(``torch.cuda.synchronize``) and then reads the timer, so ``clock(d) - start`` is the time the work
really took. On the CPU it is plain ``perf_counter``. Every engine and serving timing goes through it.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch


def synchronize(device: Optional[Any] = None) -> None:
    """Wait for the queued work of ``device`` (a ``torch.device``, a tensor, or ``None``: nothing to
    wait for on the CPU; the current CUDA device when CUDA is initialised)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: Optional[Any] = None) -> float:
    """``time.perf_counter()`` after :func:`synchronize` of ``device`` — a timer reading that includes
    every kernel queued before it."""
    synchronize(device)
    return time.perf_counter()
