"""Shallow-CAM: class activation maps that stay faithful at shallow layers.

Reconstruction of "Shallow class activation mapping based on spatial weights and inter-layer
correlation" (Computer Science 52(6A), 2025; the paper gives no code). Relevance is propagated by
LRP from the class score with contrastive initial relevance (``+1`` on the target logit, ``−1/N``
on the others) down through the layer ``l+1`` above the target layer ``l`` and one step further to
``l``; the relevance that ``l``'s channels receive from ``l+1`` gives the inter-layer weights.
"""

import torch
import torch.nn.functional as F

from .base import CamMethod, Captured


class ShallowCAM(CamMethod):
    """``β_k = Σ_ij R^l_kij / max_k |Σ_ij R^l_kij|`` (sign kept);
    spatial weights ``S = ReLU(∂y_c/∂A^l)`` (``spatial="gradient"``, LayerCAM-style, the paper's
    reading) or the gradient-free ``S = ReLU(R^l / A^l)`` (``spatial="relevance"``, the default,
    chosen by the deletion/insertion evaluation);
    ``map_l = ReLU(Σ_k β_k · S_k ⊙ A^l_k)``.
    With ``refine=True`` (coarse-to-fine) the map is multiplied by the min-max-normalised map of
    layer ``l+1``, computed the same way and upsampled bilinearly to ``l``'s resolution.
    """

    name = "shallowcam"
    needs_relevance = True
    option_choices = {
        # default chosen by measurement (benchmarks/results/faithfulness.md): the gradient-free
        # spatial weights had the best mean overall score over the 8 stages (0.327 vs 0.267) and
        # need no ordinary backward pass; refining with l+1 did not help on average.
        "spatial": ("relevance", ("gradient", "relevance")),
        "refine": (False, None),
        "contrastive": (True, None),
    }
    eps = 1e-12

    def needs_gradient_for(self, options) -> bool:
        """Only the gradient spatial weights need an ordinary backward pass."""
        return options["spatial"] == "gradient"

    def layers(self, layer, catalog, options):
        """``l`` and, for the coarse-to-fine variant, ``l+1``."""
        return [layer, catalog.layer_above(layer)] if options["refine"] else [layer]

    def _single(self, layer: str, captured: Captured, options) -> torch.Tensor:
        activations = captured.activations[layer]
        relevance = captured.relevance(layer)
        beta = relevance.sum(dim=(2, 3))
        beta = beta / beta.abs().amax(dim=1, keepdim=True).clamp_min(self.eps)
        if options["spatial"] == "gradient":
            spatial = torch.relu(captured.gradients[layer])
        else:
            spatial = torch.relu(captured.relevance_gradients[layer])  # = ReLU(R^l / A^l)
        return torch.relu((beta[:, :, None, None] * spatial * activations).sum(dim=1))

    def compute(self, layer, captured: Captured, options) -> torch.Tensor:
        """The map at ``l`` (optionally refined by ``l+1``), shape ``(n, h, w)``."""
        cam = self._single(layer, captured, options)
        if options["refine"]:
            above = [name for name in captured.activations if name != layer][0]
            coarse = self._single(above, captured, options)
            coarse = F.interpolate(coarse[:, None], size=cam.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            low = coarse.amin(dim=(1, 2), keepdim=True)
            coarse = (coarse - low) / (coarse.amax(dim=(1, 2), keepdim=True) - low + 1e-7)
            cam = cam * coarse
        return cam
