"""LRP in the engine: parity with zennit, conservation where the rules promise it, and maps on real
architectures at every stage.

The engine realises each rule as a modified gradient ``g`` with ``R_t = t ⊙ g_t`` (see
``camserve.engine.lrp.rules``); relevance at a layer is read from a :class:`ForwardCapture`
as ``A ⊙ g`` and at the input as ``x ⊙ g_x``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.capture import ForwardCapture
from camserve.engine.models import EFFNET_LITE0, TORCHVISION_PROFILES, load_torchvision
from camserve.engine.imaging.preprocess import to_model_input
from camserve.engine.lrp.composites import epsilon_alpha2_beta1, epsilon_gamma, epsilon_plus, get_composite
from camserve.engine.lrp.rules import GammaRule
from camserve.engine.errors import InvalidOptionError
from camserve.engine.lrp.canonizers import batchnorm_pairs, fold_batchnorm
from camserve.engine.lrp.rules import stabilize
from camserve.engine.lrp.starts import contrastive_seed

from conftest import SAMPLES, load_uint8

import zennit  # noqa: E402,F401 - pinned in requirements.txt: missing must fail, not skip
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlus, LayerMapComposite, layer_map_base  # noqa: E402
from zennit.rules import Epsilon, Gamma  # noqa: E402
from zennit.types import Convolution  # noqa: E402


# -- helpers ------------------------------------------------------------------------------------
def engine_relevance(model, x, seed, layers=(), rules=None):
    """Relevance at the input and at ``layers`` from one forward and one relevance backward."""
    rules = epsilon_plus().assign(model.named_modules()) if rules is None else rules
    x = x.clone().requires_grad_(True)
    with ForwardCapture(model, layers, rules) as capture, torch.enable_grad():
        logits = model(x)
        capture.mode = "relevance"
        tensors = [x] + [capture.activations[name] for name in layers]
        grads = torch.autograd.grad(logits, tensors, seed / stabilize(logits.detach(), 1e-12))
    relevance = {"input": (x * grads[0]).detach()}
    relevance.update({name: (capture.activations[name] * g).detach() for name, g in zip(layers, grads[1:])})
    assert capture.active_hooks == 0
    return logits.detach(), relevance


def zennit_relevance(model, x, seed, composite, layers=()):
    """zennit's relevance at the input and at the outputs of ``layers`` (the gradient zennit's
    hooked backward leaves on those tensors *is* relevance)."""
    modules = dict(model.named_modules())
    seen, handles = {}, []
    with Gradient(model=model, composite=composite) as attributor:
        for name in layers:  # registered after zennit's hooks: sees the output zennit wrapped
            def hook(module, args, output, name=name):
                output.register_hook(lambda grad: seen.__setitem__(name, grad.detach()))
            handles.append(modules[name].register_forward_hook(hook))
        try:
            logits, attribution = attributor(x.clone(), seed)
        finally:
            for handle in handles:
                handle.remove()
    return logits.detach(), {"input": attribution.detach(), **seen}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def small_vgg(batchnorm: bool = False, bias: bool = True, classes: int = 10, bn_eps: float = 1e-5) -> nn.Sequential:
    """A VGG-style net: conv/ReLU/max-pool stages, adaptive average pooling and a linear head."""
    torch.manual_seed(0)

    def stage(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout, eps=bn_eps))
        return layers + [nn.ReLU(inplace=True)]

    model = nn.Sequential(
        *stage(3, 16), nn.MaxPool2d(2),
        *stage(16, 32), nn.MaxPool2d(2),
        *stage(32, 32), *stage(32, 32),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(512, 64, bias=bias), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, classes, bias=bias))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.uniform_(module.bias, -0.1, 0.1)
        if isinstance(module, nn.BatchNorm2d):  # "trained" statistics, some negative scales
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, -0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def photos64():
    """Two real photographs at 64×64, ImageNet normalisation."""
    files = sorted(SAMPLES.glob("*.JPEG"))[:2]
    images = [load_uint8(f) for f in files]
    batch, _ = to_model_input(images, 72, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.device("cpu"))
    return batch


def _seed(logits, contrastive=True):
    return contrastive_seed(logits, logits.argmax(1), contrastive)


# -- parity with zennit -------------------------------------------------------------------------
def zennit_epsilon_gamma(stabilizer=1e-6):
    """zennit's generalised LRP-γ (γ = 0.25, signed inputs too) for convolutions, ε for linear layers."""
    return LayerMapComposite(layer_map_base(stabilizer) + [(Convolution, Gamma(0.25, stabilizer=stabilizer)),
                                                           (nn.Linear, Epsilon())])


