"""FG-CAM (Qiu et al., AAAI 2024) as served by ``fgcam``: against the paper's procedure written out
by hand on a small network, against Grad-CAM's components propagated from the last map on the
pretrained CIFAR ResNet-20, batching, class sensitivity, names and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.capture import ForwardCapture
from camserve.engine.core.rank_correlation import spearman_rows
from camserve.engine.errors import InvalidOptionError, UnsupportedModelError
from camserve.engine.imaging.render import normalise
from camserve.engine.lrp.composites import epsilon_plus
from camserve.engine.methods import REGISTRY
from camserve.engine.methods.lrp.fgcam import FGCAM

from engine_checks import no_hooks, refused_before_forward


class SmallNet(nn.Module):
    """conv–BN–ReLU–max pool, conv–BN (a signed map), a grouped conv–BN–ReLU, GAP, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU()
        self.gap, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act3(self.bn3(self.conv3(self.bn2(self.conv2(x)))))
        return self.fc(self.flat(self.gap(x)))


def _bn(x, bn):
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return (x - bn.running_mean.double()[:, None, None]) * scale[:, None, None] + bn.bias.double()[:, None, None]


def _zplus(x, conv, relevance):
    """The paper's convolution rule, one group at a time: each output's relevance shared among the
    products ``x_i w_ij`` of one sign with it (``x⁺w⁺`` and ``x⁻w⁻``), ``z_j = Σ_i (x⁺w⁺ + x⁻w⁻)_ij + b⁺_j``
    (camserve's z⁺ keeps the positive bias in the denominator)."""
    h, w = x.shape[-2:]
    groups, weight, bias = conv.groups, conv.weight.double(), conv.bias.double().clamp(min=0)
    cin, cout = x.shape[0] // groups, weight.shape[0] // groups
    out = []
    for g in range(groups):
        cols = F.unfold(x[None, g * cin:(g + 1) * cin], 3, padding=1)[0]  # (cin·9, L)
        w_g = weight[g * cout:(g + 1) * cout].reshape(cout, -1)
        w_pos, w_neg, c_pos, c_neg = w_g.clamp(min=0), w_g.clamp(max=0), cols.clamp(min=0), cols.clamp(max=0)
        z = w_pos @ c_pos + w_neg @ c_neg + bias[g * cout:(g + 1) * cout, None]
        ratio = torch.where(z != 0, relevance[g * cout:(g + 1) * cout].reshape(cout, -1) / z, torch.zeros_like(z))
        shared = c_pos * (w_pos.T @ ratio) + c_neg * (w_neg.T @ ratio)
        out.append(F.fold(shared[None], (h, w), 3, padding=1)[0])
    return torch.cat(out)


def paper_fgcam(model: SmallNet, image: torch.Tensor, target: int) -> dict:
    """FG-CAM written out for one image: Grad-CAM's components ``α_k A_k`` at the last map (the
    ReLU before pooling), raised layer by layer (BN, ReLU: unchanged; conv: z⁺; max pool: to each
    window's maximum), summed over channels and ReLU'd at each layer. Float64, no LRP engine."""
    m = model
    with torch.no_grad():
        a1 = F.conv2d(image.double()[None], m.conv1.weight.double(), m.conv1.bias.double(), padding=1)[0]
        r1 = torch.relu(_bn(a1, m.bn1))
        p, where = F.max_pool2d(r1[None], 2, return_indices=True)
        p, where = p[0], where[0]
        a2 = F.conv2d(p[None], m.conv2.weight.double(), m.conv2.bias.double(), padding=1)[0]
        n2 = _bn(a2, m.bn2)
        a3 = F.conv2d(n2[None], m.conv3.weight.double(), m.conv3.bias.double(), padding=1, groups=2)[0]
    last = torch.relu(_bn(a3, m.bn3)).requires_grad_(True)
    score = (m.fc.weight.double() @ last.mean(dim=(1, 2)) + m.fc.bias.double())[target]
    (gradient,) = torch.autograd.grad(score, last)
    components = gradient.mean(dim=(1, 2))[:, None, None] * last.detach()  # Grad-CAM's α_k · A_k
    relevance = {"act3": components, "conv3": components}
    relevance["bn2"] = relevance["conv2"] = _zplus(n2, m.conv3, components)
    relevance["pool"] = _zplus(p, m.conv2, relevance["bn2"])
    spread = torch.zeros_like(r1).flatten(1)
    spread.scatter_(1, where.flatten(1), relevance["pool"].flatten(1))  # winner takes all
    relevance["act1"] = relevance["conv1"] = spread.view_as(r1)
    return {name: torch.relu(r.sum(dim=0)) for name, r in relevance.items()}


