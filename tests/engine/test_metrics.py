"""RISE deletion/insertion (engine/evaluation/metrics.py): AUC math, ranking, constructed cases, the real model."""

from __future__ import annotations

import pytest
import torch

from camserve.engine.errors import InvalidInputError
from camserve.engine.core.rank_correlation import average_ranks, spearman_rows
from camserve.engine.evaluation.metrics import (auc, classifier_score, deletion_insertion, endpoint_scores,
                                     gaussian_blur, paired, perturbation_curves, pixel_ranks, random_maps,
                                     source_scores,
                                     similarity_score, spearman, step_counts)


def test_auc_is_the_trapezoid_rule_on_unit_axis():
    assert auc(torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0])).item() == pytest.approx(0.25 * (0.75 + 0.25))
    assert auc(torch.full((9,), 0.3)).item() == pytest.approx(0.3)
    curve = torch.linspace(0, 1, 11) ** 2                       # ∫x² = 1/3, trapezoid overestimates by 1/600
    assert auc(curve).item() == pytest.approx(1 / 3 + 1 / 600, abs=1e-6)
    assert auc(torch.tensor([[1.0, 1.0], [0.0, 1.0]])).tolist() == pytest.approx([1.0, 0.5])
    with pytest.raises(InvalidInputError):
        auc(torch.tensor([1.0]))


def test_ranks_and_step_counts():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert pixel_ranks(maps, tie_seed=None).tolist() == [[3, 0, 1, 2]]   # legacy: ties keep pixel order
    assert pixel_ranks(maps)[0, :2].tolist() == [3, 0] and sorted(pixel_ranks(maps)[0, 2:].tolist()) == [1, 2]
    assert step_counts(64, 4).tolist() == [0, 16, 32, 48, 64]
    assert step_counts(10, 3).tolist() == [0, 4, 7, 10]


def test_blur_is_normalised_and_smooths():
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1
    out = gaussian_blur(spike)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out.max().item() < 0.02  # 11×11, σ 5: ≈ 1/84 at the centre


def _object_case(map_kind: str, steps: int = 4):
    """Image of ones; the score is the mean of channel 0 over an 4×4 'object' of an 8×8 image."""
    images = torch.ones(1, 3, 8, 8)
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[:4, :4] = True
    maps = {"perfect": obj.float(), "inverted": (~obj).float()}[map_kind][None]

    def score(batch, owners):
        return batch[:, 0][:, obj].mean(dim=1)

    return deletion_insertion(score, images, maps, steps=steps, batch_size=3)


def test_deletion_perfect_vs_inverted_map_exact():
    perfect, inverted = _object_case("perfect"), _object_case("inverted")
    assert perfect.deletion[0].tolist() == pytest.approx([1, 0, 0, 0, 0])
    assert inverted.deletion[0].tolist() == pytest.approx([1, 1, 1, 1, 0])
    assert perfect.deletion_auc.item() == pytest.approx(0.125)
    assert inverted.deletion_auc.item() == pytest.approx(0.875)
    assert perfect.fractions.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_insertion_restores_the_ranked_pixels_onto_the_blur():
    images = torch.zeros(1, 3, 8, 8)
    images[:, :, :4, :4] = 1.0
    blurred = gaussian_blur(images)
    maps = images[:, 0]

    def score(batch, owners):
        return batch[:, 0, :4, :4].mean(dim=(1, 2))

    curves = deletion_insertion(score, images, maps, steps=4, batch_size=2, blurred=blurred)
    assert curves.insertion[0, 0].item() == pytest.approx(blurred[0, 0, :4, :4].mean().item())
    assert curves.insertion[0, 1:].tolist() == pytest.approx([1, 1, 1, 1])  # the object comes back first


