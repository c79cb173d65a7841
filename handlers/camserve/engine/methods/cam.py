"""CAM (Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative Localization")."""

from typing import Optional

import torch
from torch import nn

from ..errors import NotAFeatureMapError
from .base import CamMethod, Captured


def classifier_of(model: nn.Module, channels: int) -> Optional[nn.Linear]:
    """The last ``nn.Linear`` of ``model`` that reads ``channels`` features (the GAP+FC head)."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            found = module
    return found


class CAM(CamMethod):
    """``w_k = W^fc_{c,k}`` (the classifier's weight for class ``c`` and channel ``k``);
    ``map = ReLU(Σ_k w_k A_k)``. Only for the map that feeds global average pooling and the FC."""

    name = "cam"

    def validate(self, layer, catalog, model) -> None:
        """The layer's channel count must match a linear classifier's input."""
        channels = catalog.feature_map(layer).output_shape[0]
        if classifier_of(model, channels) is None:
            raise NotAFeatureMapError(
                f"CAM needs the feature map that feeds global pooling and the linear classifier; "
                f"layer {layer!r} has {channels} channels and no nn.Linear reads that many")

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Rows of the classifier weight for each image's target."""
        fc = classifier_of(captured.model, captured.activations[layer].shape[1])
        return fc.weight.detach()[captured.targets]
