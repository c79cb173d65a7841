"""Lean gradients: segments that compute their ordinary gradient from their input and output, so a
gradient pass at a shallow layer need not keep autograd's saved tensors (``engine/core/lean_gradient.py``).

The gradients must be the ones plain autograd gives — bit for bit on the CPU, because Grad-CAM++'s
α amplifies float noise — and a conv whose forward the verified geometry does not reproduce must
keep its graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine import Explainer
from camserve.engine.capture import ForwardCapture
from camserve.engine.core.lean_gradient import trace_conv_geometries
from camserve.engine.models import load_torchvision


def _gradient(model, explainer, x, layer, geometry):
    """``∂ y_top1 / ∂ A^layer`` from one capture; returns (gradient, capture counters)."""
    rules = explainer._rules_above([layer])
    with ForwardCapture(model, [layer], rules, grad_from=layer, gradient_passes=True,
                        conv_geometry=geometry) as capture, torch.enable_grad():
        with torch.no_grad():
            logits = model(x)
        seed = torch.zeros_like(logits)
        seed[range(x.shape[0]), logits.argmax(1)] = 1.0
        (grad,) = torch.autograd.grad(logits, [capture.activations[layer]], seed)
        counts = {"switches": capture.switches, "absorbed": capture.absorbed, "lean": capture.lean}
    return grad, counts


@pytest.mark.parametrize("layer", ["_blocks.0", "_blocks.2", "_blocks.10"])
def test_effnet_lean_gradient_is_autograds_bit_for_bit(effnet, effnet_batch, layer):
    explainer = Explainer(effnet, (224, 224))
    x = effnet_batch[0][:4]
    plain, plain_counts = _gradient(effnet, explainer, x, layer, {})
    lean, counts = _gradient(effnet, explainer, x, layer, explainer._conv_geometry)
    assert torch.equal(plain, lean)
    assert plain_counts["lean"] == 0
    # every switch above the layer is lean except the ε-ruled classifier (its own graph is its rule)
    assert counts["lean"] == counts["switches"] - 1 and counts["absorbed"] > 0


def test_geometry_is_verified_for_every_effnet_and_resnet_conv(effnet):
    geometry, _ = trace_conv_geometries(effnet, (224, 224))
    convs = [name for name, m in effnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(geometry) == sorted(convs)
    assert geometry["_conv_stem"].pads == (0, 1, 0, 1)  # TF "same" at stride 2: asymmetric
    resnet = load_torchvision("resnet18").eval()
    geometry, _ = trace_conv_geometries(resnet, (64, 64))
    assert len(geometry) == sum(isinstance(m, nn.Conv2d) for m in resnet.modules())
    assert geometry["conv1"].padding == (3, 3) and geometry["conv1"].pads == (0, 0, 0, 0)


class _FlippedConv(nn.Conv2d):
    """A conv whose forward the geometry cannot know (it mirrors its input first)."""

    def forward(self, x):
        return super().forward(torch.flip(x, dims=(-1,)))


class _ReflectConv(nn.Conv2d):
    """A conv that pads by reflection in its forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias)


def test_unverifiable_convs_keep_their_graph_and_the_gradient_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        _FlippedConv(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        _ReflectConv(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(-1.0, 2.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, -1.0, 1.5)
    explainer = Explainer(model, (32, 32))
    assert sorted(explainer._conv_geometry) == ["0", "9"]  # the flipped and reflecting convs are refused
    x = torch.randn(3, 3, 32, 32)
    plain, _ = _gradient(model, explainer, x, "0", {})
    lean, counts = _gradient(model, explainer, x, "0", explainer._conv_geometry)
    assert torch.equal(plain, lean)
    # lean: conv 9's segment and the pass segments headed by BN 4 and BN 7 (their convs keep graphs)
    assert counts["lean"] > 0


def test_batchnorm_in_training_mode_keeps_its_graph(effnet, effnet_batch):
    model = copy.deepcopy(effnet)
    explainer = Explainer(model, (224, 224))
    model._blocks[12]._bn1.train()  # batch statistics: the gradient needs the input
    x = effnet_batch[0][:2]
    plain, _ = _gradient(model, explainer, x, "_blocks.10", {})
    lean, counts = _gradient(model, explainer, x, "_blocks.10", explainer._conv_geometry)
    assert torch.allclose(plain, lean, rtol=1e-5, atol=1e-9 * plain.abs().max())
    assert counts["lean"] < counts["switches"] - 1


def test_resnet_lean_gradient_with_in_place_residual_adds():
    """torchvision's ``out += identity`` changes a lean segment's output in place after the hook."""
    model = load_torchvision("resnet18").eval()
    explainer = Explainer(model, (64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for layer in ("layer1", "layer2.0.bn1", "layer3"):
        plain, _ = _gradient(model, explainer, x, layer, {})
        lean, counts = _gradient(model, explainer, x, layer, explainer._conv_geometry)
        assert counts["lean"] > 0
        assert torch.allclose(plain, lean, rtol=1e-5, atol=1e-6 * plain.abs().max()), layer


def test_relevance_with_geometry_equals_relevance_through_the_modules(effnet, effnet_batch):
    """Relevance passes evaluate z⁺ from the verified geometry (symmetric padding folded into the
    conv, no padded copy); the relevance is the one the modules' own forward gives."""
    from camserve.engine.lrp.rules import stabilize
    from camserve.engine.lrp.starts import contrastive_seed

    explainer = Explainer(effnet, (224, 224))
    x = effnet_batch[0][:2]
    rules = explainer._rules_above(["_blocks.2"])

    def relevance(geometry):
        with ForwardCapture(effnet, ["_blocks.2"], rules, grad_from="_blocks.2", gradient_passes=False,
                            conv_geometry=geometry) as capture, torch.enable_grad():
            with torch.no_grad():
                logits = effnet(x)
            capture.mode = "relevance"
            seed = contrastive_seed(logits, logits.argmax(1), True) / stabilize(logits.detach(), 1e-12)
            activation = capture.activations["_blocks.2"]
            (grad,) = torch.autograd.grad(logits, [activation], seed)
        return (activation * grad).detach()

    through_modules, from_geometry = relevance({}), relevance(explainer._conv_geometry)
    assert torch.allclose(from_geometry, through_modules, rtol=1e-4, atol=1e-5 * through_modules.abs().max())
