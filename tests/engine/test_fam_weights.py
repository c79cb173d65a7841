"""Channel weights of the FAM family (issue 21, item 2): product, SFAM, neighbour-averaged and Jacobian
weights as ``FamSpec(weights=…)``, on the pretrained CIFAR-10 ResNet-56 pooled features
(``../shared/models/cifar-resnet``) and real CIFAR-10 test JPEGs, at the last map and below it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import SHARED
from camserve.engine.errors import InvalidOptionError, InvalidReferenceError
from camserve.engine.methods.similarity.channel_weights import (neighbour_weights, product_weights, select_neighbours,
                                                                sfam_weights)
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.models.embedding import EmbeddingModel

WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"


@pytest.fixture(scope="module")
def cifar():
    """ResNet-56 (GAP of layer3, L2-normalised), a 40-image labelled gallery from the even positions of
    the sorted set and 4 queries from the odd positions."""
    from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet

    if not WEIGHTS.exists():
        pytest.fail(f"shared CIFAR ResNet-56 weights not found at {WEIGHTS}")
    data = SHARED / "data" / "cifar10-test"
    items = image_set("cifar", data, 400, 0)
    gallery_items, query_items = items[0::2][::5][:40], items[1::2][::50][:4]
    model = load_cifar_resnet(str(WEIGHTS), 56, torch.device("cpu"))
    embedding = EmbeddingModel.from_classifier(model, "layer3", normalize=True)
    gallery_images = load_batch("cifar", data, [f for f, _ in gallery_items], "cpu")
    gallery = Gallery.build(embedding, gallery_images, [str(label) for _, label in gallery_items])
    queries = load_batch("cifar", data, [f for f, _ in query_items], "cpu")
    return FamExplainer(embedding, gallery, input_size=(32, 32)), queries, embedding


def specs(queries, **options):
    return [FamSpec(reference_image=q.flip(-1), **options) for q in queries]


def test_product_is_todays_fam_and_jacobian_weights_equal_it_on_pooled_features(cifar):
    fam, queries, _ = cifar
    today = fam.explain(queries, specs(queries))
    product = fam.explain(queries, specs(queries, weights="product"))
    jacobian = fam.explain(queries, specs(queries, weights="jacobian"))
    for old, new, jac in zip(today.items, product.items, jacobian.items):
        assert torch.equal(old.query_map, new.query_map) and old.weights == new.weights == "product"
        assert jac.route == "jacobian" and jac.weights == "jacobian" and jac.passes["backward"] == 1
        # c = f ⊙ ∂s̃/∂f with the norms held constant is q_k r_k/(‖q‖‖r‖) for the normalised pooled map
        assert torch.allclose(jac.contributions, old.contributions, atol=1e-6)
        assert abs(float(jac.contributions.sum()) - jac.similarity) < 1e-4


def test_sfam_cosine_scores_are_the_similarity_lost_without_each_channel(cifar):
    fam, queries, embedding = cifar
    result = fam.explain(queries[:2], specs(queries[:2], weights="sfam"))
    refs = embedding(queries[:2].flip(-1))
    for item, q, r in zip(result.items, result.embeddings, refs):
        assert item.weights == "sfam" and item.route == "pooled" and item.passes["backward"] == 0
        for k in (0, 17, 63):
            keep = torch.ones_like(q, dtype=torch.bool)
            keep[k] = False
            lost = torch.cosine_similarity(q, r, dim=0) - torch.cosine_similarity(q[keep], r[keep], dim=0)
            assert float(item.contributions[k]) == pytest.approx(float(lost), abs=1e-5)
        assert 0.5 < float(item.query_map.max()) <= 1.0 and float(item.query_map.min()) >= 0.0
    euclidean = sfam_weights(result.embeddings[0], refs[0], "euclidean")
    assert abs(float(euclidean.sum())) < 1e-6 and (euclidean > 0).any() and (euclidean < 0).any()
    assert torch.equal(sfam_weights(refs[0], refs[1], "dot"), product_weights(refs[0], refs[1], "dot"))


def test_neighbour_weights_average_the_products_over_the_elected_neighbours(cifar):
    fam, queries, _ = cifar
    result = fam.explain(queries, [FamSpec(gallery_topk=2, weights="neighbour", neighbours=7) for _ in queries])
    for q, item in zip(result.embeddings, result.items):
        indices, label = item.neighbours["indices"], item.neighbours["label"]
        assert (indices, label) == select_neighbours(q, fam.gallery.embeddings, fam.gallery.labels, 7)
        assert 1 <= len(indices) <= 7 and all(fam.gallery.labels[i] == label for i in indices)
        expected = torch.stack([product_weights(q, fam.gallery.embeddings[i], "cosine") for i in indices]).mean(0)
        assert torch.allclose(item.contributions, expected, atol=1e-7)
        assert torch.allclose(item.contributions, neighbour_weights(q, fam.gallery.embeddings[indices], "cosine"))
        # the same weights explain every match; the similarity reported is still the match's own
        assert len(item.matches) == 2 and item.similarity == item.matches[0]["similarity"]
        assert item.matches[1]["reference_map"] is not None
    default = fam.explain(queries[:1], [FamSpec(reference_image=queries[1], weights="neighbour")]).items[0]
    assert len(default.neighbours["indices"]) <= 5


def test_weights_seed_the_relevance_below_the_last_map(cifar):
    fam, queries, _ = cifar
    for weights in ("product", "sfam", "neighbour", "jacobian"):
        result = fam.explain(queries[:2], specs(queries[:2], weights=weights, layer="stage2"))
        item, alive = result.items[0], result.embeddings[0] > 0
        assert item.route == "relevance" and item.weights == weights and item.layer_shape == (16, 16)
        # the relevance seeded at the pooled feature is Σ_k c_k of the chosen weights over the channels alive
        # in the query (SFAM scores a dead channel too: removing it changes the reference's norm)
        scale = float(item.contributions.abs().sum())  # sums near 0 (SFAM's) are compared on Σ|c|
        assert item.relevance["embedding"] == pytest.approx(float(item.contributions[alive].sum()), abs=1e-4 * scale)
        assert item.relevance["layer"] == pytest.approx(item.relevance["embedding"], abs=1e-3 * scale)
        assert 0.5 < float(item.query_map.max()) <= 1.0
    sfam = fam.explain(queries[:1], specs(queries[:1], weights="sfam", layer="stage1")).items[0]
    product = fam.explain(queries[:1], specs(queries[:1], weights="product", layer="stage1")).items[0]
    assert not torch.equal(sfam.query_map, product.query_map)


def test_neighbour_weights_on_a_projection_head_are_the_averaged_jacobian_weights(cifar):
    """A bias-free ReLU head is positively homogeneous: Σ c = s̃ exactly, for each neighbour and their mean."""
    _, queries, embedding = cifar
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(64, 96, bias=False), nn.ReLU(), nn.Linear(96, 32, bias=False))
    projected = EmbeddingModel.from_classifier(embedding.backbone, "layer3", normalize=True, projection=head)
    gallery = Gallery.build(projected, queries[1:], ["a", "a", "b"])
    fam = FamExplainer(projected, gallery, input_size=(32, 32))
    item = fam.explain(queries[:1], [FamSpec(reference_image=queries[1], weights="neighbour", neighbours=3)]).items[0]
    assert item.route == "jacobian" and item.weights == "neighbour"
    indices = item.neighbours["indices"]
    singles = [fam.explain(queries[:1], [FamSpec(reference_embedding=gallery.embeddings[i].tolist())]).items[0]
               for i in indices]
    mean = torch.stack([s.contributions for s in singles]).mean(0)
    assert torch.allclose(item.contributions, mean, atol=1e-6)
    mean_cosine = sum(s.similarity for s in singles) / len(singles)
    assert float(item.contributions.sum()) == pytest.approx(mean_cosine, abs=1e-5)
    for s in singles:
        assert float(s.contributions.sum()) == pytest.approx(s.similarity, abs=1e-5)


def test_weight_options_answer_clear_400s(cifar):
    fam, queries, embedding = cifar
    q, r = queries[:1], queries[1]
    cases = [
        (FamSpec(reference_image=r, weights="nope"), InvalidOptionError, "unknown FAM weights"),
        (FamSpec(reference_image=r, weights="sfam", method="gradcam_similarity"), InvalidOptionError, "gradcam"),
        (FamSpec(reference_image=r, weights="product", neighbours=3), InvalidOptionError, "neighbours applies"),
        (FamSpec(reference_image=r, weights="neighbour", neighbours=0), InvalidOptionError, "≥ 1"),
        (FamSpec(reference_image=r, weights="neighbour", neighbours=2.5), InvalidOptionError, "integer"),
        (FamSpec(reference_image=r, weights="neighbour", neighbours=41), InvalidReferenceError, "exceeds"),
        (FamSpec(reference_image=r, weights="sfam", route="jacobian"), InvalidOptionError, "pooled route"),
        (FamSpec(reference_image=r, weights="jacobian", route="pooled"), InvalidOptionError, "jacobian route"),
    ]
    for spec, error, text in cases:
        with pytest.raises(error, match=text):
            fam.explain(q, [spec])
    no_gallery = FamExplainer(embedding, input_size=(32, 32))
    with pytest.raises(InvalidReferenceError, match="gallery is empty"):
        no_gallery.explain(q, [FamSpec(reference_image=r, weights="neighbour")])
    head = EmbeddingModel.from_classifier(embedding.backbone, "layer3", projection=nn.Linear(64, 16, bias=False))
    with pytest.raises(InvalidOptionError, match="projection head"):
        FamExplainer(head, input_size=(32, 32)).explain(q, [FamSpec(reference_image=r, weights="product")])
