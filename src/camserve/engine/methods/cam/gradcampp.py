"""Grad-CAM++ (Chattopadhay et al., WACV 2018, "Grad-CAM++: Generalized Gradient-based Visual
Explanations for Deep Convolutional Networks"), with the exponential-output closed form (eq. 19)."""

import torch

from camserve.engine.methods.cam.base import CamMethod, Captured


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
        total = activations.sum(dim=(2, 3), keepdim=True)
        # α = g² / (2g² + Σ A · g³ + ε), built in place (the same products and sums, in the same
        # order, as the expression: three full-size buffers instead of seven at a shallow layer)
        denominator = (g2 * grads).mul_(total)
        denominator.add_(2 * g2).add_(self.eps)
        alpha = g2.div_(denominator).masked_fill_(grads == 0, 0.0)
        del denominator
        return torch.relu(grads).mul_(alpha).sum(dim=(2, 3))