COMPOSITES = {"epsilon_plus": (epsilon_plus, EpsilonPlus), "epsilon_alpha2_beta1": (epsilon_alpha2_beta1, EpsilonAlpha2Beta1),
              "epsilon_gamma": (epsilon_gamma, zennit_epsilon_gamma)}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_relevance_matches_zennit_on_vgg_style_model(photos64, name):
    """Engine and zennit, same composite, same contrastive initial relevance, float64: the
    relevance at the input, after a conv stage (ReLU output) and after a max pool agrees.

    The stabiliser is 1e-12 on both sides (ε stays 1e-6): zennit's average pooling divides by
    ``stab(y)`` while the engine's gradient realises the exact ``x / Σx`` split, so with the default
    1e-6 the two differ by up to 5e-4 (relative) wherever a pooled value is tiny."""
    ours_composite, zennit_composite = COMPOSITES[name]
    model = small_vgg().double()
    x = photos64.double()
    layers = ("1", "5", "6")  # ReLU of stage 1, ReLU of stage 2, max pool
    logits = model(x).detach()
    seed = _seed(logits)
    _, ours = engine_relevance(model, x, seed, layers, ours_composite(stabilizer=1e-12).assign(model.named_modules()))
    _, theirs = zennit_relevance(model, x, seed, zennit_composite(stabilizer=1e-12), layers)
    assert no_hooks(model)
    for key in ("input",) + layers:
        scale = theirs[key].abs().max()
        error = ((ours[key] - theirs[key]).abs().max() / scale).item()
        print(f"zennit {name} {key}: max relative difference {error:.1e}")
        assert error < 1e-6, f"{name} at {key}: {error:.2e}"
        assert ours[key].abs().sum() > 0


def test_gamma_composite_is_named_with_its_parameter_and_spans_lrp0_to_zplus(photos64):
    """``epsilon_gamma:γ`` builds LRP-γ with that ``γ``; ``γ = 0`` is LRP-0 (relevance = gradient ×
    input for a bias-free net) and a large ``γ`` tends to z⁺; bad names are an InvalidOptionError."""
    assert get_composite("epsilon_gamma").name == "epsilon_gamma"
    composite = get_composite("epsilon_gamma:2")
    assert composite.name == "epsilon_gamma:2"
    assert any(isinstance(rule, GammaRule) and rule.gamma == 2.0 for _, rule in composite.layer_map)
    for bad in ("epsilon_gamma:warm", "epsilon_gamma:-1", "epsilon_plus:1", "gamma"):
        with pytest.raises(InvalidOptionError):
            get_composite(bad)
    model = small_vgg(bias=False).double()
    x = photos64.double()
    logits = model(x).detach()
    seed = _seed(logits, contrastive=False)
    tight = epsilon_gamma(epsilon=1e-12, stabilizer=1e-12, gamma=0.0)  # LRP-0 up to the stabilisers
    _, lrp0 = engine_relevance(model, x, seed, (), tight.assign(model.named_modules()))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg), xg, seed / logits)
    assert torch.allclose(lrp0["input"], x * grad, rtol=1e-6, atol=1e-7 * (x * grad).abs().max().item())
    _, hot = engine_relevance(model, x, seed, ("5",), get_composite("epsilon_gamma:1e6").assign(model.named_modules()))
    _, zplus = engine_relevance(model, x, seed, ("5",), epsilon_plus().assign(model.named_modules()))
    assert torch.allclose(hot["5"], zplus["5"], rtol=1e-3, atol=1e-6 * zplus["5"].abs().max().item())


