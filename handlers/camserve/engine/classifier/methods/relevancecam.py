"""Relevance-CAM (Lee et al., CVPR 2021, "Relevance-CAM: Your Model Already Knows Where to Look")."""

import torch

from .base import CamMethod, Captured


class RelevanceCAM(CamMethod):
    """``w_k = Σ_ij R^l_kij`` with ``R^l`` propagated by LRP from the (contrastive) class score;
    ``map = ReLU(Σ_k w_k A_k)``."""

    name = "relevancecam"
    needs_relevance = True
    option_choices = {"contrastive": (True, None)}

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Total relevance per channel."""
        return captured.relevance(layer).sum(dim=(2, 3))
