"""What a classifier explanation is asked for and what it answers, and the input check — the types
the explainer and the Captum adapter share (so neither imports the other's module for them).

``ExplainSpec`` (method, layer, target, options) per image; ``Explanation`` (maps ``(k, H, W)`` in
[0, 1], layer, targets, passes, time) per explained image; ``ExplainResult`` (the one forward's
logits + the explanations) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from camserve.engine.errors import InvalidInputError
from camserve.engine.core.targets import TargetSpec


@dataclass
class ExplainSpec:
    """What one request asks for: a method, a layer (``None`` = the explainer's default), a
    target (``None``/``"top1"``, a class index, ``"topK"`` or a list) and method options."""

    method: str
    layer: Optional[str] = None
    target: TargetSpec = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Explanation:
    """The maps of one image: ``maps`` ``(k, H, W)`` in [0, 1] for the ``k`` explained targets.

    ``seconds`` is this image's share of the batch's work: the shared forward divided by the batch's
    images, each backward pass divided by the rows it served, each method's map computation divided
    by its rows, plus its own normalisation/upsampling; ``batch_seconds`` is the whole batched call
    (what the image waited for). Timers synchronise CUDA first (:func:`camserve.engine.timing.clock`).
    """

    method: str
    layer: str
    targets: List[int]
    maps: torch.Tensor
    layer_shape: Tuple[int, int]
    options: Dict[str, Any]
    seconds: float
    passes: Dict[str, int]
    batch_seconds: float = 0.0


@dataclass
class ExplainResult:
    """Logits ``(N, classes)`` of the single forward and, per image, its :class:`Explanation` or ``None``."""

    logits: torch.Tensor
    explanations: List[Optional[Explanation]]
    forward_seconds: float = 0.0
    #: per image, the forward that served it: ``"eager"`` (this engine) or a fast path's name
    #: (``"openvino"``, :mod:`camserve.engine.runtime.fast_path`); empty means all eager
    paths: List[str] = field(default_factory=list)

    def path(self, index: int) -> str:
        """The forward that served image ``index``."""
        return self.paths[index] if self.paths else "eager"


def check_images(images: torch.Tensor, channels: int = 3) -> None:
    """A finite float batch ``(N, channels, H, W)`` with ``N ≥ 1``; else :class:`InvalidInputError`."""
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(f"images must be a tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InvalidInputError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[1] != channels:
        raise InvalidInputError(f"images must have N ≥ 1 and {channels} channels, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InvalidInputError(f"images must be floating point, got {images.dtype}")
    # one reduction: a NaN or an infinity makes the sum non-finite; a non-finite sum of finite values
    # (overflow) is settled element by element (the elementwise test alone costs 0.5 ms per 224² image)
    if not torch.isfinite(images.sum()) and not torch.isfinite(images).all():
        raise InvalidInputError("images contain NaN or infinite values")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
