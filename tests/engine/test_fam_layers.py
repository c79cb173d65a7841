"""FAM at any layer (issue 21, item 1): the similarity's per-channel contributions propagated by LRP
from the embedding down to a shallow layer, on the pretrained CIFAR-10 ResNet-56 pooled features
(``../shared/models/cifar-resnet``) and the bundled EfficientNet-Lite0; a ViT for the refusal.

Each test runs one or a few batched ``explain`` calls on 32×32 images (ResNet-56) or two 224² photos.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from camserve.engine.errors import (ExplanationInputError, InvalidOptionError, NotAFeatureMapError,
                                    UnknownLayerError, UnsupportedModelError)
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.methods.similarity.layers import combine
from camserve.engine.methods.cam.base import Captured
from camserve.engine.methods.lrp.shallowcam import ShallowCAM
from camserve.engine.models.embedding import EmbeddingModel, load_effnet_lite0_embedding

WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"
STAGES = {"layer1": (32, 32), "layer2": (16, 16), "layer3": (8, 8)}


@pytest.fixture(scope="module")
def cifar():
    """ResNet-56 pooled features (GAP of layer3, L2-normalised) and 6 choose-half CIFAR-10 test JPEGs."""
    from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet

    if not WEIGHTS.exists():
        pytest.fail(f"shared CIFAR ResNet-56 weights not found at {WEIGHTS}")
    data = SHARED / "data" / "cifar10-test"
    files = [f for f, _ in image_set("cifar", data, 500, 0)[0:60:10]]
    model = load_cifar_resnet(str(WEIGHTS), 56, torch.device("cpu"))
    embedding = EmbeddingModel.from_classifier(model, "layer3", normalize=True)
    return FamExplainer(embedding, input_size=(32, 32)), load_batch("cifar", data, files, "cpu")


def pair_specs(references, **options):
    return [FamSpec(reference_image=r, **options) for r in references]


def test_maps_at_every_stage_have_the_layer_shape(cifar):
    fam, images = cifar
    queries, references = images[:2], images[2:4]
    assert fam.layers.catalog.stages() == list(STAGES)
    for stage, (alias, shape) in enumerate(STAGES.items(), start=1):
        for layer in (alias, f"stage{stage}"):
            result = fam.explain(queries, pair_specs(references, layer=layer))
            for item in result.items:
                assert item.layer == alias and item.layer_shape == shape
                assert item.route == ("pooled" if alias == "layer3" else "relevance")
                for heatmap in (item.query_map, item.reference_map):
                    assert heatmap.shape == (32, 32) and torch.isfinite(heatmap).all()
                    assert float(heatmap.max() - heatmap.min()) > 0.5  # normalised, not constant
            at_layer = fam.explain(queries, pair_specs(references, layer=layer), output_size=shape)
            assert at_layer.items[0].query_map.shape == shape


def test_last_map_is_todays_fam_exactly(cifar, effnet):
    fam, images = cifar
    queries, references = images[:2], images[2:4]
    today = fam.explain(queries, pair_specs(references))
    for layer in ("layer3", "stage3"):
        named = fam.explain(queries, pair_specs(references, layer=layer))
        for old, new in zip(today.items, named.items):
            assert torch.equal(old.query_map, new.query_map) and torch.equal(old.reference_map, new.reference_map)
            assert torch.equal(old.contributions, new.contributions) and old.similarity == new.similarity
            assert (old.route, old.method, old.passes) == (new.route, new.method, new.passes)
            assert old.layer is None and new.layer == "layer3" and old.layer_shape == new.layer_shape == (8, 8)
    # the bundled model: the last stage is the conv whose BN + ReLU6 output the embedding pools
    model = FamExplainer(load_effnet_lite0_embedding(backbone=effnet))
    torch.manual_seed(0)
    photo = torch.randn(1, 3, 224, 224)
    old = model.explain(photo, [FamSpec(reference_image=photo[0].flip(-1))]).items[0]
    new = model.explain(photo, [FamSpec(reference_image=photo[0].flip(-1), layer="stage5")]).items[0]
    assert new.layer == "_conv_head" and new.route == "pooled"
    assert torch.equal(old.query_map, new.query_map) and torch.equal(old.reference_map, new.reference_map)
    below = model.explain(photo, [FamSpec(reference_image=photo[0].flip(-1), layer="stage4")]).items[0]
    assert below.route == "relevance" and below.layer == "_blocks.10" and below.layer_shape == (14, 14)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_relevance_is_conserved_from_the_embedding_to_the_layer(cifar, similarity):
    """The seed's relevance at the pooled feature is the contributions (Σ_k c_k = s for cosine and
    dot), and z⁺ / pass / LRP-0 through BatchNorm, the residual sums and the bias-free convs of
    ResNet-56 carry it to layer1 and layer2 almost whole (measured: > 99.99 %)."""
    fam, images = cifar
    for layer in ("layer1", "layer2"):
        item = fam.explain(images[:1], [FamSpec(reference_image=images[1], layer=layer, similarity=similarity)]).items[0]
        total = float(item.contributions.double().sum())
        assert item.relevance["embedding"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        assert total == pytest.approx(item.similarity, rel=1e-5)
        assert item.relevance["layer"] / item.relevance["embedding"] == pytest.approx(1.0, abs=0.01)
        assert item.passes == {"forward": 1, "backward": 0, "relevance": 1}


def test_relevance_map_is_shallowcams_combination(cifar):
    """An independent pass: ``R^l`` from a hand-seeded relevance backward through the same capture,
    combined by Shallow-CAM itself, equals the served map at layer resolution."""
    fam, images = cifar
    query, reference = images[:1], images[1]
    item = fam.explain(query, [FamSpec(reference_image=reference, layer="layer2")], output_size=(16, 16)).items[0]
    routes = fam.layers
    with routes.capture(fam.model.backbone, ["layer2"], gradient_passes=False) as capture, torch.enable_grad():
        with torch.no_grad():
            trace = fam.model._trace(torch.cat([query, reference[None]]))
        e = trace.embedding.detach()
        c = e[0] * e[1]  # cosine of unit vectors
        seed = torch.zeros_like(trace.pooled)
        seed[0] = c / trace.pooled.detach()[0].clamp_min(1e-12)
        capture.mode = "relevance"
        (g,) = torch.autograd.grad(trace.pooled, [capture.activations["layer2"]], seed)
    activations = capture.activations["layer2"].detach()[:1]
    expected = ShallowCAM()._single("layer2", Captured(activations={"layer2": activations},
                                                       relevance_gradients={"layer2": g[:1]}), {"spatial": "relevance"})
    from camserve.engine.imaging.render import prepare_maps
    torch.testing.assert_close(item.query_map, prepare_maps(expected, None)[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(combine(activations, g[:1].clone()), expected)  # bit for bit: the same operations


def test_batched_pairs_equal_one_by_one(cifar):
    fam, images = cifar
    queries, references = images[:3], images[3:6]
    batched = fam.explain(queries, pair_specs(references, layer="layer1"))
    for i in range(3):
        single = fam.explain(queries[i:i + 1], [FamSpec(reference_image=references[i], layer="layer1")]).items[0]
        torch.testing.assert_close(batched.items[i].query_map, single.query_map, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.items[i].reference_map, single.reference_map, atol=1e-4, rtol=1e-4)
        assert batched.items[i].similarity == pytest.approx(single.similarity, abs=1e-5)
    assert all(item.passes["relevance"] == 1 for item in batched.items)


def test_mixed_requests_gallery_and_embedding_references(cifar):
    """One call: a pair at layer1, an embedding reference at layer2, a gallery top-2 at layer1 and a
    plain FAM request (no layer), which stays today's."""
    fam0, images = cifar
    gallery = Gallery.build(fam0.model, images[3:6], ["a", "b", "c"])
    fam = FamExplainer(fam0.model, gallery, input_size=(32, 32))
    reference_embedding = fam.embed(images[4:5])[0].tolist()
    specs = [FamSpec(reference_image=images[5], layer="layer1"),
             FamSpec(reference_embedding=reference_embedding, layer="stage2"),
             FamSpec(gallery_topk=2, layer="layer1"),
             FamSpec(reference_image=images[5])]
    result = fam.explain(images[:4], specs)
    pair, embedded, top, plain = result.items
    assert pair.reference_map is not None and embedded.reference_map is None
    assert embedded.layer == "layer2" and embedded.layer_shape == (16, 16)
    assert len(top.matches) == 2 and top.passes["relevance"] == 2
    assert all(m["reference_map"] is None and m["query_map"].shape == (32, 32) for m in top.matches)
    alone = fam.explain(images[3:4], [FamSpec(reference_image=images[5])]).items[0]
    assert torch.equal(plain.query_map, alone.query_map) and plain.layer is None