def test_folded_batchnorm_matches_zennit_merge_batchnorm(photos64):
    """``fold_batchnorm`` (BN folded into the conv for the relevance path only) gives zennit's
    EpsilonPlus with its ``SequentialMergeBatchNorm`` canonizer — and leaves the model untouched.

    BN eps is tiny here because zennit's canonizer turns a merged BN into ``x / √(1 + eps)``, not
    the identity (with eps = 1e-5 its relevance is off by ≈1e-5 relative after four BNs)."""
    model = small_vgg(batchnorm=True, bn_eps=1e-14).double()
    before = copy.deepcopy(model.state_dict())
    x = photos64.double()
    assert batchnorm_pairs(model, (64, 64)) == {"0": "1", "4": "5", "8": "9", "11": "12"}
    logits = model(x).detach()
    seed = _seed(logits)
    rules = fold_batchnorm(model, epsilon_plus(stabilizer=1e-12).assign(model.named_modules()), (64, 64))
    _, ours = engine_relevance(model, x, seed, ("2",), rules)
    composite = EpsilonPlus(stabilizer=1e-12, canonizers=[SequentialMergeBatchNorm()])
    _, theirs = zennit_relevance(model, x, seed, composite, ())
    error = ((ours["input"] - theirs["input"]).abs().max() / theirs["input"].abs().max()).item()
    print(f"folded BN vs zennit merge-BN: {error:.1e}")
    assert error < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), logits)


# -- conservation -------------------------------------------------------------------------------
def test_zplus_conserves_relevance_layer_by_layer_without_bias(photos64):
    """Bias-free conv/linear layers: z⁺, ε, pass (ReLU), winner-take-all max pool and
    proportional average pool each conserve relevance, so Σ R is the initial one-hot's 1 at
    every layer and at the input — exactly (float64) when ε and the stabiliser are negligible, and
    within what they absorb (≈3e-4 here, small random logits) with the defaults (1e-6)."""
    layers = ("0", "1", "2", "4", "5", "7", "9", "10", "11", "13")
    for composite, dtype, tolerance in ((epsilon_plus(epsilon=1e-12, stabilizer=1e-12), torch.float64, 1e-9),
                                        (epsilon_plus(), torch.float32, 1e-3)):
        model = small_vgg(bias=False).to(dtype)
        x = photos64.to(dtype)
        logits = model(x).detach()
        rules = composite.assign(model.named_modules())
        _, relevance = engine_relevance(model, x, _seed(logits, contrastive=False), layers, rules)
        for key, r in relevance.items():
            totals = r.sum(dim=tuple(range(1, r.dim())))
            assert torch.allclose(totals, torch.ones_like(totals), atol=tolerance), (key, dtype, totals)


def test_batchnorm_pass_rule_hands_relevance_through_unchanged(photos64):
    """Pass rule on BatchNorm: ``R`` at its input equals ``R`` at its output element-wise wherever
    the input is non-zero (where it is zero the BN's shift created the output; see the
    EfficientNet test below). float64, stabiliser 1e-12 (with 1e-6 the ratio ``c / (c ± 1e-6)``
    deviates by up to 1e-3 where ``|c| ≈ 1e-3``)."""
    model = small_vgg(batchnorm=True).double()
    x = photos64.double()
    logits = model(x).detach()
    rules = epsilon_plus(stabilizer=1e-12).assign(model.named_modules())
    _, relevance = engine_relevance(model, x, _seed(logits), ("4", "5"), rules)
    conv_out, bn_out = relevance["4"], relevance["5"]
    assert (bn_out != 0).float().mean() > 0.05  # max pooling above keeps one in four
    assert torch.allclose(conv_out, bn_out, rtol=1e-6, atol=1e-12 * bn_out.abs().max().item())


def test_resnet18_relevance_is_conserved_across_residual_stages():
    """ResNet-18 (random weights; residual sums are plain tensor additions): with z⁺ on bias-free
    convs, pass on BN/ReLU and the proportional split of ``out += identity`` that the gradient
    realises, Σ R is the same at the outputs of layer1 … layer4."""
    model = load_torchvision("resnet18")
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    stages = TORCHVISION_PROFILES["resnet18"].stages
    logits = model(x).detach()
    _, relevance = engine_relevance(model, x, _seed(logits, contrastive=False), stages)
    totals = torch.stack([relevance[s].sum(dim=(1, 2, 3)) for s in stages])
    print("resnet18 Σ R per stage:", totals.T.tolist())
    assert torch.isfinite(totals).all() and (totals.abs() > 0.1).all()
    assert torch.allclose(totals, totals[-1].expand_as(totals), rtol=1e-3)


