"""LayerCAM (Jiang et al., IEEE TIP 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps
for Localization")."""

import torch

from camserve.engine.methods.cam.base import CamMethod, Captured


class LayerCAM(CamMethod):
    """Element-wise weights ``w_kij = ReLU(∂y_c/∂A_kij)``; ``map = ReLU(Σ_k w_k ⊙ A_k)``."""

    name = "layercam"
    needs_gradient = True

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Positive part of the gradient, kept spatial."""
        return torch.relu(captured.gradients[layer])

    def compute(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """``ReLU(Σ_k w_k ⊙ A_k)`` with the product written into the fresh weights (the same
        products as the base class's, one full-size buffer instead of two at a shallow layer)."""
        weights = self.weights(layer, captured, options)
        return torch.relu(weights.mul_(captured.activations[layer]).sum(dim=1))