@pytest.mark.parametrize("layer", ["act1", "pool", "bn2", "conv3", "act3"])
def test_fgcam_equals_the_papers_procedure_written_out(layer):
    """Batched ``fgcam`` (top-1, a fixed class, top-2 in one call) = the per-image float64
    propagation of Grad-CAM's components, at every layer, including a signed map below a grouped conv
    (to 1e-3 of the map's range: the engine's BatchNorm pass rule divides by its input stabilised by
    1e-6, which shows where a pre-BN value is near zero)."""
    model = SmallNet()
    explainer = Explainer(model, (16, 16))
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    specs = [ExplainSpec("fgcam", layer), ExplainSpec("fg-cam", layer, 3), ExplainSpec("fg_cam", layer, "top2")]
    result = explainer.explain(images, specs, layer_resolution=True)
    assert no_hooks(model)
    for i, explanation in enumerate(result.explanations):
        assert explanation.method == "fgcam" and explanation.options == {"start": "target"}
        assert explanation.passes == {"forward": 1, "backward": 0, "relevance": 1 if i < 2 else 2}
        for k, target in enumerate(explanation.targets):
            expected = normalise(paper_fgcam(model, images[i], target)[layer][None].float())[0]
            assert torch.allclose(explanation.maps[k], expected, atol=1e-3), \
                (layer, i, target, (explanation.maps[k] - expected).abs().max())


def fgcam_from_the_last_map(model, image, target, layer, last_map):
    """Grad-CAM's components at ``last_map`` (``mean_ij ∂y_c/∂A`` · ``A``) as the relevance there,
    propagated to ``layer`` by the explainer's default rules (epsilon_plus) in one relevance pass
    seeded at that map, not at the logits; ``ReLU(Σ_k R^l_k)``."""
    rules = epsilon_plus().assign(model.named_modules())
    with ForwardCapture(model, [layer, last_map], rules, grad_from=layer) as capture, torch.enable_grad():
        with torch.no_grad():
            logits = model(image[None])
        top = capture.activations[last_map]
        (gradient,) = torch.autograd.grad(logits[0, target], top, retain_graph=True)
        capture.mode = "relevance"
        seed = gradient.mean(dim=(2, 3), keepdim=True).expand_as(top)  # R^H = α ⊙ A^H: g^H = α
        (relevance_gradient,) = torch.autograd.grad(top, capture.activations[layer], seed)
        relevance = capture.activations[layer].detach() * relevance_gradient
    return torch.relu(relevance[0].sum(dim=0))


def test_resnet20_fgcam_equals_gradcam_components_propagated_from_the_last_map(resnet20):
    """On the pretrained CIFAR ResNet-20 (residual sums, option-A shortcuts): the served map — read off
    the one-hot relevance pass from the logits, times the target logit — equals Grad-CAM's
    components at ``layer3`` propagated down, for top-1 and the runner-up, at three depths."""
    model, images = resnet20
    explainer = Explainer(model, (32, 32))
    for layer in ("stage1", "layer2.1.conv1", "stage2", "stage3"):
        result = explainer.explain(images, [ExplainSpec("fgcam", layer, "top2")] * len(images),
                                   layer_resolution=True)
        for i, explanation in enumerate(result.explanations):
            for k, target in enumerate(explanation.targets):
                expected = normalise(fgcam_from_the_last_map(model, images[i], target, explanation.layer, "layer3")[None])[0]
                assert torch.allclose(explanation.maps[k], expected, atol=1e-4), \
                    (layer, i, target, (explanation.maps[k] - expected).abs().max())
    assert no_hooks(model)