def test_effnet_relevance_loss_is_exactly_the_batchnorm_shift(effnet, effnet_batch):
    """EfficientNet-Lite0 does not conserve relevance block to block (Σ R: ≈1 at ``_conv_head``,
    ≈0.3 at ``_blocks.14``, ≈0.1 at ``_blocks.2`` for a one-hot start). The loss is located:
    across a BatchNorm, the pass rule gives ``R_c = c ⊙ g`` = 0 wherever the conv output ``c`` is
    exactly 0 (all-zero ReLU6 windows of the depthwise conv), while the BN's shift makes
    ``y ≠ 0`` and ``R_y ≠ 0`` there. Everything else is handed through."""
    x = effnet_batch[0][:2]
    conv, bn = "_blocks.15._depthwise_conv", "_blocks.15._bn1"
    logits = effnet(x).detach()
    seed = _seed(logits, contrastive=False)
    rules = epsilon_plus().assign(effnet.named_modules())
    with ForwardCapture(effnet, [conv], {}) as capture, torch.no_grad():
        effnet(x)
    zero = capture.activations[conv] == 0
    _, relevance = engine_relevance(effnet, x, seed, (conv, bn, "_conv_head", "_blocks.2"), rules)
    lost = relevance[bn].sum() - relevance[conv].sum()
    assert zero.float().mean() > 0.1 and lost > 0.05
    assert torch.allclose(lost, relevance[bn][zero].sum(), rtol=1e-3)
    # elsewhere handed through, up to the stabiliser: c / (c ± 1e-6) deviates where |c| ≈ 1e-6
    deviation = (relevance[conv] - relevance[bn])[~zero].abs().sum() / relevance[bn].abs().sum()
    print(f"effnet BN pass: lost {lost.item() / 2:.3f} per image, off-zero deviation {deviation.item():.1e}")
    assert deviation < 1e-3
    # the blockwise shrinkage the docstring quotes
    head, shallow = relevance["_conv_head"].sum().item() / 2, relevance["_blocks.2"].sum().item() / 2
    print(f"effnet Σ R (one-hot, mean of 2 photos): _conv_head {head:.3f}, _blocks.2 {shallow:.3f}")
    assert 0.9 < head <= 1.01 and 0 < shallow < head


def test_pass_tails_are_absorbed_without_changing_relevance(effnet, effnet_batch):
    """Each ``conv → BN → ReLU6`` run gets one switch (the BN and ReLU6 pass rules are absorbed
    into the conv's z⁺), and the relevance is the one the unabsorbed chain gives: recording every
    ruled module's output keeps them as separate switches (a recorded output is never absorbed),
    and the relevance at ``_blocks.2`` and at the input agrees. Stabiliser 1e-12: the chained pass
    rules divide by ``c ± 1e-6`` where the absorbed ones do not divide at all, which alone moves
    the relevance by ~1e-3 (relative) where BN inputs are tiny."""
    x = effnet_batch[0][:2].double()
    model = copy.deepcopy(effnet).double()
    seed = _seed(model(x).detach())
    rules = epsilon_plus(stabilizer=1e-12).assign(model.named_modules())
    heads = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())

    def run(layers):
        with ForwardCapture(model, layers, rules) as capture, torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            logits = model(xg)
            capture.mode = "relevance"
            a = capture.activations["_blocks.2"]
            g_x, g_a = torch.autograd.grad(logits, [xg, a], seed / stabilize(logits.detach(), 1e-12))
            counts = (capture.switches, capture.absorbed)
        return counts, (xg * g_x).detach(), (a * g_a).detach()

    (calls, absorbed), r_input, r_layer = run(["_blocks.2"])
    (calls_sep, absorbed_sep), r_input_sep, r_layer_sep = run(["_blocks.2"] + list(rules))
    assert calls - absorbed == heads and absorbed > 2 * heads // 2  # every BN and ReLU6 call absorbed
    assert calls_sep == calls and absorbed_sep == 0
    for ours, chain in ((r_layer, r_layer_sep), (r_input, r_input_sep)):
        print(f"absorbed vs chained pass rules: max |ΔR| / max |R| = {((ours - chain).abs().max() / ours.abs().max()).item():.1e}")
        assert (ours - chain).abs().max() <= 1e-6 * ours.abs().max()
    assert no_hooks(model)


