"""Exception types raised by the engine for bad input.

Every class derives from :class:`ExplanationInputError` (a ``ValueError``), so a caller such as a
TorchServe handler can turn any of them into an HTTP 400 with ``str(error)`` as the message, while
any other exception remains a server error.
"""


class ExplanationInputError(ValueError):
    """Base class: the request (not the server) is wrong. Maps to HTTP 400."""

    status = 400


class UnknownLayerError(ExplanationInputError):
    """The layer name is not a module path of the model."""


class NotAFeatureMapError(ExplanationInputError):
    """The layer exists but its output is not a (N, C, H, W) feature map."""


class InvalidTargetError(ExplanationInputError):
    """Target class index out of range, wrong count for the batch, or malformed."""


class InvalidInputError(ExplanationInputError):
    """The image batch is not a finite 4-D float tensor of the expected shape."""


class UnknownMethodError(ExplanationInputError):
    """The explanation method name is not registered."""


class InvalidOptionError(ExplanationInputError):
    """A method option has a wrong type or an out-of-range value."""


class InvalidReferenceError(ExplanationInputError):
    """A FAM reference (image, embedding, gallery, k) is unusable."""


class UnsupportedModelError(ExplanationInputError):
    """The method cannot explain this model or layer (e.g. LRP relevance through attention, CAM
    without a global-pooling linear classifier); the message names the reason."""
