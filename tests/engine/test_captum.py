"""Captum baselines through camserve: equal to direct Captum calls, costs counted, knobs guarded,
and the Spearman ``compare`` on a real photograph."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.methods.captum.attribute import (UnsupportedModelError, attribute, reduce_channels, shadow_copy,
                                            similarity_forward)
from camserve.engine.methods.captum.catalog import CaptumLimits, resolve
from camserve.engine.comparison import compare
from camserve.engine.core.rank_correlation import average_ranks, spearman, spearman_matrix
from camserve.engine.errors import ExplanationInputError, InvalidOptionError, UnknownMethodError
from camserve.engine.imaging.render import prepare_maps

import captum.attr as captum_attr  # noqa: E402 - pinned in requirements.txt: missing must fail, not skip


class SmallVGG(nn.Module):
    """A VGG-style classifier shaped like torchvision's VGG (``features``, ``avgpool``, functional
    flatten, ``classifier``), small enough for 64×64 inputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))

    def embed(self, x):
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def small_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallVGG().eval()


class Embedder(nn.Module):
    """The small VGG's 64-d embedding (everything up to its classifier)."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg

    def forward(self, x):
        return self.vgg.embed(x)


@pytest.fixture(scope="module")
def vgg():
    return small_vgg()


@pytest.fixture(scope="module")
def vgg_input():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.fixture(scope="module")
def effnet_explainer(effnet):
    return Explainer(effnet, default_layer="_conv_head")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours − theirs| / max |theirs|."""
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))


def assert_matches(out, direct: torch.Tensor, reduction, tolerance=1e-5):
    assert out.raw.shape == direct.shape
    error = relative_error(out.raw, direct)
    assert error <= tolerance, f"raw attribution differs from direct Captum: rel. error {error:.2e}"
    expected = prepare_maps(reduce_channels(direct, reduction), out.maps.shape[-2:])
    assert (out.maps - expected).abs().max() <= 1e-4
    assert out.maps.min() >= 0 and out.maps.max() <= 1


# -- equality with direct Captum calls ---------------------------------------------------------
def test_integrated_gradients_equals_captum(effnet, effnet_batch):
    images, labels = effnet_batch[0][:2], torch.tensor(effnet_batch[1][:2])
    out = attribute(effnet, images, labels, "captum.integrated_gradients", {"steps": 8, "internal_batch_size": 16})
    direct = captum_attr.IntegratedGradients(effnet).attribute(
        images.clone(), target=labels, n_steps=8, internal_batch_size=16)
    assert_matches(out, direct, "abs")
    assert out.passes["forward"] == 1 and out.passes["backward"] == 1 and out.passes["evaluations"] == 8


def test_saliency_equals_captum_and_reduction_options(effnet, effnet_batch):
    images, labels = effnet_batch[0][:2], torch.tensor(effnet_batch[1][:2])
    direct = captum_attr.Saliency(effnet).attribute(images.clone(), target=labels, abs=False)
    for reduction in ("abs", "positive", "sum"):
        out = attribute(effnet, images, labels, "captum.saliency", {"reduction": reduction})
        assert_matches(out, direct, reduction)
    # abs: Σ_c |∂y/∂x_c| is Captum's own Saliency(abs=True) summed over channels
    absolute = captum_attr.Saliency(effnet).attribute(images.clone(), target=labels, abs=True).sum(1)
    assert torch.allclose(reduce_channels(direct, "abs"), absolute)
    assert out.passes == {"forward": 1, "backward": 1, "relevance": 0, "evaluations": 1}


def test_layer_gradcam_equals_captum_and_camserve_gradcam(effnet, effnet_explainer, effnet_batch):
    images, labels = effnet_batch[0][:2], torch.tensor(effnet_batch[1][:2])
    out = attribute(effnet, images, labels, "captum.layer_gradcam", layer="_conv_head")
    direct = captum_attr.LayerGradCam(effnet, effnet._conv_head).attribute(
        images.clone(), target=labels, relu_attributions=True)
    assert_matches(out, direct, None)
    assert out.layer_shape == (7, 7)
    # the same formula as camserve's own Grad-CAM, upsampled the same way
    ours = effnet_explainer.explain(images, [ExplainSpec("gradcam", "_conv_head", int(t)) for t in labels])
    for explanation, captum_map in zip(ours.explanations, out.maps):
        assert (explanation.maps[0] - captum_map).abs().max() < 1e-3


def test_guided_gradcam_equals_captum(vgg, vgg_input):
    targets = torch.tensor([1, 4, 7])
    out = attribute(vgg, vgg_input, targets, "captum.guided_gradcam", layer="features.6")
    direct = captum_attr.GuidedGradCam(vgg, vgg.features[6]).attribute(vgg_input.clone(), target=targets)
    assert_matches(out, direct, "abs")
    assert out.passes["forward"] == 2 and out.passes["backward"] == 2  # Grad-CAM + guided backprop


