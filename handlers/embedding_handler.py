"""TorchServe entry file for the embedding model (``torch-model-archiver --handler``).

All logic lives in :mod:`camserve.serving.embedding`, shipped inside the archive.
"""

from camserve.serving.embedding import EmbeddingHandler


class EffnetLite0EmbeddingHandler(EmbeddingHandler):
    """EfficientNet-Lite0 image embeddings (D = 1280) with FAM explanations."""