def test_fgcam_at_the_last_map_is_gradcam(resnet20):
    """At the map global pooling reads, FG-CAM has nothing to propagate: it is Grad-CAM."""
    model, images = resnet20
    explainer = Explainer(model, (32, 32))
    fg = explainer.explain(images, [ExplainSpec("fgcam", "layer3")] * len(images), layer_resolution=True)
    grad = explainer.explain(images, [ExplainSpec("gradcam", "layer3")] * len(images), layer_resolution=True)
    for a, b in zip(fg.explanations, grad.explanations):
        assert torch.allclose(a.maps, b.maps, atol=1e-5)


def test_fgcam_is_class_sensitive(resnet20):
    """The top-1 and the runner-up classes get different maps (the lab's ``rho12``: Spearman of the
    two maps) at every stage of ResNet-20; measured on 32 choose-half images: mean 0.51 / 0.53 / 0.28
    at stage1/2/3 (LayerCAM 0.55 / 0.60 / 0.86), the largest 0.95."""
    model, images = resnet20
    explainer = Explainer(model, (32, 32))
    for layer in ("stage1", "stage2", "stage3"):
        result = explainer.explain(images, [ExplainSpec("fgcam", layer, "top2")] * len(images), layer_resolution=True)
        first = torch.stack([e.maps[0].flatten() for e in result.explanations])
        second = torch.stack([e.maps[1].flatten() for e in result.explanations])
        rho12 = spearman_rows(first, second)
        assert bool((rho12 < 0.97).all()) and float(rho12.mean()) < 0.8, (layer, rho12)


def test_fgcam_on_effnet_batched_equals_one_at_a_time(effnet, effnet_batch):
    """EfficientNet-Lite0 (depthwise convs, residual sums, the shared ReLU6): maps in [0, 1] at the
    input's size (upsampled from a layer map normalised to [0, 1]), each image of a batch as when
    explained alone: a shallow and a deep stage and a depthwise conv inside a block."""
    images = effnet_batch[0][:3]
    explainer = Explainer(effnet)
    specs = [ExplainSpec("fgcam", "stage2"), ExplainSpec("fgcam", "stage5", 7), ExplainSpec("fgcam", "_blocks.3._depthwise_conv")]
    batched = explainer.explain(images, specs)
    for i, spec in enumerate(specs):
        maps = batched.explanations[i].maps
        assert maps.shape == (1, 224, 224) and maps.device == images.device
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 and float(maps.max()) > 0.5
        alone = explainer.explain(images[i:i + 1], [spec]).explanations[0].maps
        assert torch.allclose(maps, alone, atol=1e-3), (spec, (maps - alone).abs().max())  # convolution batch rounding
    # the identity on this network: Grad-CAM's components at the pooled map (the shared ReLU6's last call)
    layered = explainer.explain(images[:1], [ExplainSpec("fgcam", "stage2")], layer_resolution=True).explanations[0]
    expected = normalise(fgcam_from_the_last_map(effnet, images[0], layered.targets[0], layered.layer, "_swish")[None])[0]
    assert torch.allclose(layered.maps[0], expected, atol=1e-3), (layered.maps[0] - expected).abs().max()
    assert no_hooks(effnet)


def test_fgcam_is_registered_with_its_aliases():
    for name in ("fgcam", "FG-CAM", "fg_cam", "fg-cam"):
        assert isinstance(REGISTRY.lookup(name), FGCAM)
    assert REGISTRY.family("fgcam") == "lrp" and "fgcam" in REGISTRY.names(family=("cam", "lrp"))


def test_fgcam_refuses_options_and_heads_that_are_not_pooled_linear():
    """An option is a 400; so is a model whose classifier is an MLP on the flattened map (VGG's kind
    of head), where the one-hot relevance pass does not start from Grad-CAM's components."""
    explainer = Explainer(SmallNet(), (16, 16))
    images = torch.randn(1, 3, 16, 16)
    refused_before_forward(explainer, images, [ExplainSpec("fgcam", "pool", None, {"start": "softmax"})],
                           InvalidOptionError, "fgcam", "start")
    torch.manual_seed(0)
    mlp_head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    refused_before_forward(Explainer(mlp_head, (16, 16)), images, [ExplainSpec("fgcam", "1")],
                           UnsupportedModelError, "fgcam", "global average pooling", "'2'")
