"""TorchServe entry file for an embedding model (``torch-model-archiver --handler``).

TorchServe instantiates the single class defined here; all logic lives in
:mod:`camserve.serving.embedding`. The model comes from the archive's spec (``handler.model``,
task ``embed``; EfficientNet-Lite0 features when absent), see ``camserve archive``.
"""

from camserve.serving.embedding import EmbeddingHandler


class CamserveEmbeddingHandler(EmbeddingHandler):
    """Any image embedding model with FAM explanations (model spec and defaults in model-config.yaml)."""
