"""TorchServe entry file for the image classifier (``torch-model-archiver --handler``).

TorchServe instantiates the single class defined here; all logic lives in
:mod:`camserve.serving.classifier` (shipped inside the archive, so the .mar is self-contained).
"""

from camserve.serving.classifier import ImageClassifierHandler


class EffnetLite0Handler(ImageClassifierHandler):
    """EfficientNet-Lite0 ImageNet classifier with explanations (defaults in model-config.yaml)."""