def test_folding_does_not_change_effnet_relevance_without_bias_and_shrinks_it_with(effnet, effnet_batch):
    """Measured reason why BN folding is *not* the default: on EfficientNet-Lite0, folding with
    the BN shift as bias lets ``b'⁺`` absorb relevance at every layer (Σ R at ``_blocks.2``
    drops ≈30×), and folding without the bias changes almost nothing (z⁺ is invariant to a
    positive per-channel scale, and nearly all BN scales are positive)."""
    x = effnet_batch[0][:1]
    layer = "_blocks.2"
    logits = effnet(x).detach()
    seed = _seed(logits, contrastive=False)
    plain = epsilon_plus().assign(effnet.named_modules())
    totals = {}
    for key, rules in {"plain": plain,
                       "folded": fold_batchnorm(effnet, plain, (224, 224)),
                       "folded_no_bias": fold_batchnorm(effnet, plain, (224, 224), keep_bias=False)}.items():
        _, relevance = engine_relevance(effnet, x, seed, (layer,), rules)
        totals[key] = relevance[layer].sum().item()
        assert torch.isfinite(relevance[layer]).all()
    print("effnet Σ R at _blocks.2:", totals)
    assert totals["folded"] < totals["plain"] / 5
    assert abs(totals["folded_no_bias"] - totals["plain"]) < 0.05 * totals["plain"]


# -- every stage of real architectures ------------------------------------------------------------
def _stage_maps(model, stages, image, input_size, options=None):
    """Shallow-CAM and Relevance-CAM at every stage, in one batch (one forward)."""
    explainer = Explainer(model, input_size=input_size)
    specs = [ExplainSpec(method, stage, options=dict(options or {}))
             for method in ("shallowcam", "relevancecam") for stage in stages]
    batch = image.expand(len(specs), -1, -1, -1).contiguous()
    result = explainer.explain(batch, specs, layer_resolution=True)
    assert no_hooks(model)
    return specs, result


def _assert_maps_usable(specs, result):
    for spec, explanation in zip(specs, result.explanations):
        maps = explanation.maps
        assert torch.isfinite(maps).all(), (spec.method, spec.layer)
        assert maps.min() >= 0 and maps.max() <= 1
        assert maps.std() > 1e-3, f"{spec.method} at {spec.layer} is constant"
        assert explanation.passes["relevance"] == 1


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_shallowcam_and_relevancecam_at_every_torchvision_stage(name, photos64):
    """Random weights, a real photograph at 96×96 (small: CI budget), batch = 2 × stages.

    One-hot initial relevance: with random weights the top-1 logit barely exceeds the others, so
    the contrastive start (+1 / −1/N) often has negative total relevance (measured −0.08 and
    −0.009 for two of three ResNet-18 seeds) and the ReLU'd maps are legitimately all zero."""
    model = load_torchvision(name)
    image = torch.nn.functional.interpolate(photos64[:1], size=(96, 96), mode="bilinear")
    specs, result = _stage_maps(model, TORCHVISION_PROFILES[name].stages, image, (96, 96), {"contrastive": False})
    _assert_maps_usable(specs, result)


def test_shallowcam_and_relevancecam_at_every_effnet_stage(effnet, effnet_batch):
    image = torch.nn.functional.interpolate(effnet_batch[0][:1], size=(128, 128), mode="bilinear", antialias=True)
    specs, result = _stage_maps(effnet, EFFNET_LITE0.stages, image, (128, 128))
    _assert_maps_usable(specs, result)


