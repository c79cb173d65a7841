"""Image decoding with limits: bytes or base64 text → ``uint8`` ``(3, H, W)`` tensor (RGB).

Three guards protect the worker: ``max_pixels`` (``W·H`` read from the header, before any pixel is
decoded → :class:`ImageTooLargeError`), the aspect ratio (:data:`MAX_ASPECT_RATIO`, also from the
header → :class:`ImageShapeError`) and PIL's own decompression-bomb check (:class:`DecompressionBombError`). EXIF orientation is applied so the crop box refers to the image
as a viewer shows it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from camserve.serving.errors import DecompressionBombError, ImageShapeError, ImageTooLargeError, InvalidBase64Error, InvalidImageError

DEFAULT_MAX_PIXELS = 40_000_000
#: longest side / shortest side. The model sees the central square of the shorter side, and the
#: resize to its input scales the longer side with it: a 1x40000 strip (40,000 pixels) would become
#: 256x10,240,000 floats (31 GB) before the crop. Beyond this ratio → 400 :class:`ImageShapeError`.
MAX_ASPECT_RATIO = 50


def b64decode(text: Union[str, bytes], what: str = "image") -> bytes:
    """Strict base64 (standard or URL-safe alphabet, optional ``data:…;base64,`` prefix)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="strict") if text.isascii() else None
        if text is None:
            raise InvalidBase64Error(f"{what}: base64 text must be ASCII")
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if not text:
        raise InvalidBase64Error(f"{what}: empty base64 string")
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidBase64Error(f"{what}: invalid base64 ({error})") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image",
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> torch.Tensor:
    """Encoded image bytes → RGB ``uint8`` tensor ``(3, H, W)`` (on the CPU; moved by preprocessing).
    Size and shape are checked from the header, before any pixel is decoded."""
    if not data:
        raise InvalidImageError(f"{what}: empty body, expected JPEG/PNG/WebP bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{what}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels")
            if min(width, height) < 1:
                raise ImageShapeError(f"{what}: {width}x{height} has no pixels")
            if max(width, height) > max_aspect_ratio * min(width, height):
                raise ImageShapeError(
                    f"{what}: {width}x{height} has an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
                    f"more than {max_aspect_ratio}:1 (the model sees only the central square of the shorter side)")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecompressionBombError(f"{what}: rejected as a decompression bomb ({error})") from None
    except (ImageTooLargeError, ImageShapeError):
        raise
    except UnidentifiedImageError:
        hint = ""
        if data.lstrip()[:1] in (b"{", b"["):
            hint = "; the body looks like JSON: send it with Content-Type: application/json"
        elif data.lstrip()[:2] == b"--" or b"Content-Disposition" in data[:512]:
            hint = "; the body looks like a multipart form: send it with its multipart/form-data Content-Type"
        raise InvalidImageError(f"{what}: not a decodable image (expected JPEG, PNG, WebP, …){hint}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(f"{what}: corrupt or truncated image ({error})") from None
    try:
        image = ImageOps.exif_transpose(image)
        array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise InvalidImageError(f"{what}: cannot convert to RGB ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_size(image: torch.Tensor) -> Tuple[int, int]:
    """``(width, height)`` of a ``(3, H, W)`` tensor."""
    return int(image.shape[-1]), int(image.shape[-2])
