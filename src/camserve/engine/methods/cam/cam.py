"""CAM (Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative Localization")."""

from typing import Optional

import torch
from torch import nn

from camserve.engine.errors import NotAFeatureMapError, UnsupportedModelError
from camserve.engine.core.layers import LayerCatalog
from camserve.engine.methods.cam.base import CamMethod, Captured


def classifier_of(model: nn.Module, channels: int) -> Optional[nn.Linear]:
    """The last ``nn.Linear`` of ``model`` that reads ``channels`` features (the GAP+FC head)."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            found = module
    return found


def classifier_for(layer: str, catalog: LayerCatalog, model: nn.Module) -> nn.Linear:
    """The linear classifier the pooled map of ``layer`` feeds: the first ``nn.Linear`` that runs
    after ``layer`` is left, which must read the layer's ``C`` channels and give the logits (the
    last linear layer, ``out_features`` = the model's outputs). Otherwise CAM's
    ``y_c = Σ_k W_{c,k} · GAP(A_k) + b_c`` does not hold: :class:`NotAFeatureMapError` (token
    layers: :class:`UnsupportedModelError`), naming the reason."""
    info = catalog.feature_map(layer)
    if info.layout == "tokens":
        raise UnsupportedModelError(
            f"CAM needs the feature map that global average pooling feeds to a linear classifier; layer "
            f"{layer!r} is a token sequence whose classifier reads the class token — use gradcam, gradcampp or "
            f"layercam")
    channels = info.map_shape[0]
    modules = dict(model.named_modules())
    after = [n for n in catalog.names()
             if catalog.layers[n].entered > info.exited and isinstance(modules.get(n), nn.Linear)]
    if not after:
        raise NotAFeatureMapError(f"CAM needs the feature map that feeds global pooling and the linear classifier; "
                                  f"no nn.Linear runs after layer {layer!r}")
    fc = modules[after[0]]
    if fc.in_features != channels:
        raise NotAFeatureMapError(
            f"CAM needs the feature map that feeds global pooling and the linear classifier; layer {layer!r} has "
            f"{channels} channels but the first linear layer after it, {after[0]!r}, reads {fc.in_features} features")
    outputs = catalog.output_shape[-1] if catalog.output_shape else fc.out_features
    if len(after) > 1 or fc.out_features != outputs:
        raise NotAFeatureMapError(
            f"CAM needs the feature map that feeds global pooling and the linear classifier; {after[0]!r} after "
            f"layer {layer!r} is a hidden layer ({fc.out_features} outputs feeding {after[-1]!r}), not the classifier")
    return fc


class CAM(CamMethod):
    """``w_k = W^fc_{c,k}`` (the classifier's weight for class ``c`` and channel ``k``);
    ``map = ReLU(Σ_k w_k A_k)``. Only for the map that feeds global average pooling and the FC."""

    name = "cam"

    def validate(self, layer, catalog, model) -> None:
        """The first linear layer after ``layer`` must read its channels and be the classifier."""
        classifier_for(layer, catalog, model)

    def weights(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """Rows of the classifier weight for each image's target."""
        if captured.catalog is not None:
            fc = classifier_for(layer, captured.catalog, captured.model)
        else:
            fc = classifier_of(captured.model, captured.activations[layer].shape[1])
        return fc.weight.detach()[captured.targets]