# -- Shallow-CAM, recomputed from its definition ------------------------------------------------
def test_shallowcam_follows_its_definition(effnet, effnet_batch):
    """Shallow-CAM at ``_blocks.2`` equals the formula recomputed by hand from an independent
    relevance pass (contrastive seed) and a plain autograd gradient of ``y_c``:
    ``β_k = Σ_ij R_kij / max_k |Σ_ij R_kij|``, ``S = ReLU(∂y_c/∂A)`` (or ``ReLU(R / A)``),
    ``map = ReLU(Σ_k β_k S_k ⊙ A_k)``, min-max normalised at layer resolution.

    The independent pass hooks every rule; the explainer hooks only those above the layer. This
    caught a bug: EfficientNet's top-level ``_swish`` (ReLU6) runs after the stem *and* after the
    head, was judged by its first call and lost its pass rule above ``_blocks.2`` (maps off by 0.14)."""
    from camserve.engine.imaging.render import normalise

    x, layer = effnet_batch[0][:1], "_blocks.2"
    explainer = Explainer(effnet)
    logits = effnet(x).detach()
    target = logits.argmax(1)
    _, relevance = engine_relevance(effnet, x, contrastive_seed(logits, target, True), (layer,))
    R = relevance[layer]
    with ForwardCapture(effnet, [layer]) as capture, torch.enable_grad():
        y = effnet(x)
        A = capture.activations[layer]
        gradient = torch.autograd.grad(y[0, target[0]], A)[0]
    A = A.detach()
    beta = R.sum(dim=(2, 3))
    beta = beta / beta.abs().amax(dim=1, keepdim=True)
    spatial = {"gradient": torch.relu(gradient), "relevance": torch.relu(R / A.where(A != 0, torch.ones_like(A)))}
    for name, S in spatial.items():
        expected = normalise(torch.relu((beta[:, :, None, None] * S * A).sum(1)))
        got = explainer.explain(x, [ExplainSpec("shallowcam", layer, None, {"spatial": name, "contrastive": True})],
                                layer_resolution=True).explanations[0]
        assert got.targets == [int(target)]
        error = (got.maps - expected).abs().max().item()
        assert error < 1e-4, f"shallowcam spatial={name}: {error:.1e}"


# -- issue 15: Shallow-CAM's readings and relevance conservation on a plain ReLU ResNet ----------
def test_shallowcam_readings_follow_their_definitions(resnet20):
    """``beta=one`` + gradient spatial weights is LayerCAM exactly; ``beta=positive`` is the ReLU of
    the signed β; ``beta_from=above`` spreads l+1's spatial relevance over l's channels in
    proportion to their activation; the default options are unchanged."""
    from camserve.engine.methods import get_method
    from camserve.engine.imaging.render import normalise

    model, x = resnet20
    explainer = Explainer(model, (32, 32))

    def maps(method, options, layer="layer1"):
        result = explainer.explain(x, [ExplainSpec(method, layer, None, options)] * len(x), layer_resolution=True)
        return torch.cat([e.maps for e in result.explanations])

    shallowcam = get_method("shallowcam")
    # the echoed options keep their old keys; the default start is the softmax start since issue 15
    assert shallowcam.options({}) == {"spatial": "relevance", "refine": False, "contrastive": True,
                                      "start": "softmax"}
    assert shallowcam.options({"beta": "positive", "beta_from": "layer", "start": "target"}) == {
        "spatial": "relevance", "refine": False, "contrastive": False, "beta": "positive"}
    assert torch.equal(maps("shallowcam", {"beta": "one", "spatial": "gradient"}), maps("layercam", {}))
    logits = model(x).detach()
    target = logits.argmax(1)
    _, relevance = engine_relevance(model, x, contrastive_seed(logits, target, True), ("layer1", "layer2"))
    with ForwardCapture(model, ["layer1"]) as capture, torch.enable_grad():
        y = model(x)
        A = capture.activations["layer1"]
        gradient = torch.autograd.grad(y.gather(1, target[:, None]).sum(), A)[0]
    A, R = A.detach(), relevance["layer1"]
    signed = R.sum(dim=(2, 3))
    signed = signed / signed.abs().amax(dim=1, keepdim=True)
    spread = relevance["layer2"].sum(1, keepdim=True)
    spread = torch.nn.functional.interpolate(spread, size=A.shape[-2:], mode="nearest") / 4
    above = (spread * A / (A.sum(1, keepdim=True) + 1e-12)).sum(dim=(2, 3))
    above = above / above.abs().amax(dim=1, keepdim=True)
    for options, beta in (({"beta": "positive"}, torch.relu(signed)), ({"beta_from": "above"}, above),
                          ({"beta": "positive", "beta_from": "above"}, torch.relu(above))):
        expected = normalise(torch.relu((beta[:, :, None, None] * torch.relu(gradient) * A).sum(1)))
        got = maps("shallowcam", {"spatial": "gradient", "contrastive": True, **options})
        assert (got - expected).abs().max().item() < 1e-4, options


