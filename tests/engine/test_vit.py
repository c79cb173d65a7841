"""Vision transformers in the engine: the CAM family on token (timm ViT) and channels-last
(torchvision Swin) layers, checked against pytorch-grad-cam with its documented
``reshape_transform``; the methods that cannot apply answer a 400 naming the reason.

Random weights (nothing is downloaded); two real photographs as input (224×224 for the ViT,
downscaled to 112×112 for Swin, which accepts any size: stages at 28, 14, 7 and 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.errors import UnsupportedModelError
from camserve.engine.imaging.render import normalise

pytest.importorskip("pytorch_grad_cam")
timm = pytest.importorskip("timm")
from engine_checks import no_hooks, refused_before_forward  # noqa: E402
from gradcam_reference import REFERENCES, grad_cam_per_layer  # noqa: E402

TOLERANCE = 1e-3


def vit_reshape_transform(tensor, height=14, width=14):
    """pytorch-grad-cam's documented ViT transform (tutorials/vision_transformers.md): drop the
    class token, tokens → (N, C, h, w)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def nhwc_reshape_transform(tensor):
    """The channels-last transform for torchvision's Swin (``(N, H, W, C)`` outputs)."""
    return tensor.permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def vit_explainer(vit):
    return Explainer(vit)


@pytest.fixture(scope="module")
def swin():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.swin_t(weights=None).eval()


@pytest.fixture(scope="module")
def swin_explainer(swin):
    return Explainer(swin, (112, 112))


@pytest.fixture(scope="module")
def photos(effnet_batch):
    batch, _ = effnet_batch
    return batch[:2]


@pytest.fixture(scope="module")
def small_photos(photos):
    return torch.nn.functional.interpolate(photos, size=(112, 112), mode="bilinear", antialias=True)


def test_vit_default_layer_is_the_last_blocks_first_norm(vit_explainer):
    assert vit_explainer.default_layer == "blocks.11.norm1"
    assert vit_explainer.catalog.resolve("stage12") == "blocks.11"
    info = vit_explainer.catalog.get("blocks.11.norm1")
    assert (info.layout, info.prefix, info.map_shape, info.stride) == ("tokens", 1, (192, 14, 14), 16)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_vit_cam_family_matches_pytorch_grad_cam(vit_explainer, vit, photos, method):
    logits = vit(photos).detach()
    targets = [int(logits[0].argmax()), 7]
    result = vit_explainer.explain(photos, [ExplainSpec(method, None, t) for t in targets])
    assert no_hooks(vit)
    ours = torch.stack([e.maps[0] for e in result.explanations]).numpy()
    assert ours.shape == (2, 224, 224)
    assert all(e.layer == "blocks.11.norm1" and e.layer_shape == (14, 14) for e in result.explanations)
    assert torch.equal(result.logits, logits)  # the prediction comes from the explaining forward

    theirs, _ = grad_cam_per_layer(REFERENCES[method], vit, vit.blocks[-1].norm1, photos, targets,
                                   vit_reshape_transform)
    error = np.abs(ours - theirs).max()
    print(f"parity vit {method}: {error:.2e}")
    assert error < TOLERANCE, f"{method} on the ViT: max abs difference {error:.2e}"
    assert all(m.max() > 0.5 and m.std() > 0.01 for m in ours)


def test_vit_stage_alias_and_the_last_blocks_output(vit_explainer, photos):
    """A stage alias resolves to its block; the last block's *output* gives a zero Grad-CAM map —
    its patch tokens get no gradient from the class-token head (why the default is ``norm1``)."""
    result = vit_explainer.explain(photos[:1], [ExplainSpec("gradcam", "stage6")], layer_resolution=True)
    assert result.explanations[0].layer == "blocks.5"
    assert result.explanations[0].maps.shape == (1, 14, 14)
    assert result.explanations[0].maps.max() > 0.5
    last = vit_explainer.explain(photos[:1], [ExplainSpec("gradcam", "stage12")], layer_resolution=True)
    assert last.explanations[0].layer == "blocks.11"
    assert float(last.explanations[0].maps.abs().max()) == 0.0


def _refused(explainer, images, spec, error, *fragments):
    refused_before_forward(explainer, images, [spec], error, *fragments)


@pytest.mark.parametrize("method", ["shallowcam", "relevancecam"])
def test_lrp_methods_are_refused_on_transformers(vit_explainer, swin_explainer, photos, small_photos, method):
    _refused(vit_explainer, photos[:1], ExplainSpec(method), UnsupportedModelError, method, "token", "gradcam")
    _refused(vit_explainer, photos[:1], ExplainSpec(method, "patch_embed.proj"), UnsupportedModelError,
             "attention", "'blocks.0.attn'")
    _refused(swin_explainer, small_photos[:1], ExplainSpec(method, "stage2"), UnsupportedModelError,
             "attention", "ShiftedWindowAttention")


def test_cam_is_refused_on_a_token_layer(vit_explainer, photos):
    _refused(vit_explainer, photos[:1], ExplainSpec("cam"), UnsupportedModelError, "class token")


def test_swin_layers_are_channels_last(swin_explainer):
    catalog = swin_explainer.catalog
    assert catalog.stages() == ["features.1", "features.3", "features.5", "features.7"]
    assert swin_explainer.default_layer == "features.7"
    info = catalog.get("features.7")
    assert (info.layout, info.output_shape, info.map_shape, info.stride) == ("nhwc", (4, 4, 768), (768, 4, 4), 32)
    assert catalog.get("permute").layout == "nchw"


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_swin_cam_family_matches_pytorch_grad_cam(swin_explainer, swin, small_photos, method):
    targets = [3, 11]
    result = swin_explainer.explain(small_photos, [ExplainSpec(method, "stage2", t) for t in targets])
    assert no_hooks(swin)
    assert all(e.layer == "features.3" and e.layer_shape == (14, 14) for e in result.explanations)
    ours = torch.stack([e.maps[0] for e in result.explanations]).numpy()
    assert ours.shape == (2, 112, 112)
    theirs, _ = grad_cam_per_layer(REFERENCES[method], swin, swin.features[3], small_photos, targets,
                                   nhwc_reshape_transform)
    error = np.abs(ours - theirs).max()
    print(f"parity swin {method}: {error:.2e}")
    assert error < TOLERANCE, f"{method} on Swin: max abs difference {error:.2e}"


def test_swin_cam_equals_gradcam_at_the_pooled_map(swin_explainer, small_photos):
    """At ``norm`` (the map the average pool feeds to ``head``), ``∂y_c/∂A = W_c / (h·w)`` at every
    position: Grad-CAM's weights are the classifier's, so CAM and Grad-CAM agree after normalisation."""
    specs = [ExplainSpec("cam", "norm", 5), ExplainSpec("gradcam", "norm", 5)]
    result = swin_explainer.explain(small_photos[:1].expand(2, -1, -1, -1).contiguous(), specs, layer_resolution=True)
    cam, gradcam = (e.maps[0] for e in result.explanations)
    assert cam.shape == (4, 4) and cam.max() > 0.5
    assert (normalise(cam[None]) - normalise(gradcam[None])).abs().max() < 1e-4
