"""Parity of the engine's CAM family with the reference implementations.

pytorch-grad-cam 1.5.7 (``pytorch_grad_cam``) and Captum's ``LayerGradCam`` on the bundled
pretrained EfficientNet-Lite0 and real photographs, at a shallow layer (``_blocks.2``, 56×56) and a
deep one (``_conv_head``, 7×7). Both sides apply the same post-processing: ReLU, min-max
normalisation ``(x − min) / (max + 1e-7)`` at layer resolution, bilinear resize to 224×224
(half-pixel centres: ``cv2.resize`` / ``F.interpolate(align_corners=False)``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.imaging.render import normalise, upsample

# grad-cam is pinned in requirements.txt: a missing peer is an import error, not a skip
from engine_checks import no_hooks
from gradcam_reference import REFERENCES, grad_cam_per_layer

TOLERANCE = 1e-3
LAYERS = ("_blocks.2", "_conv_head")
IMAGES = 4


@pytest.fixture(scope="module")
def explainer(effnet):
    return Explainer(effnet)


@pytest.fixture(scope="module")
def photos(effnet_batch):
    """Four photographs; targets: the true label of each (explicit index, not always the top-1)."""
    batch, labels = effnet_batch
    return batch[:IMAGES], labels[:IMAGES]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_cam_family_matches_pytorch_grad_cam(explainer, effnet, photos, method, layer):
    images, targets = photos
    result = explainer.explain(images, [ExplainSpec(method, layer, t) for t in targets])
    ours = torch.stack([e.maps[0] for e in result.explanations]).numpy()
    assert ours.shape == (IMAGES, 224, 224)
    assert [e.targets for e in result.explanations] == [[t] for t in targets]

    module = dict(effnet.named_modules())[layer]
    per_layer, final = grad_cam_per_layer(REFERENCES[method], effnet, module, images, targets)
    error = np.abs(ours - per_layer).max()
    print(f"parity {method} {layer}: per-layer {error:.2e}")
    assert error < TOLERANCE, f"{method} at {layer}: max abs difference {error:.2e}"
    # grad-cam's public output re-normalises after the resize; so does ours if asked to
    renormalised = normalise(torch.from_numpy(ours)).numpy()
    error_final = np.abs(renormalised - final).max()
    assert error_final < TOLERANCE, f"{method} at {layer} (public output): {error_final:.2e}"
    # the maps are not trivial: they differ between images and cover a range
    assert all(m.max() > 0.5 and m.std() > 0.01 for m in ours)


@pytest.mark.parametrize("layer", LAYERS)
def test_gradcam_matches_captum_layer_gradcam(explainer, effnet, photos, layer):
    from captum.attr import LayerGradCam

    images, targets = photos
    result = explainer.explain(images, [ExplainSpec("gradcam", layer, t) for t in targets])
    ours = torch.stack([e.maps[0] for e in result.explanations])

    module = dict(effnet.named_modules())[layer]
    attribution = LayerGradCam(effnet, module).attribute(images, target=list(targets), relu_attributions=True)
    assert no_hooks(effnet)
    theirs = upsample(normalise(attribution.detach()[:, 0]), (224, 224))
    error = (ours - theirs).abs().max().item()
    print(f"parity captum {layer}: {error:.2e}")
    assert error < TOLERANCE, f"gradcam vs captum at {layer}: max abs difference {error:.2e}"


def test_layer_resolution_maps_match_grad_cam_before_resize(explainer, effnet, photos):
    """At layer resolution (no resize) the normalised maps agree with a plain-autograd LayerCAM."""
    images, targets = photos
    layer = "_blocks.2"
    result = explainer.explain(images, [ExplainSpec("layercam", layer, t) for t in targets], layer_resolution=True)
    ours = torch.stack([e.maps[0] for e in result.explanations])
    assert ours.shape == (IMAGES, 56, 56)

    module = dict(effnet.named_modules())[layer]
    # reference with plain autograd, the definition grad-cam uses: ReLU(Σ_k ReLU(g_k) ⊙ A_k)
    acts = {}
    handle = module.register_forward_hook(lambda m, a, o: acts.setdefault("a", o))
    try:
        out = effnet(images)
    finally:
        handle.remove()
    grads = torch.autograd.grad(out.gather(1, torch.tensor(targets)[:, None]).sum(), acts["a"])[0]
    reference = normalise(torch.relu((torch.relu(grads) * acts["a"]).sum(1)).detach())
    assert (ours - reference).abs().max().item() < TOLERANCE