def test_bad_shapes_are_rejected():
    with pytest.raises(InvalidInputError):
        deletion_insertion(lambda b, o: b.mean((1, 2, 3)), torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(InvalidInputError):
        deletion_insertion(lambda b, o: b.mean((1, 2, 3)), torch.zeros(3, 8, 8), torch.zeros(1, 8, 8))


def test_real_model_good_map_beats_random_beats_inverted(effnet, effnet_batch):
    """Grad-CAM at the head on 2 real photographs: its map, a random map, and 1 − map."""
    from camserve.engine import Explainer, ExplainSpec

    images = effnet_batch[0][:2]
    explainer = Explainer(effnet, (224, 224), default_layer="_conv_head")
    result = explainer.explain(images, [ExplainSpec("gradcam")] * 2)
    good = torch.stack([e.maps[0] for e in result.explanations])
    classes = result.logits.argmax(1)
    score = classifier_score(effnet, classes)
    blurred = gaussian_blur(images)
    ends = endpoint_scores(score, images, blurred)
    run = lambda m: deletion_insertion(score, images, m, steps=5, batch_size=16, blurred=blurred, endpoints=ends)
    curves = {"good": run(good), "random": run(random_maps(2, (224, 224), seed=1)), "inverted": run(1 - good)}
    clean = torch.softmax(result.logits, 1).gather(1, classes[:, None])[:, 0]
    for c in curves.values():
        assert torch.allclose(c.deletion[:, 0], clean, atol=1e-4)    # step 0 of deletion = clean image
        assert torch.allclose(c.insertion[:, -1], clean, atol=1e-4)  # last step of insertion = clean image
    overall = {k: c.overall.mean().item() for k, c in curves.items()}
    assert overall["good"] > overall["random"] > overall["inverted"], overall


def test_similarity_variant_tracks_cosine_to_the_reference(effnet, effnet_batch):
    from camserve.engine.models.embedding import load_effnet_lite0_embedding

    embedding = load_effnet_lite0_embedding(normalize=True, backbone=effnet)
    query = effnet_batch[0][:1]
    with torch.inference_mode():
        reference = embedding(query)
    curves = deletion_insertion(similarity_score(embedding, reference), query,
                                random_maps(1, (224, 224)), steps=2, batch_size=4)
    assert curves.deletion[0, 0].item() == pytest.approx(1.0, abs=1e-4)   # query == reference at step 0
    assert curves.deletion[0, -1].item() < 0.9                             # an all-zero image is far from it


def test_ties_are_broken_at_random_not_top_row_first():
    """A map that is flat zero except one pixel: the plateau must be deleted in a seeded random
    order, so after half the steps about half of the top rows survive (raster order: none)."""
    maps = torch.zeros(1, 32, 32)
    maps[0, 31, 31] = 1.0
    ranks = pixel_ranks(maps, tie_seed=0)
    assert ranks[0, 32 * 32 - 1].item() == 0                        # the salient pixel first
    assert sorted(ranks[0].tolist()) == list(range(32 * 32))        # a permutation
    first_half = (ranks[0] < 512).view(32, 32)
    top_rows = first_half[:16].float().mean().item()
    assert 0.4 < top_rows < 0.6, top_rows                           # raster order would give 1.0
    assert torch.equal(ranks, pixel_ranks(maps, tie_seed=0))        # seeded: reproducible
    assert not torch.equal(ranks, pixel_ranks(maps, tie_seed=1))
    legacy = (pixel_ranks(maps, tie_seed=None)[0] < 512).view(32, 32)
    assert legacy[:15].all()                                        # raster order: the top rows go first


def test_blur_deletion_and_perturbation_curves_agree_with_deletion_insertion():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    weights = torch.randn(3, 8, 8)

    def score(batch, owners):
        return (batch * weights).sum(dim=(1, 2, 3))

    def score2(batch, owners):
        s = score(batch, owners)
        return torch.stack([s, -s], 1)

    blurred = gaussian_blur(images)
    zero = deletion_insertion(score, images, maps, steps=5, batch_size=4, blurred=blurred)
    blur = deletion_insertion(score, images, maps, steps=5, batch_size=4, blurred=blurred, deletion_fill="blur")
    curves = perturbation_curves(score2, images, maps, steps=5, batch_size=7, blurred=blurred)
    assert torch.allclose(curves["deletion_zero"][..., 0], zero.deletion, atol=1e-5)
    assert torch.allclose(curves["deletion_blur"][..., 0], blur.deletion, atol=1e-5)
    assert torch.allclose(curves["insertion_blur"][..., 0], zero.insertion, atol=1e-5)
    assert torch.allclose(curves["deletion_zero"][..., 1], -zero.deletion, atol=1e-5)
    assert torch.allclose(blur.deletion[:, -1], score(blurred, None), atol=1e-5)   # deleted to the blur
    assert torch.allclose(blur.insertion, zero.insertion)


def test_shared_endpoints_give_the_same_curves_with_fewer_forwards():
    """Step 0 is the start image and step S the whole source image for any map: with ``fixed`` (the
    sources' scores, computed once) only the S − 1 interior steps are forwarded, the curves equal."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    weights = torch.randn(3, 8, 8)
    forwarded = []

    def score2(batch, owners):
        forwarded.append(batch.shape[0])
        s = (batch * weights).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], 1)

    blurred = gaussian_blur(images)
    full = perturbation_curves(score2, images, maps, steps=5, batch_size=7, blurred=blurred)
    assert sum(forwarded) == 3 * 3 * 6
    fixed = source_scores(score2, images, blurred, batch_size=2)
    assert set(fixed) == {"clean", "blurred", "zeros"} and fixed["clean"].shape == (3, 2)
    forwarded.clear()
    shared = perturbation_curves(score2, images, maps, steps=5, batch_size=7, blurred=blurred, fixed=fixed)
    assert sum(forwarded) == 3 * 3 * 4  # the interior steps only
    for kind in full:
        assert torch.allclose(shared[kind], full[kind], atol=1e-5), kind
    one = perturbation_curves(lambda b, o: score2(b, o)[:, :1], images, maps, steps=5, kinds=("deletion_zero",),
                              blurred=blurred,
                              fixed={k: v[:, :1] for k, v in fixed.items()})
    assert one["deletion_zero"].shape == (3, 6, 1)
    assert torch.allclose(one["deletion_zero"][..., 0], full["deletion_zero"][..., 0], atol=1e-5)


def test_spearman_and_paired_statistics():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0, 4.0, 9.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert average_ranks(a)[0].tolist() == [1.0, 2.5, 2.5, 4.0, 0.0]             # scipy's rankdata less one
    rho = spearman(a, b)
    assert rho[0].item() == pytest.approx(1.0) and rho[1].item() == 0.0       # constant row → 0 (the lab's)
    undefined = spearman_rows(a, b)                                             # one definition, NaN by default
    assert undefined[0].item() == pytest.approx(1.0) and undefined[1].isnan()
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = torch.rand(4, 50).round(decimals=1), torch.rand(4, 50)
    for i in range(4):
        assert spearman(x[i:i + 1], y[i:i + 1]).item() == pytest.approx(scipy_stats.spearmanr(x[i], y[i])[0], abs=1e-9)
    p = paired([0.5, 0.4, 0.3, 0.2], [0.4, 0.4, 0.1, 0.3])
    assert p["diff"] == pytest.approx(0.05) and p["wins"] == 2 and p["losses"] == 1 and p["ties"] == 1
    assert p["sem"] == pytest.approx(torch.tensor([0.1, 0.0, 0.2, -0.1], dtype=torch.float64).std().item() / 2)
