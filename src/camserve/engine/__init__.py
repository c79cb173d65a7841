"""camserve's explanation engine: pure PyTorch, no TorchServe import.

Public entry points: :class:`Explainer` (classifiers: CAM family and Shallow-CAM),
:class:`ExplainSpec`, the error types in :mod:`camserve.engine.errors`, and the model loaders in
:mod:`camserve.engine.models`.
"""

from camserve.engine.errors import (ExplanationInputError, InvalidInputError, InvalidOptionError, InvalidReferenceError,
                     InvalidTargetError, NotAFeatureMapError, UnknownLayerError, UnknownMethodError,
                     UnsupportedModelError)
from camserve.engine.pipeline import ExplainResult, ExplainSpec, Explainer, Explanation

__all__ = ["Explainer", "ExplainSpec", "ExplainResult", "Explanation", "ExplanationInputError",
           "InvalidInputError", "InvalidOptionError", "InvalidReferenceError", "InvalidTargetError",
           "NotAFeatureMapError", "UnknownLayerError", "UnknownMethodError", "UnsupportedModelError"]
