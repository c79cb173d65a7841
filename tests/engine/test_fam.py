"""FAM on real photographs with the pretrained EfficientNet-Lite0 embedding (D = 1280).

Five sample photos: two toy spaniels (related), two finches (related), an airliner (unrelated).
Each test runs one batched ``explain`` (one forward of a few 224² images).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLES, load_uint8
from camserve.engine.models.embedding import EmbeddingModel, load_effnet_lite0_embedding
from camserve.engine.errors import (InvalidInputError, InvalidOptionError, InvalidReferenceError,
                                    UnknownMethodError)
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine.methods.similarity.gallery import Gallery
from camserve.engine.models import EFFNET_LITE0
from camserve.engine.imaging.preprocess import to_model_input

NAMES = ["Japanese_spaniel", "Blenheim_spaniel", "house_finch", "brambling", "airliner"]
SPANIEL, BLENHEIM, FINCH, BRAMBLING, AIRLINER = range(5)
SHIFT = 56  # pixels the object moves right in the shifted copy


@pytest.fixture(scope="module")
def photos(samples):
    rows = {r["name"]: r for r in samples}
    images = [load_uint8(SAMPLES / rows[name]["file"]) for name in NAMES]
    batch, _ = to_model_input(images, EFFNET_LITE0.resize, EFFNET_LITE0.crop, EFFNET_LITE0.mean,
                              EFFNET_LITE0.std, torch.device("cpu"))
    return batch


@pytest.fixture(scope="module")
def gallery(effnet, photos):
    model = load_effnet_lite0_embedding(backbone=effnet)
    return Gallery.build(model, photos[[SPANIEL, AIRLINER, BRAMBLING]], ["spaniel", "airliner", "brambling"])


@pytest.fixture(scope="module")
def fam(effnet, gallery):
    """The bundled default: L2-normalised pooled embedding, with a 3-item gallery."""
    return FamExplainer(load_effnet_lite0_embedding(normalize=True, backbone=effnet), gallery)


def centroid(heatmap: torch.Tensor):
    """(x, y) centre of mass of an (H, W) map."""
    h, w = heatmap.shape
    total = heatmap.sum()
    return (float((heatmap.sum(0) * torch.arange(w)).sum() / total),
            float((heatmap.sum(1) * torch.arange(h)).sum() / total))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_contributions_sum_to_similarity(effnet, fam, photos):
    """Σ_k c_k = s within 1e-5 for cosine and dot on the default model; dot on raw pooled features
    (|s| ≈ 76) within 1e-5 relative; euclidean: Σ c = s + ‖q‖²."""
    pairs = [(SPANIEL, BLENHEIM, "cosine"), (FINCH, AIRLINER, "cosine"), (SPANIEL, AIRLINER, "dot"),
             (FINCH, BRAMBLING, "euclidean")]
    result = fam.explain(photos[[q for q, _, _ in pairs]],
                         [FamSpec(reference_image=photos[r], similarity=s) for _, r, s in pairs])
    for (q, r, kind), item, emb in zip(pairs, result.items, result.embeddings):
        total = float(item.contributions.double().sum())
        assert item.contributions.shape == (1280,)
        if kind == "euclidean":
            assert abs(total - (item.similarity + float(emb.double().norm() ** 2))) < 1e-5
        else:
            assert abs(total - item.similarity) < 1e-5, (NAMES[q], NAMES[r], kind)
        assert item.route == "pooled" and item.method == "fam" and item.metric == kind
        for heatmap in (item.query_map, item.reference_map):
            assert heatmap.shape == (224, 224) and float(heatmap.min()) >= 0 and float(heatmap.max()) <= 1
            if kind != "euclidean":  # 2q·r − ‖r‖² < 0 for far pairs: the euclidean map may be empty
                assert float(heatmap.max()) > 0.99  # min-max normalised, not flat

    raw = FamExplainer(load_effnet_lite0_embedding(normalize=False, backbone=effnet))
    item = raw.explain(photos[[SPANIEL]], [FamSpec(reference_image=photos[BLENHEIM], similarity="dot")]).items[0]
    assert item.similarity > 10  # raw ReLU6 features: a large dot product
    assert abs(float(item.contributions.double().sum()) - item.similarity) < 1e-5 * abs(item.similarity)


def test_self_flip_and_shift(fam, photos):
    """Against itself: s = 1 and identical maps. Against its mirror image: the reference map is the
    mirror of the query map. Against a copy shifted 56 px right: the map's mass moves right."""
    finch = photos[FINCH]
    shifted = torch.zeros_like(finch)  # 0 = mid-grey after normalisation
    shifted[:, :, SHIFT:] = finch[:, :, :-SHIFT]
    result = fam.explain(torch.stack([finch, finch, finch]),
                         [FamSpec(reference_image=finch), FamSpec(reference_image=finch.flip(-1)),
                          FamSpec(reference_image=shifted)])
    itself, mirror, moved = result.items

    assert abs(itself.similarity - 1.0) < 1e-5
    assert torch.allclose(itself.query_map, itself.reference_map, atol=1e-6)

    flipped_corr = correlation(mirror.reference_map, mirror.query_map.flip(-1))
    assert flipped_corr > 0.95 and flipped_corr > correlation(mirror.reference_map, mirror.query_map) + 0.2
    assert mirror.similarity > 0.9

    (qx, qy), (rx, ry) = centroid(moved.query_map), centroid(moved.reference_map)
    assert 20 < rx - qx < SHIFT + 10, (qx, rx)
    assert abs(ry - qy) < 10


