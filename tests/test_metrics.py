"""RISE deletion/insertion (engine/metrics.py): AUC math, ranking, constructed cases, the real model."""

from __future__ import annotations

import pytest
import torch

from camserve.engine.errors import InvalidInputError
from camserve.engine.metrics import (auc, classifier_score, deletion_insertion, endpoint_scores, gaussian_blur,
                                     pixel_ranks, random_maps, similarity_score, step_counts)


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
    assert pixel_ranks(maps).tolist() == [[3, 0, 1, 2]]         # ties keep pixel order
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
    from camserve.engine.embedding import load_effnet_lite0_embedding

    embedding = load_effnet_lite0_embedding(normalize=True, backbone=effnet)
    query = effnet_batch[0][:1]
    with torch.inference_mode():
        reference = embedding(query)
    curves = deletion_insertion(similarity_score(embedding, reference), query,
                                random_maps(1, (224, 224)), steps=2, batch_size=4)
    assert curves.deletion[0, 0].item() == pytest.approx(1.0, abs=1e-4)   # query == reference at step 0
    assert curves.deletion[0, -1].item() < 0.9                             # an all-zero image is far from it