def test_noise_tunnel_equals_captum_with_seed(vgg, vgg_input):
    targets = torch.tensor([0, 3, 9])
    options = {"base": "captum.saliency", "nt_samples": 6, "stdevs": 0.3, "seed": 123, "nt_samples_batch_size": 3}
    out = attribute(vgg, vgg_input, targets, "captum.noise_tunnel", options)
    torch.manual_seed(123)
    direct = captum_attr.NoiseTunnel(captum_attr.Saliency(vgg)).attribute(
        vgg_input.clone(), target=targets, nt_type="smoothgrad", nt_samples=6, stdevs=0.3,
        nt_samples_batch_size=3, abs=False)
    assert_matches(out, direct, "abs")
    assert out.passes["forward"] == 2 and out.passes["backward"] == 2 and out.passes["evaluations"] == 6
    # smooth=1 on the method itself is the same request; the seed makes it reproducible
    again = attribute(vgg, vgg_input, targets, "captum.saliency", {"smooth": 1, "nt_samples": 6, "stdevs": 0.3,
                                                                   "seed": 123, "nt_samples_batch_size": 3})
    assert torch.equal(again.raw, out.raw)


def test_noise_tunnel_over_integrated_gradients(vgg, vgg_input):
    targets = torch.tensor([2, 2, 5])
    options = {"base": "captum.integrated_gradients", "steps": 4, "nt_samples": 3, "seed": 7}
    out = attribute(vgg, vgg_input, targets, "captum.noise_tunnel", options)
    torch.manual_seed(7)
    direct = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(vgg)).attribute(
        vgg_input.clone(), target=targets, nt_samples=3, stdevs=0.2, n_steps=4, internal_batch_size=32)
    assert_matches(out, direct, "abs")
    assert out.passes["evaluations"] == 12  # steps × nt_samples


def test_layer_lrp_equals_captum_on_vgg_and_leaves_model_untouched(vgg, vgg_input):
    weights = [p.detach().clone() for p in vgg.parameters()]
    targets = torch.tensor([1, 2, 3])
    out = attribute(vgg, vgg_input, targets, "captum.layer_lrp", layer="features.3")
    # direct Captum on a separate copy (LayerLRP leaves state on modules it touched)
    reference = small_vgg()
    direct = captum_attr.LayerLRP(reference, reference.features[3]).attribute(vgg_input.clone(), target=targets)
    assert_matches(out, direct, "positive")
    assert out.passes["relevance"] == 1 and out.passes["backward"] == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, vgg.parameters()))
    assert not any(hasattr(m, "rule") for m in vgg.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in vgg.modules())


def test_layer_lrp_refuses_what_captum_refuses(vgg_input):
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    flat(vgg_input)
    with pytest.raises(TypeError):  # Captum itself has no rule for nn.Flatten
        captum_attr.LayerLRP(flat, flat[0]).attribute(vgg_input.clone(), target=0)
    with pytest.raises(UnsupportedModelError, match="Flatten"):
        attribute(flat, vgg_input, 0, "captum.layer_lrp", layer="0")


def test_layer_lrp_refuses_efficientnet(effnet_explainer, effnet_batch):
    with pytest.raises(UnsupportedModelError, match="ReLU6") as caught:
        effnet_explainer.explain(effnet_batch[0][:1], [ExplainSpec("captum.layer_lrp", "_blocks.4")])
    assert isinstance(caught.value, ExplanationInputError) and caught.value.status == 400


# -- the explainer's batched interface ------------------------------------------------------------
def test_explainer_mixes_captum_and_cam_rows(effnet, effnet_explainer, effnet_batch):
    images = effnet_batch[0][:4]
    specs = [ExplainSpec("captum.integrated_gradients", options={"steps": 4}), ExplainSpec("shallowcam", "_blocks.2"),
             None, ExplainSpec("captum.saliency", target="top2")]
    result = effnet_explainer.explain(images, specs)
    with torch.no_grad():
        logits = effnet(images)
    assert torch.allclose(result.logits, logits, atol=1e-4)
    ig, shallow, none, saliency = result.explanations
    assert none is None and shallow.method == "shallowcam"
    assert ig.method == "captum.integrated_gradients" and ig.targets == [int(logits[0].argmax())]
    assert ig.maps.shape == (1, 224, 224) and ig.layer == "input" and ig.passes["evaluations"] == 4
    assert saliency.targets == logits[3].topk(2).indices.tolist() and saliency.maps.shape == (2, 224, 224)
    assert saliency.passes["forward"] == 2  # one Captum call per target round
    # the same row alone gives the same map (batching does not change Captum's per-row result)
    alone = attribute(effnet, images[3:4], saliency.targets[:1], "captum.saliency")
    assert (alone.maps[0] - saliency.maps[0]).abs().max() < 1e-4
    # Captum ran on a shadow: the served model keeps no hook
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in effnet.modules())


