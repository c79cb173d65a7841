"""Image preprocessing as tensor ops on the model's device, for a whole batch.

``Resize(resize) → CenterCrop(crop) → ToTensor → Normalize(mean, std)``, the torchvision
classification recipe, done with ``torch.nn.functional.interpolate`` (bilinear by default, antialiased) so it
runs where the model runs. :func:`crop_box` tells where the model input sits in the original image.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def resize_shorter(image: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``(3, H, W)`` float image so its shorter side is ``size`` (aspect kept; bilinear and
    bicubic antialiased like PIL, nearest as is); an image already at that size is left as it is."""
    h, w = image.shape[-2:]
    if h <= w:
        new_h, new_w = size, max(1, int(size * w / h))
    else:
        new_h, new_w = max(1, int(size * h / w)), size
    if (new_h, new_w) == (h, w):
        return image
    if interpolation == "nearest":
        return F.interpolate(image[None], size=(new_h, new_w), mode="nearest")[0]
    resized = F.interpolate(image[None], size=(new_h, new_w), mode=interpolation, align_corners=False,
                            antialias=True)[0]
    return resized.clamp_(0.0, 1.0) if interpolation == "bicubic" else resized


def center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Central ``crop × crop`` window of a ``(3, H, W)`` image (torchvision's rounding)."""
    h, w = image.shape[-2:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return image[..., top:top + crop, left:left + crop]


def crop_box(original_hw: Tuple[int, int], resize: int, crop: int) -> List[float]:
    """``[x0, y0, x1, y1]`` in original-image pixels of the region the model sees."""
    h, w = original_hw
    new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    sy, sx = h / new_h, w / new_w
    return [round(left * sx, 2), round(top * sy, 2), round((left + crop) * sx, 2), round((top + crop) * sy, 2)]


def to_model_input(images_uint8: Sequence[torch.Tensor], resize: int, crop: int, mean: Sequence[float],
                   std: Sequence[float], device: torch.device, interpolation: str = "bilinear"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``uint8`` ``(3, H, W)`` images of any sizes → normalised batch ``(N, 3, crop, crop)`` on
    ``device`` and the un-normalised [0, 1] crops (for overlays)."""
    crops = []
    pin = torch.device(device).type == "cuda"  # a page-locked uint8 source makes the copy asynchronous
    for image in images_uint8:
        if pin and image.device.type == "cpu":
            image = image.pin_memory()
        image = image.to(device, non_blocking=True).float().div_(255.0)
        crops.append(center_crop(resize_shorter(image, resize, interpolation), crop))
    batch = torch.stack(crops)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t, batch
