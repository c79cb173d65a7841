"""The gradient-free fast path: rows that need only the last feature map and the head.

A row qualifies when it asks for no explanation (a plain prediction), or for a CAM-family method
(CAM, Grad-CAM, Grad-CAM++, LayerCAM) at the layer the runtime exports — the served default, the last
map before pooling — with no relevance pass. Its image is forwarded **once**, on OpenVINO, which
returns the logits and that map ``A``; CAM's maps come from ``A`` and the classifier's weights, and the
gradient methods' ``∂y_c/∂A`` from a backward through the rebuilt :class:`~camserve.engine.runtime.head.ModelHead`
alone (a few modules on a 7×7 map). Every other row (shallow layers, relevance, Captum) runs on the
eager engine, in the same call. :meth:`FastPath.describe` says what was built and why.

Maps equal the eager engine's up to float rounding: OpenVINO's float32 convolutions differ from
PyTorch's in the last bits (logits within about 1e-5 relative on EfficientNet-Lite0); the tests check
maps within 1e-3 and identical top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from camserve.engine.runtime.head import ModelHead, trace_head
from camserve.engine.runtime.memory_format import format_of
from camserve.engine.runtime.openvino_forward import OpenVinoForward, openvino_available
from camserve.engine.runtime.settings import RuntimeSettings

#: the name answers carry for each path
EAGER, OPENVINO = "eager", "openvino"
#: bfloat16 keeps 8 bits of mantissa: its outputs may differ from float32's by a few per cent
BF16_TOLERANCE = 0.1


@dataclass
class FastPath:
    """A compiled forward with the map at ``layer`` as a second output, and the head above it (or
    ``None``: then only rows that need no gradient qualify)."""

    forward: OpenVinoForward  # images → (logits, the map at ``layer``)
    layer: str
    head: Optional[ModelHead]
    reason: str
    name: str = OPENVINO

    def serves(self, row) -> bool:
        """Whether a planned row (``None``: a plain prediction) can be answered from this path."""
        if row is None:
            return True
        if row.own_forwards or row.method.family != "cam" or tuple(row.layers) != (self.layer,):
            return False
        if row.method.needs_relevance_for(row.options):
            return False
        return self.head is not None or not row.method.needs_gradient_for(row.options)

    def describe(self) -> str:
        return f"{self.name} {self.forward.version} at {self.layer!r} ({self.forward.precision}; {self.reason})"


def refusal(settings: RuntimeSettings, reason: str) -> Tuple[None, str]:
    """``(None, reason)``: the eager engine serves; with ``fast_path: openvino`` (required) a
    ``RuntimeError`` instead, so that the worker does not load."""
    if settings.fast_path == "openvino":
        raise RuntimeError(f"handler.runtime.fast_path=openvino: {reason}")
    return None, reason


def unavailable(settings: RuntimeSettings, device: torch.device) -> Optional[str]:
    """Why no OpenVINO path can run on this worker at all (turned off, not a CPU, not installed), or
    ``None``."""
    if settings.fast_path == "off":
        return "off by the archive (handler.runtime.fast_path)"
    if device.type != "cpu":
        return f"the OpenVINO path runs on CPUs; this worker runs on {device}"
    if not openvino_available():
        return "OpenVINO is not installed (pip install 'camserve[fast]')"
    return None


def build_fast_path(model: nn.Module, layer: str, input_size: Tuple[int, int], settings: RuntimeSettings,
                    device: torch.device, threads: Optional[int] = None,
                    tolerance: float = 1e-3) -> Tuple[Optional[FastPath], str]:
    """``(fast path or None, why)`` for a loaded classifier: built when ``settings.fast_path`` allows,
    the worker runs on a CPU and OpenVINO is installed, and checked against the eager model on seeded
    probe images (logits and ``A`` within ``tolerance`` relative to their largest magnitude). With
    ``fast_path="openvino"`` a path that cannot be built is a ``RuntimeError`` (the worker does not
    load); with ``auto`` the reason is returned and the eager engine serves everything."""
    def refuse(reason: str):
        return refusal(settings, reason)

    why = unavailable(settings, device)
    if why is not None:
        return refuse(why)
    head, head_reason, _ = trace_head(model, layer, input_size)
    try:
        forward = OpenVinoForward.with_features(model, layer, input_size, threads or torch.get_num_threads(),
                                                settings.precision)
    except Exception as error:  # noqa: BLE001 - a model OpenVINO cannot convert keeps the eager engine
        return refuse(f"OpenVINO could not convert the model: {type(error).__name__}: {error}")
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, *input_size, generator=generator)
    seen = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.inference_mode():
            logits = model(images.contiguous(memory_format=format_of(model)))
    finally:
        handle.remove()
    fast_logits, features = forward(images)
    worst = max(_relative(fast_logits, logits), _relative(features, seen[-1]))
    limit = tolerance if settings.precision == "float32" else BF16_TOLERANCE
    if worst > limit:
        return refuse(f"OpenVINO's outputs differ from the model's by {worst:.1e} (relative; limit {limit:.0e})")
    path = FastPath(forward, layer, head, f"probe difference {worst:.1e}; " + head_reason)
    return path, path.describe()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.detach().float().contiguous()
    return float((a.float() - b).abs().max()) / max(1e-12, float(b.abs().max()))

