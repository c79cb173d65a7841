"""Rendering maps: normalise, upsample, colour, overlay — on the maps' device until PNG encoding.

Only :func:`encode_png` moves data to the host (the ``uint8`` result, 1 byte per pixel or 3 for
colour), because PNG compression is a host-side codec.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from camserve.engine.errors import InvalidOptionError

NORMALISE_EPS = 1e-7  # the same as pytorch-grad-cam's scale_cam_image


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling to [0, 1]: ``(m − min m) / (max(m − min m) + 1e-7)``; maps ``(n, h, w)``."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    shifted = maps - low
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + NORMALISE_EPS)


def upsample(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (half-pixel centres, ``align_corners=False``) of ``(n, h, w)`` maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def to_uint8(maps: torch.Tensor) -> torch.Tensor:
    """[0, 1] maps → ``uint8`` (round half up), on the same device."""
    return (maps.float().clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8)


# Colormaps as a few RGB control points, linearly interpolated into a 256-entry table.
_COLORMAPS = {
    "jet": [(0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)],
    "inferno": [(0.0, 0.0, 0.016), (0.341, 0.063, 0.431), (0.733, 0.216, 0.329), (0.976, 0.557, 0.035),
                (0.988, 1.0, 0.643)],
    "viridis": [(0.267, 0.005, 0.329), (0.231, 0.322, 0.545), (0.129, 0.569, 0.549), (0.369, 0.788, 0.384),
                (0.993, 0.906, 0.144)],
    "gray": [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
}
COLORMAPS = tuple(sorted(_COLORMAPS))


def colormap_table(name: str, device: torch.device) -> torch.Tensor:
    """A ``(256, 3)`` float table for ``name`` on ``device``."""
    try:
        points = torch.tensor(_COLORMAPS[name], dtype=torch.float32, device=device)
    except KeyError:
        raise InvalidOptionError(f"unknown colormap {name!r}; choose one of {list(COLORMAPS)}") from None
    position = torch.linspace(0, len(points) - 1, 256, device=device)
    low = position.floor().long().clamp(max=len(points) - 2)
    frac = (position - low)[:, None]
    return points[low] * (1 - frac) + points[low + 1] * frac


def colorize(maps: torch.Tensor, name: str = "jet") -> torch.Tensor:
    """[0, 1] maps ``(n, h, w)`` → RGB ``(n, h, w, 3)`` floats in [0, 1] through the colormap."""
    table = colormap_table(name, maps.device)
    return table[to_uint8(maps).long()]


def overlay(maps: torch.Tensor, images: torch.Tensor, name: str = "jet", alpha: float = 0.5) -> torch.Tensor:
    """Blend the coloured maps over RGB images ``(n, 3, h, w)`` in [0, 1]: ``(1−α)·image + α·colour``;
    returns ``(n, h, w, 3)`` in [0, 1]."""
    coloured = colorize(maps, name)
    return (1 - alpha) * images.permute(0, 2, 3, 1).float() + alpha * coloured


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of one ``(h, w)`` grayscale or ``(h, w, 3)`` RGB image in [0, 1] (or ``uint8``)."""
    from PIL import Image  # host-side codec

    data = image if image.dtype == torch.uint8 else to_uint8(image)
    array = data.cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def prepare_maps(maps: torch.Tensor, size: Optional[Sequence[int]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalise at layer resolution, then upsample to ``size`` (if given) and cast to ``dtype``."""
    maps = normalise(maps.float())
    if size is not None:
        maps = upsample(maps, tuple(size))
    return maps.to(dtype)
