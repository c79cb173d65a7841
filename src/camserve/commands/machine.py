"""The machine a measurement ran on, as the reports write it."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (``""`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_description(device=None) -> str:
    """The GPU's name on a CUDA ``device``, else ``<processor>, <n> cores``."""
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"{cpu_model() or platform.machine()}, {os.cpu_count()} cores"