def test_layer_gradcam_layer_resolution_and_default_layer(effnet_explainer, effnet_batch):
    result = effnet_explainer.explain(effnet_batch[0][:1], [ExplainSpec("captum.layer_gradcam")],
                                      layer_resolution=True)
    explanation = result.explanations[0]
    assert explanation.layer == "_conv_head" and explanation.maps.shape == (1, 7, 7)


def test_shadow_copy_shares_weights_and_drops_hooks(vgg):
    handle = vgg.register_forward_hook(lambda *a: None)
    try:
        shadow = shadow_copy(vgg)
    finally:
        handle.remove()
    assert all(a is b for a, b in zip(vgg.parameters(), shadow.parameters()))
    assert not any(m._forward_hooks for m in shadow.modules())


# -- knobs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, error, message", [
    ("captum.integrated_gradients", {"steps": 0}, InvalidOptionError, "≥ 1"),
    ("captum.integrated_gradients", {"steps": -3}, InvalidOptionError, "≥ 1"),
    ("captum.integrated_gradients", {"steps": 10000}, InvalidOptionError, "max_steps=256"),
    ("captum.integrated_gradients", {"steps": "many"}, InvalidOptionError, "integer"),
    ("captum.integrated_gradients", {"steps": True}, InvalidOptionError, "integer"),
    ("captum.integrated_gradients", {"internal_batch_size": 0}, InvalidOptionError, "≥ 1"),
    ("captum.integrated_gradients", {"steps": 200, "smooth": 1, "nt_samples": 50}, InvalidOptionError,
     "max_evaluations"),
    ("captum.noise_tunnel", {"base": "captum.saliency", "nt_samples": 1000}, InvalidOptionError, "max_samples"),
    ("captum.noise_tunnel", {"base": "captum.saliency", "stdevs": -1}, InvalidOptionError, "> 0"),
    ("captum.noise_tunnel", {"base": "captum.saliency", "stdevs": "nan"}, InvalidOptionError, "finite"),
    ("captum.noise_tunnel", {}, InvalidOptionError, "base"),
    ("captum.noise_tunnel", {"base": "captum.deeplift"}, UnknownMethodError, "deeplift"),
    ("captum.saliency", {"reduction": "max"}, InvalidOptionError, "reduction"),
    ("captum.saliency", {"steps": 4}, InvalidOptionError, "no option"),
    ("captum.saliency", {"smooth": "maybe"}, InvalidOptionError, "boolean"),
    ("captum.deeplift", {}, UnknownMethodError, "unknown Captum method"),
])
def test_bad_knobs_are_rejected_before_the_model_runs(effnet_explainer, effnet_batch, name, options, error, message):
    calls = []
    handle = effnet_explainer.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            effnet_explainer.explain(effnet_batch[0][:1], [ExplainSpec(name, options=options)])
    finally:
        handle.remove()
    assert not calls


def test_query_string_options_and_configured_cap():
    method, options = resolve("captum.ig", {"n_steps": "32", "internal_batch_size": "8", "smooth": "1",
                                           "nt_samples": "4", "stdevs": "0.1"})
    assert method.name == "integrated_gradients"
    assert options["steps"] == 32 and options["smooth"] is True and options["stdevs"] == 0.1
    with pytest.raises(InvalidOptionError, match="max_steps=64"):
        resolve("captum.integrated_gradients", {"steps": 65}, CaptumLimits(max_steps=64))


