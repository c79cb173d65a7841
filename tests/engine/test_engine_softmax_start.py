"""The initial relevance of the LRP-based methods (``start``; issue 15): the softmax-gradient start
(after SGLRP, Iwana et al. 2019) as one virtual output, its conservation at the head, its class
specificity, the option's validation and its ``contrastive`` alias.

``start=softmax`` explains ``z = y_t − Σ_{k≠t} q_k y_k`` (``q`` = the softmax of the other logits,
``∝ ∂ log p_t / ∂y``) with relevance ``z`` on that one output: the seed gradient at the logits is
``g = e_t − q`` and ``R_y = y ⊙ g``, with no per-class division by a logit.
"""

from __future__ import annotations

import pytest
import torch

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.capture import ForwardCapture
from camserve.engine.methods import get_method
from camserve.engine.lrp.composites import epsilon_plus
from camserve.engine.lrp.rules import stabilize
from camserve.engine.lrp.starts import contrastive_seed, relevance_seed, rival_seed, softmax_seed
from camserve.engine.errors import ExplanationInputError, InvalidOptionError
from camserve.engine.evaluation.metrics import spearman


def test_softmax_seed_is_the_normalised_softmax_gradient():
    """``e_t − q`` is ``∂ log p_t / ∂y = e_t − p`` divided by ``1 − p_t``; rows sum to 0; a
    float32-confident row (``p_t`` rounds to 1) keeps its contrast; one class: no NaN."""
    torch.manual_seed(0)
    logits = torch.randn(5, 10, dtype=torch.float64) * 3
    targets = torch.tensor([0, 3, 9, 2, 2])
    seed = softmax_seed(logits, targets)
    p = logits.softmax(1)
    grad = torch.eye(10, dtype=torch.float64)[targets] - p      # ∂ log p_t / ∂y
    p_t = p.gather(1, targets[:, None])
    assert torch.allclose(seed, grad / (1 - p_t), atol=1e-12)
    assert torch.allclose(seed.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert (seed.gather(1, targets[:, None]) == 1).all()
    confident = torch.tensor([[60.0, 1.0, 0.5, -2.0]])
    assert confident.softmax(1)[0, 0] == 1.0                   # 1 − p_t would be 0
    s = softmax_seed(confident, torch.tensor([0]))
    assert torch.isfinite(s).all() and s[0, 1] < -0.5 and s[0, 1:].sum().item() == pytest.approx(-1.0)
    assert torch.equal(softmax_seed(torch.tensor([[2.0]]), torch.tensor([0])), torch.tensor([[1.0]]))


def test_rival_seed_contrasts_the_strongest_competitor_and_is_the_cold_softmax_limit():
    """``e_t − e_r``, ``r`` the largest other logit; the softmax seed of ``y / T`` tends to it as
    ``T → 0``; one class: the one-hot."""
    logits = torch.tensor([[2.0, 5.0, 1.0, 4.0], [0.0, -1.0, 3.0, 2.5]])
    targets = torch.tensor([1, 0])
    seed = rival_seed(logits, targets)
    assert torch.equal(seed, torch.tensor([[0.0, 1.0, 0.0, -1.0], [1.0, 0.0, -1.0, 0.0]]))
    assert torch.allclose(softmax_seed(logits / 1e-3, targets), seed, atol=1e-6)
    assert torch.equal(relevance_seed(logits, targets, ["rival", "rival"]), seed)
    assert torch.equal(rival_seed(torch.ones(2, 1), torch.zeros(2, dtype=torch.long)), torch.ones(2, 1))


def test_relevance_seed_keeps_the_old_starts_bit_identical_and_mixes_rows():
    """``target`` / ``contrastive`` rows get exactly the seed the explainer built before (``e_t`` or
    ``e_t − (1 − e_t)/N``, each divided by its own logit); ``margin`` divides by the margin;
    ``softmax`` divides by nothing; every row its own start in one call."""
    torch.manual_seed(1)
    logits = torch.randn(4, 7)
    targets = torch.tensor([1, 2, 3, 4])
    starts = ["target", "contrastive", "margin", "softmax"]
    seed = relevance_seed(logits, targets, starts)
    old = contrastive_seed(logits, targets, torch.tensor([[0.0], [1.0], [0.0], [0.0]])) / stabilize(logits, 1e-12)
    assert torch.equal(seed[:2], old[:2])
    uniform = contrastive_seed(logits, targets, True)[2]
    assert torch.allclose(seed[2], uniform / (uniform * logits[2]).sum(), rtol=1e-6)
    assert torch.equal(seed[3], softmax_seed(logits, targets)[3])
    relevance = logits * seed                                  # R_y = y ⊙ g
    q = logits[3].scatter(0, targets[3:], float("-inf")).softmax(0)
    z = logits[3, 4] - (q * logits[3]).sum()
    assert relevance[0].sum().item() == pytest.approx(1.0)
    assert relevance[1].sum().item() == pytest.approx(1 / 7, rel=1e-5)
    assert relevance[2].sum().item() == pytest.approx(1.0, rel=1e-5)
    assert relevance[3].sum().item() == pytest.approx(z.item(), rel=1e-5)   # the virtual output's value


def test_softmax_start_is_conserved_at_the_head(resnet20):
    """ResNet-20: with relevance ``z`` on the virtual output, the relevance at the logits sums to
    ``z`` and the relevance that reaches ``layer3`` (through the ε-rule of the head and the
    average pool) to ``z − s·b`` (``s = e_t − q``, ``b`` the head's bias: the bias's share), down to
    ``layer1``; no per-class blow-up: ΣR⁺ / |ΣR| at ``layer3`` far below the served contrastive start's."""
    model, x = resnet20
    layers = ("layer1", "layer2", "layer3")
    rules = epsilon_plus().assign(model.named_modules())
    with ForwardCapture(model, layers, rules) as capture, torch.enable_grad():
        logits = model(x)
        y = logits.detach()
        for rank in (0, 1):                                   # top-1 and top-2 classes
            targets = y.topk(2, dim=1).indices[:, rank]
            seed = relevance_seed(y, targets, ["softmax"] * len(x))
            capture.mode = "relevance"
            grads = torch.autograd.grad(logits, [capture.activations[n] for n in layers], seed, retain_graph=True)
            capture.mode = "gradient"
            z = (y * seed).sum(1)                             # ΣR at the logits
            q = y.scatter(1, targets[:, None], float("-inf")).softmax(1)
            assert torch.allclose(z, y.gather(1, targets[:, None])[:, 0] - (q * y).sum(1), atol=1e-5)
            if rank == 0:
                assert (z > 0).all()
            else:
                assert (z < 0).all()                          # the runner-up explained against the winner
            bias_share = seed @ model.linear.bias.detach()
            for name, g in zip(layers, grads):
                r = capture.activations[name].detach() * g
                net = r.sum(dim=(1, 2, 3))
                assert torch.allclose(net, z - bias_share, rtol=2e-3, atol=1e-4), (name, net, z - bias_share)
            if rank == 0:  # cancellation at layer3, median ΣR⁺ / |ΣR|: softmax 2.9, served contrastive 18.7
                ratio = {}
                for start in ("softmax", "contrastive"):
                    capture.mode = "relevance"
                    g3, = torch.autograd.grad(logits, [capture.activations["layer3"]],
                                              relevance_seed(y, targets, [start] * len(x)), retain_graph=True)
                    capture.mode = "gradient"
                    r3 = capture.activations["layer3"].detach() * g3
                    ratio[start] = (r3.clamp(min=0).sum(dim=(1, 2, 3)) / r3.sum(dim=(1, 2, 3)).abs()).median()
                assert ratio["softmax"] < 5 and ratio["softmax"] < ratio["contrastive"] / 3, ratio


def test_softmax_start_maps_are_class_specific(resnet20):
    """The maps of the top-1 and top-2 classes differ (measured rho12 ≈ 0.0–0.3 at layer1/layer2 on
    the ResNet-20 choose half: 0.02 / 0.30, against 0.61 / 0.68 for the plain start)."""
    model, x = resnet20
    explainer = Explainer(model, (32, 32))
    for layer in ("layer1", "layer2"):
        rho = {}
        for start in ("target", "softmax"):
            result = explainer.explain(x, [ExplainSpec("shallowcam", layer, "top2", {"start": start})] * len(x),
                                       layer_resolution=True)
            maps = torch.stack([e.maps for e in result.explanations])
            assert not torch.allclose(maps[:, 0], maps[:, 1])
            rho[start] = spearman(maps[:, 0], maps[:, 1]).mean().item()
        assert rho["softmax"] < 0.5 and rho["softmax"] < rho["target"] - 0.2, (layer, rho)


def test_rows_with_different_starts_share_one_backward(resnet20):
    """A batch whose rows ask for different starts (one relevance backward, one seed per row) gives
    each row the map it gets alone."""
    model, x = resnet20
    explainer = Explainer(model, (32, 32))
    starts = ["softmax", "target", "contrastive", "margin", "rival"]
    x = torch.cat([x, x[:1]])  # one row per start
    mixed = explainer.explain(x, [ExplainSpec("shallowcam", "layer1", None, {"start": s}) for s in starts],
                              layer_resolution=True)
    for i, start in enumerate(starts):
        alone = explainer.explain(x[i:i + 1], [ExplainSpec("shallowcam", "layer1", None, {"start": start})],
                                  layer_resolution=True)
        assert (mixed.explanations[i].maps - alone.explanations[0].maps).abs().max() < 1e-4, start
    relevancecam = explainer.explain(x[:2], [ExplainSpec("relevancecam", "layer2", None, {"start": "softmax"}),
                                             ExplainSpec("relevancecam", "layer2", None, {})], layer_resolution=True)
    assert relevancecam.explanations[0].options == {"contrastive": True, "start": "softmax"}
    assert relevancecam.explanations[1].options == {"contrastive": True}


@pytest.mark.parametrize("method", ["shallowcam", "relevancecam"])
def test_start_option_is_validated_and_contrastive_stays_its_alias(resnet20, method):
    model, x = resnet20
    explainer = Explainer(model, (32, 32))
    m = get_method(method)
    for bad, fragment in (({"start": "uniform"}, "'start'"), ({"start": 1}, "'start'"),
                          ({"start": "softmax", "contrastive": False}, "conflict"),
                          ({"start": "target", "contrastive": "1"}, "conflict")):
        with pytest.raises(InvalidOptionError, match=fragment):
            explainer.validate(ExplainSpec(method, "layer1", None, bad))
        assert issubclass(InvalidOptionError, ExplanationInputError)  # answered with a 400
    # the old spellings resolve as before; start=target/contrastive are their aliases
    assert m.options({"contrastive": False}) == m.options({"start": "target"}) == m.options(
        {"start": "Target", "contrastive": "off"})
    assert m.options({"contrastive": True}) == m.options({"start": "contrastive"})
    assert "start" not in m.options({"contrastive": True})
    assert m.options({"start": "softmax"})["start"] == "softmax"
    assert m.options({"start": "softmax", "contrastive": True}) == m.options({"start": "softmax"})
    # the defaults: Shallow-CAM the softmax start (issue 15), Relevance-CAM the uniform contrastive start
    default = {"shallowcam": {"spatial": "relevance", "refine": False, "contrastive": True, "start": "softmax"},
               "relevancecam": {"contrastive": True}}[method]
    assert m.options({}) == default
    a = explainer.explain(x, [ExplainSpec(method, "layer1", None, {})] * len(x), layer_resolution=True)
    b = explainer.explain(x, [ExplainSpec(method, "layer1", None, {"start": "softmax" if method == "shallowcam"
                                                                   else "contrastive"})] * len(x),
                          layer_resolution=True)
    assert all(torch.equal(e.maps, f.maps) for e, f in zip(a.explanations, b.explanations))


def test_softmax_temperature_spans_the_rival_and_the_uniform_contrast():
    """``q = softmax_{k≠t}(y / T)``: ``T = 1`` is the softmax seed unchanged (bit for bit), a cold
    ``T`` the rival seed, a hot one the uniform ``−1/(N−1)``; rows may carry their own ``T``."""
    torch.manual_seed(2)
    logits = torch.randn(3, 6) * 4
    targets = torch.tensor([0, 5, 2])
    assert torch.equal(softmax_seed(logits, targets, 1.0), softmax_seed(logits, targets))
    assert torch.allclose(softmax_seed(logits, targets, 1e-3), rival_seed(logits, targets), atol=1e-6)
    hot = softmax_seed(logits, targets, 1e6)
    uniform = torch.full_like(hot, -1 / 5).scatter_(1, targets[:, None], 1.0)
    assert torch.allclose(hot, uniform, atol=1e-5)
    per_row = relevance_seed(logits, targets, ["softmax"] * 3, [1.0, 4.0, 1e-3])
    assert torch.equal(per_row[0], softmax_seed(logits, targets)[0])
    assert torch.allclose(per_row[1], softmax_seed(logits / 4.0, targets)[1], atol=1e-6)
    assert torch.allclose(per_row[2], rival_seed(logits, targets)[2], atol=1e-6)


@pytest.mark.parametrize("method", ["shallowcam", "relevancecam"])
def test_temperature_option_is_validated_quiet_at_one_and_changes_the_maps(resnet20, method):
    """``temperature`` is a positive number for ``start=softmax`` only; ``T = 1`` is not echoed
    (the default's answer unchanged); another ``T`` is echoed and gives other maps, each row in a
    mixed batch the map it gets alone."""
    model, x = resnet20
    explainer = Explainer(model, (32, 32))
    m = get_method(method)
    for bad, fragment in (({"start": "softmax", "temperature": 0}, "positive"),
                          ({"start": "softmax", "temperature": "warm"}, "positive"),
                          ({"start": "softmax", "temperature": "nan"}, "positive"),
                          ({"start": "softmax", "temperature": True}, "positive"),
                          ({"start": "softmax", "temperature": "1e-300"}, "positive"),
                          ({"start": "softmax", "temperature": 1e9}, "positive"),
                          ({"start": "target", "temperature": 2}, "start='softmax' only"),
                          ({"start": "rival", "temperature": 2}, "start='softmax' only")):
        with pytest.raises(InvalidOptionError, match=fragment):
            explainer.validate(ExplainSpec(method, "layer1", None, bad))
    assert m.options({"start": "softmax", "temperature": "1"}) == m.options({"start": "softmax"})
    assert m.options({"start": "softmax", "temperature": "4"})["temperature"] == 4.0
    specs = [ExplainSpec(method, "layer1", None, {"start": "softmax", "temperature": t}) for t in (1, 8, 1, 8)]
    mixed = explainer.explain(x[:4], specs, layer_resolution=True)
    assert "temperature" not in mixed.explanations[0].options
    assert mixed.explanations[1].options["temperature"] == 8.0
    assert not torch.allclose(mixed.explanations[0].maps, explainer.explain(
        x[:1], [specs[1]], layer_resolution=True).explanations[0].maps)
    for i, spec in enumerate(specs):
        alone = explainer.explain(x[i:i + 1], [spec], layer_resolution=True).explanations[0].maps
        assert (mixed.explanations[i].maps - alone).abs().max() < 1e-4


def test_beta_from_auto_is_above_where_there_is_a_layer_above_and_layer_at_the_last(resnet20):
    """``beta_from=auto`` gives ``beta_from=above``'s maps at ``layer1`` / ``layer2`` and
    ``beta_from=layer``'s at ``layer3`` (the last feature map, where ``above`` is an error)."""
    model, x = resnet20
    explainer = Explainer(model, (32, 32))

    def maps(layer, options):
        result = explainer.explain(x, [ExplainSpec("shallowcam", layer, None, options)] * len(x),
                                   layer_resolution=True)
        return torch.stack([e.maps for e in result.explanations])

    for layer, same_as in (("layer1", "above"), ("layer2", "above"), ("layer3", "layer")):
        auto = maps(layer, {"beta_from": "auto", "temperature": 4})
        assert torch.equal(auto, maps(layer, {"beta_from": same_as, "temperature": 4})), layer
    assert not torch.equal(maps("layer1", {"beta_from": "auto"}), maps("layer1", {}))
    with pytest.raises(ExplanationInputError, match="no layer above"):
        explainer.validate(ExplainSpec("shallowcam", "layer3", None, {"beta_from": "above"}))
    explainer.validate(ExplainSpec("shallowcam", "layer3", None, {"beta_from": "auto"}))