def test_bad_layers_answer_400(cifar):
    fam, images = cifar
    cases = [(FamSpec(reference_image=images[1], layer="layer9"), UnknownLayerError),
             (FamSpec(reference_image=images[1], layer="stage7"), UnknownLayerError),
             (FamSpec(reference_image=images[1], layer="linear"), NotAFeatureMapError),
             (FamSpec(reference_image=images[1], layer=""), InvalidOptionError),
             (FamSpec(reference_image=images[1], layer="layer1", method="gradcam_similarity"), InvalidOptionError),
             (FamSpec(reference_image=images[1], layer="layer1", route="pooled"), InvalidOptionError)]
    for spec, error in cases:
        with pytest.raises(error) as raised:
            fam.explain(images[:1], [spec])
        assert raised.value.status == 400


def test_attention_model_refuses_with_the_reason(effnet_batch):
    """A ViT (timm ``vit_tiny_patch16_224``; no pretrained ViT weights exist offline — the refusal
    depends on the architecture only) as a user embedding model explained at its patch map: FAM at
    that map is served, any layer below the embedding's attention blocks is a 400 naming the cause."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    fam = FamExplainer(EmbeddingModel.from_embedding_model(vit, "patch_embed.proj"))
    batch = effnet_batch[0][:2]
    assert fam.explain(batch[:1], [FamSpec(reference_image=batch[1], layer="patch_embed.proj")]).items[0].route \
        == "jacobian"
    for layer in ("blocks.5", "stage2"):
        with pytest.raises(UnsupportedModelError) as raised:
            fam.explain(batch[:1], [FamSpec(reference_image=batch[1], layer=layer)])
        assert isinstance(raised.value, ExplanationInputError) and raised.value.status == 400
        assert "attention" in str(raised.value) and "LRP" in str(raised.value)
