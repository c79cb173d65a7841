"""Grad-CAM (Selvaraju et al., ICCV 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization")."""

import torch

from camserve.engine.methods.cam.base import CamMethod, Captured


class GradCAM(CamMethod):
    """``w_k = (1/Z) Σ_ij ∂y_c/∂A_kij``; ``map = ReLU(Σ_k w_k A_k)``."""

    name = "gradcam"
    needs_gradient = True

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Spatial mean of the gradient, per channel."""
        return captured.gradients[layer].mean(dim=(2, 3))
