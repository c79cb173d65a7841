"""Targets: which class score each image of a batch is explained for.

A target spec is one of ``None`` / ``"top1"`` (the predicted class), an ``int`` class index,
``"topK"`` / ``("top", K)`` (the K best classes: K maps for that image), or a list of ints.
Specs are validated against the number of classes before the forward; top-k are resolved from the
logits of that same forward.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Union

import torch

from camserve.engine.errors import InvalidTargetError

TargetSpec = Union[None, int, str, Sequence[int]]
_TOPK = re.compile(r"^top(\d+)$")


def validate_target(spec: TargetSpec, num_classes: int, max_k: int = 10) -> TargetSpec:
    """Check a target spec before the forward; returns it normalised (``"top1"``, int, list or ``"topK"``)."""
    if spec is None:
        return "top1"
    if isinstance(spec, bool):
        raise InvalidTargetError(f"target must be a class index or 'topK', not {spec!r}")
    if isinstance(spec, int):
        _check_index(spec, num_classes)
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text.lstrip("-").isdigit():
            return validate_target(int(text), num_classes, max_k)
        match = _TOPK.match(text)
        if not match:
            raise InvalidTargetError(f"target {spec!r} is neither a class index nor 'topK' (e.g. 'top1', 'top3')")
        k = int(match.group(1))
        if not 1 <= k <= min(max_k, num_classes):
            raise InvalidTargetError(f"target {spec!r}: k must be between 1 and {min(max_k, num_classes)}")
        return f"top{k}"
    if isinstance(spec, (list, tuple)):
        if not spec or len(spec) > max_k:
            raise InvalidTargetError(f"a target list needs 1 to {max_k} class indices, got {len(spec)}")
        return [validate_target(int(s) if not isinstance(s, bool) else s, num_classes, max_k) for s in spec]
    raise InvalidTargetError(f"target must be a class index or 'topK', not {type(spec).__name__}")


def _check_index(index: int, num_classes: int) -> None:
    if not 0 <= index < num_classes:
        raise InvalidTargetError(f"target class index {index} is out of range [0, {num_classes - 1}]")


def resolve_targets(spec: TargetSpec, logits_row: torch.Tensor) -> List[int]:
    """The class indices to explain for one image, given its logits from the forward."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        return list(spec)
    k = int(spec[3:]) if isinstance(spec, str) and spec.startswith("top") else 1
    return logits_row.topk(k).indices.tolist()


def one_hot_seed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``∂y_c/∂y``: a one-hot row per image on its target logit."""
    return torch.zeros_like(logits).scatter_(1, targets.view(-1, 1), 1.0)
