"""Images in (a path, bytes, a PIL image, a numpy array or a tensor → encoded bytes) and maps out
(an answer's base64 PNGs → numpy arrays in [0, 1] and PIL images)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, List

import numpy as np
import torch
from PIL import Image


def image_bytes(image: Any) -> bytes:
    """Encoded image bytes for a request: a path's bytes as they are, bytes as they are, a PIL image /
    a ``(H, W, 3)`` uint8 array / a ``(3, H, W)`` uint8 or [0, 1] float tensor as PNG."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.is_floating_point():
            array = (array.clamp(0, 1) * 255).round().to(torch.uint8)
        image = array.permute(1, 2, 0).numpy() if array.dim() == 3 and array.shape[0] in (1, 3) else array.numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is a path, bytes, a PIL image, a numpy array or a tensor, not {type(image).__name__}")


def _png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def heatmap_arrays(explanation: Any) -> List[np.ndarray]:
    """An explanation's maps, one per target, as float arrays in [0, 1]: the PNG heatmaps at the
    model input's size (``format=png``) or the layer-resolution arrays (``format=array``)."""
    maps = explanation.maps
    if maps.arrays is not None:
        return [np.asarray(a, dtype=np.float32) for a in maps.arrays]
    return [np.asarray(_png(text), dtype=np.float32) / 255.0 for text in maps.heatmaps or []]


def overlay_images(explanation: Any) -> List[Image.Image]:
    """An explanation's overlays (asked for with ``overlay=1``) as PIL images, one per target."""
    return [_png(text) for text in explanation.maps.overlays or []]
