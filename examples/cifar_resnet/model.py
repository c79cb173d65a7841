"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, section 4.2), an example ``eager`` model file.

TorchServe's eager convention: ``torch-model-archiver --model-file model.py`` with one
``nn.Module`` class and ``--serialized-file`` a state dict. camserve builds it with the
constructor arguments of ``model-config.yaml`` (``handler.model.kwargs``, e.g. ``{depth: 20}``).

Stem ``conv1 (3→16, 3×3, no bias) → bn1 → ReLU``; stages ``layer1/2/3`` of ``n = (depth − 2)/6``
basic blocks with 16/32/64 channels (the first block of stages 2 and 3 with stride 2); a block is
``conv1 → bn1 → ReLU → conv2 → bn2`` plus the parameter-free shortcut ("option A": subsample
``x[:, :, ::2, ::2]`` and zero-pad ``planes // 4`` channels on each side where the shape changes),
then ReLU; global average pooling and ``linear`` (64 → 10). Input 32×32, ImageNet mean/std.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: ``pad(x[:, :, ::2, ::2])`` with ``pad`` zero channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """``ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for CIFAR-10 (``depth`` = 6n + 2: 20, 32, 44, 56, …)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))