def test_related_classes_are_more_similar(fam, photos):
    queries = [SPANIEL, FINCH, SPANIEL, FINCH]
    refs = [BLENHEIM, BRAMBLING, AIRLINER, AIRLINER]
    result = fam.explain(photos[queries], [FamSpec(reference_image=photos[r]) for r in refs])
    related, unrelated = [i.similarity for i in result.items[:2]], [i.similarity for i in result.items[2:]]
    assert related[0] > unrelated[0] + 0.1  # spaniel–spaniel vs spaniel–airliner
    assert related[1] > unrelated[1] + 0.1  # finch–brambling vs finch–airliner


def test_pooled_route_runs_no_backward(fam, photos):
    """No autograd graph is recorded in the pooled route (no tensor saved for backward, no
    backward hook fires, outputs carry no grad_fn); the same probe does see the baseline's graph."""
    saved = []
    backward_calls = []
    handle = fam.model.backbone.register_full_backward_hook(lambda *args: backward_calls.append(1))
    head_handle = fam.model.backbone._conv_head.register_full_backward_hook(lambda *args: backward_calls.append(1))

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pooled = fam.explain(photos[[SPANIEL]], [FamSpec(reference_image=photos[BLENHEIM])])
            pooled_saved = len(saved)
            baseline = fam.explain(photos[[SPANIEL]], [FamSpec(reference_image=photos[BLENHEIM],
                                                                  method="gradcam_similarity")])
    finally:
        handle.remove()
        head_handle.remove()
    item = pooled.items[0]
    assert pooled_saved == 0 and not backward_calls
    assert item.passes == {"forward": 1, "backward": 0}
    for tensor in (pooled.embeddings, item.contributions, item.query_map, item.reference_map):
        assert tensor.grad_fn is None and not tensor.requires_grad
    assert len(saved) > 0  # the probe works: the baseline recorded a graph …
    assert baseline.items[0].passes == {"forward": 1, "backward": 1}  # … and ran one backward
    assert baseline.items[0].method == "gradcam_similarity" and baseline.items[0].route == "gradient"
    # the backbone itself is never differentiated, even by the baseline (the graph starts at A)
    assert not backward_calls


