"""Relevance-CAM (Lee et al., CVPR 2021, "Relevance-CAM: Your Model Already Knows Where to Look")."""

import torch

from camserve.engine.methods.cam.base import CamMethod, Captured
from camserve.engine.lrp.starts import START_OPTION_CHOICES, RelevanceStartOptions


class RelevanceCAM(RelevanceStartOptions, CamMethod):
    """``w_k = Σ_ij R^l_kij`` with ``R^l`` propagated by LRP from the class score;
    ``map = ReLU(Σ_k w_k A_k)``.

    ``start`` (the initial relevance at the logits, :func:`camserve.engine.core.targets.relevance_seed`):
    ``contrastive`` (the paper's ``+1`` on the target, ``−1/N`` on the others; the default, also
    ``contrastive=1``), ``target`` (``contrastive=0``), ``margin`` (the contrastive start as one
    output) or ``softmax`` (the softmax-gradient start after SGLRP, Iwana et al. 2019: the one
    virtual output ``z = y_t − Σ_{k≠t} q_k y_k``, ``q`` = the softmax of the other logits, with
    relevance ``z``; no per-class division by a logit); with it, ``temperature`` ``T``:
    ``q = softmax_{k≠t}(y / T)`` (1 when not given).
    """

    name = "relevancecam"
    family = "lrp"
    needs_relevance = True
    option_choices = {"contrastive": (True, None), **START_OPTION_CHOICES}
    DEFAULT_START = "contrastive"

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Total relevance per channel."""
        return captured.relevance(layer).sum(dim=(2, 3))
