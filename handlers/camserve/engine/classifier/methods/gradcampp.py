"""Grad-CAM++ (Chattopadhay et al., WACV 2018, "Grad-CAM++: Generalized Gradient-based Visual
Explanations for Deep Convolutional Networks"), with the exponential-output closed form (eq. 19)."""

import torch

from .base import CamMethod, Captured


class GradCAMPlusPlus(CamMethod):
    """``α_kij = g² / (2g² + Σ_ab A_kab · g³)`` (0 where ``g = 0``), ``g = ∂y_c/∂A_kij``;
    ``w_k = Σ_ij α_kij ReLU(g_kij)``; ``map = ReLU(Σ_k w_k A_k)``."""

    name = "gradcampp"
    needs_gradient = True
    eps = 1e-6

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Second/third-order gradient weighting of positive gradients."""
        grads = captured.gradients[layer]
        activations = captured.activations[layer]
        g2 = grads.pow(2)
        g3 = g2 * grads
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + self.eps)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * torch.relu(grads)).sum(dim=(2, 3))