# -- embedding models -----------------------------------------------------------------------------
def test_similarity_forward_attributes_the_similarity(vgg, vgg_input):
    embedder = Embedder(vgg)  # (N, 64) embeddings
    with torch.no_grad():
        references = embedder(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    forward = similarity_forward(embedder, references, "cosine")
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(embedder(vgg_input)[:, None], references[None], dim=2)
        assert torch.allclose(forward(vgg_input), expected, atol=1e-6)
    targets = torch.tensor([0, 1, 0])
    out = attribute(forward, vgg_input, targets, "captum.integrated_gradients", {"steps": 8}, )
    direct = captum_attr.IntegratedGradients(
        lambda x: torch.nn.functional.cosine_similarity(embedder(x)[:, None], references[None], dim=2)
    ).attribute(vgg_input.clone(), target=targets, n_steps=8, internal_batch_size=32)
    assert_matches(out, direct, "abs")
    gradcam = attribute(forward, vgg_input, targets, "captum.layer_gradcam", layer="vgg.features.6")  # a layer of the embedder
    assert gradcam.layer_shape == (16, 16)


# -- Spearman and compare -------------------------------------------------------------------------
def reference_average_ranks(values):
    ordered = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[ordered[k]] = (i + j) / 2
        i = j + 1
    return ranks


def test_average_ranks_handle_ties():
    rng = random.Random(0)
    values = [rng.choice([0.0, 0.0, 0.0, 0.25, 0.5, 0.5, 1.0]) for _ in range(200)]
    assert average_ranks(torch.tensor(values)).tolist() == reference_average_ranks(values)


def test_spearman_properties():
    torch.manual_seed(0)
    a = torch.rand(32, 32)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, 1 - a) == pytest.approx(-1.0)
    assert spearman(a, torch.zeros(32, 32)) is None
    b = torch.relu(torch.randn(32, 32))  # many tied zeros
    ranks_a = torch.tensor(reference_average_ranks(a.flatten().tolist()), dtype=torch.float64)
    ranks_b = torch.tensor(reference_average_ranks(b.flatten().tolist()), dtype=torch.float64)
    pearson = torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1]
    assert spearman(a, b) == pytest.approx(float(pearson), abs=1e-9)
    matrix = spearman_matrix([a, b, torch.nn.functional.interpolate(a[None, None], size=(16, 16))[0, 0]])
    assert matrix[0][1] == matrix[1][0] and matrix[2][2] == 1.0


def test_compare_shallowcam_and_integrated_gradients_on_a_photograph(effnet_explainer, effnet_batch):
    image, label = effnet_batch[0][5], effnet_batch[1][5]
    comparison = compare(effnet_explainer, image, [ExplainSpec("shallowcam", "_blocks.2"),
                                                   ExplainSpec("captum.integrated_gradients", options={"steps": 8}),
                                                   ExplainSpec("captum.layer_gradcam"), ExplainSpec("gradcam")])
    assert comparison.methods == ["shallowcam", "captum.integrated_gradients", "captum.layer_gradcam", "gradcam"]
    assert comparison.target == int(comparison.logits[0].argmax())
    assert all(e.targets == [comparison.target] and e.maps.shape == (1, 224, 224) for e in comparison.explanations)
    assert all(s > 0 and e.seconds == s for s, e in zip(comparison.seconds, comparison.explanations))
    rho = comparison.spearman
    assert all(rho[i][i] == 1.0 for i in range(4))
    assert all(rho[i][j] == rho[j][i] and -1.0 <= rho[i][j] <= 1.0 for i in range(4) for j in range(4))
    assert rho[2][3] > 0.99  # Captum's LayerGradCam and camserve's Grad-CAM are one formula
    print(f"\nclass {comparison.target} (label {label}); seconds "
          f"{[round(s, 3) for s in comparison.seconds]}; spearman {[[round(v, 3) for v in r] for r in rho]}")


def test_compare_request_parsing_and_option_split():
    from camserve.engine.methods import REGISTRY
    parse_methods, split_options = REGISTRY.parse_methods, REGISTRY.split_options

    methods = parse_methods("shallowcam, captum.integrated_gradients,captum.noise_tunnel")
    assert methods == ["shallowcam", "captum.integrated_gradients", "captum.noise_tunnel"]
    split = split_options(methods, {"spatial": "relevance", "steps": "8", "base": "captum.saliency", "nt_samples": 4})
    assert split == [{"spatial": "relevance"}, {"steps": "8"}, {"base": "captum.saliency", "nt_samples": 4}]
    with pytest.raises(InvalidOptionError, match="none of the compared"):
        split_options(methods[:2], {"nt_samples": 4})
    with pytest.raises(UnknownMethodError):
        parse_methods("shallowcam,captum.deeplift")
    with pytest.raises(InvalidOptionError, match="2 to 4"):
        parse_methods("shallowcam")
    with pytest.raises(InvalidOptionError, match="twice"):
        parse_methods("gradcam,gradcam")


def test_planning_validates_captum_rows(effnet_explainer):
    """``Explainer._plan`` (what a handler calls to validate a request early) knows Captum rows."""
    row = effnet_explainer._plan(0, ExplainSpec("captum.layer_gradcam", target="top2"))
    assert row.layer == "_conv_head" and row.options["relu_attributions"] is True
    with pytest.raises(InvalidOptionError, match="max_steps"):
        effnet_explainer._plan(0, ExplainSpec("captum.integrated_gradients", options={"steps": 10000}))
