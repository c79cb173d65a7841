"""Few-shot prototypes (issue 21, item 3): a 5-way 5-shot nearest-centroid episode on the pretrained
CIFAR-10 ResNet-56 pooled features, support from the even positions of the sorted CIFAR-10 test JPEGs,
queries from the odd positions; the query's FAM map against the winning prototype and each shot's map."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from camserve.engine.errors import InvalidReferenceError
from camserve.engine.methods.similarity.fam import FamExplainer
from camserve.engine.methods.similarity.prototypes import (build_episode, centre_and_normalise, classify,
                                                         explain_queries, prototype_spec)
from camserve.engine.models.embedding import EmbeddingModel

WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"
CLASSES = ("airplane", "cat", "frog", "ship", "truck")


@pytest.fixture(scope="module")
def episode_data():
    from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet

    if not WEIGHTS.exists():
        pytest.fail(f"shared CIFAR ResNet-56 weights not found at {WEIGHTS}")
    data = SHARED / "data" / "cifar10-test"
    items = image_set("cifar", data, 1000, 0)
    names = sorted(p.name for p in data.iterdir() if p.is_dir())
    wanted = [names.index(c) for c in CLASSES]
    support = []
    for y in wanted:
        support += [(f, label) for f, label in items[0::2] if label == y][:5]
    queries = []
    for y in wanted:
        queries += [(f, label) for f, label in items[1::2] if label == y][:4]
    model = load_cifar_resnet(str(WEIGHTS), 56, torch.device("cpu"))
    embedding = EmbeddingModel.from_classifier(model, "layer3", normalize=True)
    return (embedding, load_batch("cifar", data, [f for f, _ in support], "cpu"), [names[y] for _, y in support],
            load_batch("cifar", data, [f for f, _ in queries], "cpu"), [names[y] for _, y in queries])


def test_nearest_centroid_on_centred_normalised_features(episode_data):
    embedding, support, support_labels, queries, query_labels = episode_data
    episode = build_episode(embedding, support, support_labels)
    assert episode.classes == list(CLASSES) and episode.prototypes.shape == (5, 64)
    x = centre_and_normalise(episode.support_embeddings, episode.mean)
    assert torch.allclose(x.norm(dim=1), torch.ones(25), atol=1e-5)
    assert torch.allclose(episode.prototypes[1], x[5:10].mean(0))
    labels, scores = classify(episode, embedding(queries))
    accuracy = sum(a == b for a, b in zip(labels, query_labels)) / len(query_labels)
    assert accuracy >= 0.7, (accuracy, labels)  # the ResNet-56 features separate these 5 classes well
    assert scores.shape == (20, 5)


def test_query_and_support_maps_against_the_winning_prototype(episode_data):
    embedding, support, support_labels, queries, _ = episode_data
    episode = build_episode(embedding, support, support_labels)
    items = explain_queries(embedding, episode, queries[::4])
    labels, scores = classify(episode, embedding(queries[::4]))
    for item, label, row, q in zip(items, labels, scores, embedding(queries[::4])):
        assert item.label == label and torch.allclose(item.scores, row, atol=1e-5)
        assert item.query_map.shape == (32, 32) and float(item.query_map.max()) > 0.5
        assert item.support_indices == episode.members(label) and item.support_maps.shape == (5, 32, 32)
        assert all(float(m.max()) > 0.5 for m in item.support_maps)
        # pooled features: c_k = 2 e_k p_k / ‖e − μ‖, Σ c = s̃ + 2 μ·p / ‖e − μ‖
        p = episode.prototypes[episode.classes.index(label)]
        norm = (q - episode.mean).norm()
        assert torch.allclose(item.contributions, 2 * q * p / norm, atol=1e-6)
        assert float(item.contributions.sum()) == pytest.approx(
            item.linearised_score + float(2 * episode.mean @ p / norm), abs=1e-5)


def test_episode_errors(episode_data):
    embedding, support, support_labels, _, _ = episode_data
    with pytest.raises(InvalidReferenceError, match="at least 2 classes"):
        build_episode(embedding, support[:5], support_labels[:5])
    with pytest.raises(InvalidReferenceError, match="labels"):
        build_episode(embedding, support, support_labels[:3])


def test_prototype_maps_at_every_stage(episode_data):
    """``prototype_spec``: at the last map FAM's Jacobian route against the winning prototype gives the
    episode's own query map (the same weights up to a positive factor); below it, the relevance route
    places the same explanation at each stage's resolution."""
    embedding, support, support_labels, queries, _ = episode_data
    episode = build_episode(embedding, support, support_labels)
    batch = queries[::4]
    items = explain_queries(embedding, episode, batch)
    fam = FamExplainer(embedding, input_size=(32, 32))
    last = fam.explain(batch, [prototype_spec(episode, item.label) for item in items])
    for mine, theirs in zip(items, last.items):
        assert torch.allclose(mine.query_map, theirs.query_map, atol=1e-5)
        assert theirs.weights == "jacobian"
    for stage, shape in (("stage1", (32, 32)), ("stage2", (16, 16))):
        deep = fam.explain(batch, [prototype_spec(episode, item.label, stage) for item in items])
        for item in deep.items:
            assert item.route == "relevance" and item.layer_shape == shape and item.query_map.shape == (32, 32)
            assert float(item.query_map.max() - item.query_map.min()) > 0.5
    with pytest.raises(InvalidReferenceError, match="no prototype"):
        prototype_spec(episode, "horse")
