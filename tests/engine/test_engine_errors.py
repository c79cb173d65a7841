"""Bad input → the right :class:`ExplanationInputError` subclass, with a message naming the problem,
raised before the model runs and leaving no hook behind."""

from __future__ import annotations

import pytest
import torch

from camserve.engine import (Explainer, ExplainSpec, InvalidInputError, InvalidOptionError,
                             InvalidTargetError, NotAFeatureMapError, UnknownLayerError, UnknownMethodError)
from camserve.engine.capture import ForwardCapture
from camserve.engine.imaging.render import colorize
from engine_checks import no_hooks, refused_before_forward


@pytest.fixture(scope="module")
def explainer(effnet):
    return Explainer(effnet)


@pytest.fixture(scope="module")
def image(effnet_batch):
    return effnet_batch[0][:1]


_raises = refused_before_forward


def test_unknown_layer_lists_near_names(explainer, image):
    message = _raises(explainer, image, [ExplainSpec("gradcam", "_block.2")], UnknownLayerError, "'_block.2'")
    assert "_blocks.2" in message
    message = _raises(explainer, image, [ExplainSpec("gradcam", "layer4")], UnknownLayerError, "'layer4'")


@pytest.mark.parametrize("layer, fragment", [("_fc", "(1000,)"), ("_avg_pooling", "1×1"), ("_dropout", "(1280,)")])
def test_layer_without_a_feature_map_is_rejected(explainer, image, layer, fragment):
    """Vectors and a globally pooled ``(C, 1, 1)`` output are no feature maps; the message names
    a convolutional stage to use instead."""
    message = _raises(explainer, image, [ExplainSpec("layercam", layer)], NotAFeatureMapError, repr(layer), fragment)
    assert "_conv_head" in message or "_bn1" in message
    assert layer not in explainer.catalog.feature_map_layers()


def test_cam_needs_the_layer_feeding_the_classifier(explainer, image):
    _raises(explainer, image, [ExplainSpec("cam", "_blocks.2")], NotAFeatureMapError, "CAM")


def test_last_feature_map_has_no_layer_above_for_refinement(explainer, image):
    last = explainer.catalog.feature_map_layers()[-1]
    _raises(explainer, image, [ExplainSpec("shallowcam", last, options={"refine": True})], NotAFeatureMapError,
            "no layer above")


@pytest.mark.parametrize("target, fragment", [
    (1000, "out of range"), (-1, "out of range"), ("top0", "between 1"), ("top99", "between 1"),
    ("best", "neither"), (3.5, "float"), (True, "True"), ([], "1 to"), ([1, 1000], "out of range")])
def test_bad_targets(explainer, image, target, fragment):
    _raises(explainer, image, [ExplainSpec("gradcam", "_conv_head", target)], InvalidTargetError, fragment)


def test_spec_count_must_match_the_batch(explainer, effnet_batch):
    _raises(explainer, effnet_batch[0][:2], [ExplainSpec("gradcam")], InvalidTargetError, "1 explanation specs", "2 images")


@pytest.mark.parametrize("images, fragment", [
    (torch.zeros(3, 224, 224), "4-D"),
    (torch.zeros(1, 1, 224, 224), "3 channels"),
    (torch.zeros(0, 3, 224, 224), "N ≥ 1"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "floating point"),
    ([[0.0]], "tensor"),
])
def test_malformed_images(explainer, images, fragment):
    specs = [ExplainSpec("gradcam")] * (images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else 1)
    _raises(explainer, images, specs, InvalidInputError, fragment)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images(explainer, image, bad):
    broken = image.clone()
    broken[0, 1, 5, 7] = bad
    _raises(explainer, broken, [ExplainSpec("gradcam")], InvalidInputError, "NaN or infinite")
    with pytest.raises(InvalidInputError):
        explainer.predict(broken)


def test_unknown_method(explainer, image):
    _raises(explainer, image, [ExplainSpec("gradcam+++")], UnknownMethodError, "'gradcam+++'", "shallowcam")


@pytest.mark.parametrize("method, options, fragment", [
    ("shallowcam", {"spatial": "sideways"}, "'spatial'"),
    ("shallowcam", {"refine": "maybe"}, "'refine'"),
    ("relevancecam", {"contrastive": 2}, "'contrastive'"),
    ("gradcam", {"spatial": "gradient"}, "no option"),
])
def test_bad_options(explainer, image, method, options, fragment):
    _raises(explainer, image, [ExplainSpec(method, "_blocks.2", None, options)], InvalidOptionError, fragment)


def test_option_spellings_from_query_strings_are_accepted(explainer, image):
    result = explainer.explain(image, [ExplainSpec("shallowcam", "_blocks.2", "0", {"refine": "yes", "contrastive": "off"})])
    assert result.explanations[0].options == {"spatial": "relevance", "refine": True, "contrastive": False}
    assert result.explanations[0].targets == [0]


def test_unknown_colormap():
    with pytest.raises(InvalidOptionError, match="colormap"):
        colorize(torch.zeros(1, 4, 4), "rainbow")


def test_capture_removes_hooks_on_error(effnet):
    with pytest.raises(KeyError):
        with ForwardCapture(effnet, ["_blocks.2", "no.such.layer"]):
            pass  # pragma: no cover - __enter__ fails on the unknown name
    assert no_hooks(effnet)
    with pytest.raises(RuntimeError, match="inside"):
        with ForwardCapture(effnet, ["_blocks.2"]) as capture:
            assert capture.active_hooks == 1
            raise RuntimeError("inside")
    assert capture.active_hooks == 0 and no_hooks(effnet)