def test_jacobian_route_matches_pooled_on_identity_head(fam, gallery, photos):
    """Forcing the Jacobian route on the pooled model reproduces the pooled contributions."""
    airliner = gallery.embeddings[1]
    specs = [FamSpec(reference_embedding=airliner, similarity=s, route=r)
             for s in ("cosine", "dot") for r in ("pooled", "jacobian")]
    specs += [FamSpec(gallery_topk=2, route="pooled"), FamSpec(gallery_topk=2, route="jacobian")]
    result = fam.explain(photos[[SPANIEL] * 6], specs)
    for pooled, jacobian in (result.items[0:2], result.items[2:4], result.items[4:6]):
        assert jacobian.route == "jacobian" and jacobian.method == "fam-jacobian"
        assert jacobian.passes == {"forward": 1, "backward": len(jacobian.matches or [None])}
        assert torch.allclose(pooled.contributions, jacobian.contributions, atol=1e-7)
        assert torch.allclose(pooled.query_map, jacobian.query_map, atol=1e-5)
    for p_match, j_match in zip(result.items[4].matches, result.items[5].matches):  # one backward per rank
        assert p_match["index"] == j_match["index"]
        assert torch.allclose(p_match["reference_map"], j_match["reference_map"], atol=1e-5)


class _UserEmbeddingNet(nn.Module):
    """A user model whose forward returns embeddings: EfficientNet features → GAP → linear."""

    def __init__(self, backbone, projection):
        super().__init__()
        self.net, self.projection = backbone, projection

    def forward(self, x):
        return self.projection(self.net.extract_features(x).mean(dim=(2, 3)))


def test_projection_head_uses_jacobian_route(effnet, photos):
    """With a (bias-free, linear) projection head the auto route is Jacobian and Σ c = cosine;
    a user embedding model with its map captured by layer name gives the same contributions."""
    torch.manual_seed(0)
    projection = nn.Linear(1280, 64, bias=False)
    wrapped = FamExplainer(load_effnet_lite0_embedding(projection=projection, backbone=effnet))
    user = FamExplainer(EmbeddingModel.from_embedding_model(_UserEmbeddingNet(effnet, projection), "net._swish"))
    spec = [FamSpec(reference_image=photos[BLENHEIM])]
    a = wrapped.explain(photos[[SPANIEL]], spec).items[0]
    b = user.explain(photos[[SPANIEL]], spec).items[0]
    assert wrapped.dim == 64 and a.route == b.route == "jacobian" and a.method == "fam-jacobian"
    assert abs(float(a.contributions.double().sum()) - a.similarity) < 1e-5
    assert abs(a.similarity - b.similarity) < 1e-5
    assert torch.allclose(a.contributions, b.contributions, atol=1e-6)
    with pytest.raises(InvalidOptionError):
        wrapped.explain(photos[[SPANIEL]], [FamSpec(reference_image=photos[BLENHEIM], route="pooled")])


def test_mixed_reference_kinds_in_one_call(fam, gallery, photos):
    brambling = gallery.embeddings[2].tolist()  # a reference embedding as a client sends it
    specs = [FamSpec(reference_image=photos[SPANIEL]),
             FamSpec(reference_embedding=brambling, similarity="dot"),
             FamSpec(gallery_topk=2),
             FamSpec(reference_image=photos[AIRLINER], method="gradcam_similarity"),
             None]
    result = fam.explain(photos[[BLENHEIM, FINCH, SPANIEL, SPANIEL, AIRLINER]], specs)
    image, embedding, top, baseline, nothing = result.items
    assert result.embeddings.shape == (5, 1280) and nothing is None
    assert torch.allclose(result.embeddings, fam.embed(photos[[BLENHEIM, FINCH, SPANIEL, SPANIEL, AIRLINER]]),
                          atol=1e-5)
    assert all(i.passes["forward"] == 1 for i in (image, embedding, top, baseline))
    assert image.reference == "image" and image.reference_map is not None
    assert embedding.reference == "embedding" and embedding.reference_map is None
    assert abs(embedding.similarity - float(result.embeddings[1] @ gallery.embeddings[2])) < 1e-5
    assert embedding.passes["backward"] == 0 and image.passes["backward"] == 0
    assert baseline.passes["backward"] == 1 and baseline.reference_map is not None

    assert top.reference == "gallery" and [m["index"] for m in top.matches][0] == 0
    best, second = top.matches
    assert best["label"] == "spaniel" and abs(best["similarity"] - 1.0) < 1e-5
    assert best["similarity"] >= second["similarity"]
    assert top.similarity == best["similarity"] and torch.equal(top.query_map, best["query_map"])
    # the stored float16 map of the very same image gives the same reference map
    assert torch.allclose(best["query_map"], best["reference_map"], atol=2e-2)


