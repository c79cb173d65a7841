"""Request-level errors: each failing request of a batch gets its own HTTP status and JSON message."""

from __future__ import annotations

from typing import Any, Dict

from camserve.engine.errors import ExplanationInputError


class RequestError(Exception):
    """Something wrong with one request; ``status`` is the HTTP status it is answered with."""

    status = 400
    phrase = "Bad Request"

    def __init__(self, message: str, status: int = None):
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def kind(self) -> str:
        return type(self).__name__


class InvalidJSONError(RequestError):
    """The body says ``application/json`` but does not parse."""


class InvalidBase64Error(RequestError):
    """A base64 image field does not decode."""


class InvalidImageError(RequestError):
    """The bytes are not a readable JPEG/PNG/WebP/… image."""


class ImageShapeError(InvalidImageError):
    """The image has no pixels, or an aspect ratio beyond ``MAX_ASPECT_RATIO`` (its resize would be huge)."""


class ImageTooLargeError(RequestError):
    """The image has more pixels than the handler's ``max_pixels``."""

    status = 413
    phrase = "Payload Too Large"


class AnswerTooLargeError(RequestError):
    """The answer would exceed the frontend's ``max_response_size`` (``handler.max_response_bytes``):
    sent, it would kill the worker and fail its whole batch; answered 413 for this request alone."""

    status = 413
    phrase = "Payload Too Large"


class DecompressionBombError(ImageTooLargeError):
    """PIL refused the image as a decompression bomb."""


class MissingInputError(RequestError):
    """No image (or reference) found in the request."""


class InvalidRequestOptionError(RequestError):
    """A serving option (format, colormap, overlay, topk, …) is wrong."""


PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}


def error_body(error: Exception) -> Dict[str, Any]:
    """The JSON answer for a failed request: ``{"error": {"status", "type", "message"}}``."""
    return {"error": {"status": status_of(error), "type": type(error).__name__, "message": str(error)}}


def status_of(error: Exception) -> int:
    """HTTP status: a :class:`RequestError`'s own, 400 for engine input errors, else 500."""
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, ExplanationInputError):
        return getattr(error, "status", 400)
    return 500


def is_client_error(error: Exception) -> bool:
    return isinstance(error, (RequestError, ExplanationInputError))