def test_resnet20_relevance_conservation_per_stage(resnet20):
    """Pretrained CIFAR ResNet-20, one-hot start: the net relevance is the same at every stage
    (z⁺ on bias-free convs, pass BN/ReLU, proportional residual split) and equals the logit's but
    for the linear layer's bias share (measured 0.998 on the 250-image choose half); the positive
    part grows towards the top (signed ``bn2`` outputs in the residual sums). The served
    contrastive start (+1 / −1/N, each divided by its own logit in the ε-rule of the head)
    cancels: ΣR⁺ is many times the net. Normalised by the margin instead, it does not."""
    from camserve.lab.evaluate_faithfulness import make_explainer  # noqa: F401 - the margin switch lives there

    model, x = resnet20
    logits = model(x).detach()
    target = logits.argmax(1)
    stages = ("layer1", "layer2", "layer3")
    _, plain = engine_relevance(model, x, contrastive_seed(logits, target, False), stages)
    nets = torch.stack([plain[s].sum(dim=(1, 2, 3)) for s in stages])
    assert torch.allclose(nets, nets[-1].expand_as(nets), rtol=1e-4)
    assert ((nets > 0.9) & (nets <= 1.01)).all(), nets
    positive = [plain[s].clamp(min=0).sum().item() for s in stages]
    assert positive[0] <= positive[1] <= positive[2]
    _, contrastive = engine_relevance(model, x, contrastive_seed(logits, target, True), stages)
    r3 = contrastive["layer3"]
    assert r3.clamp(min=0).sum() > 5 * r3.sum().abs()       # +6.9 / −6.8 for a net of 0.13 on the choose half
    seed = contrastive_seed(logits, target, True)
    margin = (seed * logits).sum(1, keepdim=True)
    _, by_margin = engine_relevance(model, x, seed * stabilize(logits, 1e-12) / stabilize(margin, 1e-12), stages)
    m3 = by_margin["layer3"]
    assert m3.clamp(min=0).sum() < 2 * m3.sum().abs()


def test_contrastive_start_normalised_by_the_margin_gives_the_plain_maps(resnet20):
    """Why ``contrastive`` is no longer Shallow-CAM's default: normalised as one virtual output
    (the margin ``y_t − Σ_{c≠t} y_c / N``), the contrastive start's maps are the plain start's
    (the head's rows sum to ≈ 0: ``|Σ_c W_c|`` is 1.6 % of a row's norm for ResNet-20), while
    the served contrastive start (each ``−1/N`` divided by its own logit) gives other maps."""
    from camserve.lab.evaluate_faithfulness import make_explainer
    from camserve.engine.evaluation.metrics import spearman

    model, x = resnet20
    by_margin, served = make_explainer(model, (32, 32), "epsilon_plus", seed_norm="margin"), Explainer(model, (32, 32))

    def maps(explainer, layer, options):
        result = explainer.explain(x, [ExplainSpec("shallowcam", layer, None, options)] * len(x), layer_resolution=True)
        return torch.cat([e.maps for e in result.explanations])

    for layer in ("layer1", "layer2"):
        plain = maps(served, layer, {"contrastive": False})
        margin = maps(by_margin, layer, {"contrastive": True})
        contrastive = maps(served, layer, {"contrastive": True})
        assert (margin - plain).abs().max() < 0.01 and spearman(margin, plain).min() > 0.999
        assert spearman(contrastive, plain).mean() < 0.9
