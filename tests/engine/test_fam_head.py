"""A projection head trained for similarity (issue 21, item 3): the SimCLR head of
:mod:`camserve.lab.train_contrastive_head`, trained here in a small version on frozen pretrained CIFAR-10
ResNet-56 features of the even half of ``../shared/data/cifar10-test``, evaluated on the odd half; FAM's
Jacobian route on it."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.models.embedding import EmbeddingModel, projection_mlp

WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"


@pytest.fixture(scope="module")
def trained():
    from camserve.lab.train_contrastive_head import HeadConfig, cifar_backbone, evaluate_heads, train_head

    if not WEIGHTS.exists():
        pytest.fail(f"shared CIFAR ResNet-56 weights not found at {WEIGHTS}")
    torch.set_num_threads(1)
    backbone, classifier = cifar_backbone()
    config = HeadConfig(images=300, views=3, epochs=40, batch=100)
    torch.manual_seed(config.seed)
    untrained = projection_mlp(64, config.hidden, config.out_dim).eval()
    head, stats = train_head(config, backbone, log=lambda *a: None)
    scores = evaluate_heads(backbone, {"frozen": None, "untrained": untrained, "trained": head}, images=300)
    print("odd-half scores:", scores, "training:", stats)
    return head, classifier, scores, stats


def test_training_is_deterministic_and_lowers_the_loss(trained):
    from camserve.lab.train_contrastive_head import HeadConfig, cifar_backbone, train_head

    head, _, _, stats = trained
    assert stats["loss_last"] < stats["loss_first"] - 0.3
    again, _ = train_head(HeadConfig(images=60, views=2, epochs=3, batch=30), cifar_backbone()[0], log=lambda *a: None)
    twice, _ = train_head(HeadConfig(images=60, views=2, epochs=3, batch=30), cifar_backbone()[0], log=lambda *a: None)
    for a, b in zip(again.state_dict().values(), twice.state_dict().values()):
        assert torch.equal(a, b)


def test_head_learns_what_it_is_trained_for(trained):
    """NT-Xent trains augmentation invariance: a seeded augmented view of an odd-half image finds its own
    image among the clean ones more often through the trained head than through an untrained one. Label
    agreement of nearest neighbours is measured (printed) but not asserted: on these supervised features
    the instance-discrimination head does not raise it (full run: frozen 0.799, untrained 0.794,
    trained 0.772 on 1000 odd-half images)."""
    _, _, scores, _ = trained
    assert scores["view_retrieval"]["trained"] > scores["view_retrieval"]["untrained"] + 0.05
    assert scores["view_retrieval"]["trained"] > scores["view_retrieval"]["frozen"]


def test_jacobian_route_on_the_trained_head_sums_to_the_similarity(trained):
    """The head is a bias-free ReLU MLP (positively homogeneous): Σ_k c_k = s̃ = s exactly for dot and
    cosine (the norms are held constant in s̃ and equal in value)."""
    from camserve.lab.evaluate_faithfulness import image_set, load_batch

    head, classifier, _, _ = trained
    data = SHARED / "data" / "cifar10-test"
    files = [f for f, _ in image_set("cifar", data, 400, 0)[1::2][::40][:5]]
    images = load_batch("cifar", data, files, "cpu")
    model = EmbeddingModel.from_classifier(classifier, "layer3", normalize=True, projection=head)
    fam = FamExplainer(model, input_size=(32, 32))
    for similarity in ("cosine", "dot"):
        result = fam.explain(images[:4], [FamSpec(reference_image=images[4], similarity=similarity)] * 4)
        for item in result.items:
            assert item.route == "jacobian" and item.weights == "jacobian"
            assert float(item.contributions.sum()) == pytest.approx(item.similarity, abs=1e-5)
            assert float(item.query_map.max()) > 0.5 and item.reference_map is not None
    below = fam.explain(images[:1], [FamSpec(reference_image=images[4], layer="stage2")]).items[0]
    alive = model.trace(images[:1]).pooled[0] > 0  # the relevance seeds c at the channels alive in the query
    assert below.route == "relevance" and below.weights == "jacobian"
    assert below.relevance["embedding"] == pytest.approx(float(below.contributions[alive].sum()), abs=1e-4)
