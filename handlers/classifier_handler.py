"""TorchServe entry file for an image classifier (``torch-model-archiver --handler``).

TorchServe instantiates the single class defined here; all logic lives in
:mod:`camserve.serving.classifier` (shipped inside the archive, so the .mar is self-contained).
The model comes from the archive's spec (``handler.model`` in ``model-config.yaml``; the bundled
EfficientNet-Lite0 when absent), see ``camserve archive``.
"""

from camserve.serving.classifier import ImageClassifierHandler


class CamserveClassifierHandler(ImageClassifierHandler):
    """Any image classifier with explanations (model spec and defaults in model-config.yaml)."""
