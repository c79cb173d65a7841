"""The fast path of an embedding model: its feature map ``A`` on OpenVINO.

FAM's pooled route (and its Jacobian and Grad-CAM-on-similarity routes) read the backbone's last map
``A`` and run only the small head ``A → GAP → projection → normalisation`` in PyTorch
(:meth:`~camserve.engine.models.embedding.EmbeddingModel.trace`). :func:`fast_features` compiles
``EmbeddingModel.features`` — ``extract_features`` or the forward up to the feature layer — on
OpenVINO, checks it against the eager backbone on seeded probe images, and returns a callable with the
same contract (images → ``A`` on the model's device) for the model's ``fast_features``. A model whose
own forward returns its embeddings does not go through ``features`` and keeps the eager forward.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from camserve.engine.runtime.fast_path import BF16_TOLERANCE, refusal, unavailable
from camserve.engine.runtime.openvino_forward import OpenVinoForward
from camserve.engine.runtime.settings import RuntimeSettings


class _Features(nn.Module):
    """``embedding_model.features`` as a module (what OpenVINO converts)."""

    def __init__(self, embedding_model: nn.Module):
        super().__init__()
        self.embedding_model = embedding_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_model.features(images, eager=True)


class OpenVinoFeatures:
    """``images → A`` on OpenVINO, on ``device`` (a fresh tensor per call: no state between requests)."""

    def __init__(self, forward: OpenVinoForward, device: torch.device):
        self.forward = forward
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)[0].to(self.device)


def fast_features(embedding_model, input_size: Tuple[int, int], settings: RuntimeSettings, device: torch.device,
                  threads: Optional[int] = None, tolerance: float = 1e-3
                  ) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], str]:
    """``(features on OpenVINO or None, why)`` for an :class:`EmbeddingModel`; refusals as
    :func:`~camserve.engine.runtime.fast_path.build_fast_path`'s (``fast_path: openvino`` makes them a
    ``RuntimeError``)."""
    def refuse(reason: str):
        return refusal(settings, reason)

    why = unavailable(settings, device)
    if why is not None:
        return refuse(why)
    if embedding_model.output_is_embedding:
        return refuse("the model's own forward returns its embeddings (no separate feature map to compile)")
    try:
        forward = OpenVinoForward(_Features(embedding_model), input_size, threads or torch.get_num_threads(),
                                  settings.precision)
    except Exception as error:  # noqa: BLE001 - a model OpenVINO cannot convert keeps the eager engine
        return refuse(f"OpenVINO could not convert the model: {type(error).__name__}: {error}")
    images = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = embedding_model.features(images.to(device), eager=True).float().cpu()
    got = forward(images)[0]
    worst = float((got - expected).abs().max()) / max(1e-12, float(expected.abs().max()))
    limit = tolerance if settings.precision == "float32" else BF16_TOLERANCE
    if worst > limit:
        return refuse(f"OpenVINO's feature map differs from the model's by {worst:.1e} (relative; limit {limit:.0e})")
    return OpenVinoFeatures(forward, device), (f"openvino {forward.version} feature map ({settings.precision}; "
                                               f"probe difference {worst:.1e})")