class _NotAllowed:
    """An arbitrary object: a gallery file holding one must not load."""


def test_gallery_save_load_and_prototypes(effnet, gallery, photos, tmp_path):
    for suffix in ("npz", "pt"):
        path = str(tmp_path / f"gallery.{suffix}")
        gallery.save(path)
        loaded = Gallery.load(path)
        assert loaded.labels == gallery.labels
        assert torch.equal(loaded.embeddings, gallery.embeddings)
        assert torch.equal(loaded.feature_maps, gallery.feature_maps) and loaded.feature_maps.dtype == torch.float16
    with np.load(str(tmp_path / "gallery.npz"), allow_pickle=False) as data:
        assert sorted(data.files) == ["embeddings", "feature_maps", "labels"]
    evil = str(tmp_path / "evil.pt")
    torch.save({"embeddings": gallery.embeddings, "labels": gallery.labels, "x": _NotAllowed()}, evil)
    with pytest.raises(Exception) as caught:
        Gallery.load(evil)
    assert "weights_only" in str(caught.value) or "Unsupported" in str(caught.value)

    model = load_effnet_lite0_embedding(backbone=effnet)
    support = photos[[SPANIEL, BLENHEIM, FINCH]]
    protos = Gallery.prototypes(model, support, ["dog", "dog", "bird"])
    embeddings = model(support)
    assert protos.labels == ["dog", "bird"] and protos.feature_maps.shape == (2, 1280, 7, 7)
    assert torch.allclose(protos.embeddings[0], embeddings[:2].mean(0), atol=1e-6)
    assert torch.allclose(protos.embeddings[1], embeddings[2], atol=1e-6)


@pytest.mark.parametrize("spec, error", [
    (FamSpec(reference_embedding=[0.1] * 1279), InvalidReferenceError),
    (FamSpec(reference_embedding=[float("nan")] + [0.0] * 1279), InvalidReferenceError),
    (FamSpec(reference_embedding=[float("inf")] + [0.0] * 1279), InvalidReferenceError),
    (FamSpec(reference_embedding=["a"] * 1280), InvalidReferenceError),
    (FamSpec(gallery_topk=4), InvalidReferenceError),
    (FamSpec(gallery_topk=0), InvalidReferenceError),
    (FamSpec(gallery_topk=1.5), InvalidReferenceError),
    (FamSpec(), InvalidReferenceError),
    (FamSpec(gallery_topk=1, reference_embedding=[0.0] * 1280), InvalidReferenceError),
    (FamSpec(reference_image=torch.zeros(3, 100, 100)), InvalidReferenceError),
    (FamSpec(gallery_topk=1, similarity="manhattan"), InvalidOptionError),
    (FamSpec(gallery_topk=1, route="sideways"), InvalidOptionError),
    (FamSpec(gallery_topk=1, method="gradcam++"), UnknownMethodError),
])
def test_bad_requests_raise_clear_errors(fam, photos, spec, error):
    with pytest.raises(error):
        fam.explain(photos[[SPANIEL]], [spec])


def test_empty_or_missing_gallery_and_bad_batch(effnet, fam, photos):
    model = fam.model
    for explainer in (FamExplainer(model, Gallery(torch.zeros(0, 1280), [])), FamExplainer(model)):
        with pytest.raises(InvalidReferenceError, match="gallery"):
            explainer.explain(photos[[SPANIEL]], [FamSpec(gallery_topk=1)])
    with pytest.raises(InvalidReferenceError):
        FamExplainer(model, Gallery(torch.zeros(2, 64), ["a", "b"]))
    with pytest.raises(InvalidReferenceError):
        Gallery.build(model, photos[:0], [])
    with pytest.raises(InvalidInputError):
        fam.explain(photos[[SPANIEL]], [None, None])
    with pytest.raises(InvalidInputError):
        fam.explain(photos[SPANIEL], [None])
