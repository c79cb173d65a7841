"""Canonizers: how a relevance pass sees the model, chosen per explainer (and per deployment:
``handler.canonizer``). ``fold_bn`` must explain the model exactly as LRP explains the same network
with every BatchNorm fused into the convolution before it — the pretrained CIFAR ResNet-20, real
CIFAR-10 photographs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from camserve.engine import ExplainSpec, Explainer
from camserve.engine.lrp.canonizers import CANONIZERS, batchnorm_pairs


def fused_copy(model: nn.Module, input_size) -> nn.Module:
    """A copy of ``model`` with each (conv → BatchNorm) pair replaced by the fused conv and an identity."""
    fused = copy.deepcopy(model).eval()
    modules = dict(fused.named_modules())
    for conv, bn in batchnorm_pairs(fused, input_size).items():
        for name, new in ((conv, fuse_conv_bn_eval(modules[conv], modules[bn])), (bn, nn.Identity())):
            parent, _, leaf = name.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, leaf, new)
    return fused


@pytest.mark.parametrize("layer", ["layer1", "layer2"])
def test_fold_bn_explains_the_fused_network(resnet20, layer):
    model, images = resnet20
    specs = [ExplainSpec("shallowcam", layer=layer, options={"start": "target"})] * images.shape[0]
    folded = Explainer(model, (32, 32), canonizer="fold_bn").explain(images, specs, layer_resolution=True)
    fused = Explainer(fused_copy(model, (32, 32)), (32, 32)).explain(images, specs, layer_resolution=True)
    plain = Explainer(model, (32, 32)).explain(images, specs, layer_resolution=True)
    for a, b, c in zip(folded.explanations, fused.explanations, plain.explanations):
        assert torch.allclose(a.maps, b.maps, atol=2e-4), float((a.maps - b.maps).abs().max())
        assert float((a.maps - c.maps).abs().max()) > 0.02  # folding changes what relevance sees
    assert torch.equal(folded.logits, plain.logits)  # the prediction is the model's own, untouched


def test_canonizer_names_are_checked(resnet20):
    model, _ = resnet20
    assert sorted(CANONIZERS) == ["fold_bn", "fold_bn_nobias"]
    with pytest.raises(ValueError, match="unknown canonizer 'fold'"):
        Explainer(model, (32, 32), canonizer="fold")
