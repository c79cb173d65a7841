"""What the lab measures is deployable: an archive's ``handler.composite`` and ``handler.canonizer``
reach the served explainer (checked when the worker loads), the same explainer the engine builds."""

from __future__ import annotations

import pytest
import torch

from camserve.engine import ExplainSpec, Explainer
from camserve.engine.lrp.composites import get_composite
from camserve.engine.models import IMAGENET_MEAN, IMAGENET_STD, ModelProfile
from camserve.serving.classifier import build_explainer
from camserve.serving.settings import HandlerSettings


def settings(**handler) -> HandlerSettings:
    return HandlerSettings.from_model_config({"handler": handler})


@pytest.mark.parametrize("handler,fragment", [({"composite": "nonsense"}, "handler.composite"),
                                              ({"composite": "epsilon_plus:3"}, "handler.composite"),
                                              ({"canonizer": "fold"}, "handler.canonizer")])
def test_bad_lrp_settings_stop_the_worker(handler, fragment):
    with pytest.raises(ValueError, match=fragment):
        settings(**handler)


def test_served_explainer_takes_the_archive_composite_and_canonizer(resnet20):
    model, images = resnet20
    profile = ModelProfile("cifar", IMAGENET_MEAN, IMAGENET_STD, 32, 32, None, ())
    chosen = settings(composite="epsilon_alpha2_beta1", canonizer="fold_bn")
    served = build_explainer(model, profile, chosen)
    engine = Explainer(model, (32, 32), composite=get_composite("epsilon_alpha2_beta1"), canonizer="fold_bn")
    default = build_explainer(model, profile, settings())
    assert served.canonizer == "fold_bn" and default.canonizer is None
    specs = [ExplainSpec("shallowcam", layer="layer2")] * images.shape[0]
    a, b, c = (e.explain(images, specs, layer_resolution=True) for e in (served, engine, default))
    for x, y, z in zip(a.explanations, b.explanations, c.explanations):
        assert torch.equal(x.maps, y.maps)
        assert float((x.maps - z.maps).abs().max()) > 0.02


def test_a_composite_the_canonizer_cannot_fold_stops_the_worker(resnet20):
    """LRP-γ reads the layer's input through its own gradient, which BN folding cannot reach: the
    worker refuses the pair at load (and ``camserve archive`` before archiving), never at a request."""
    model, _ = resnet20
    profile = ModelProfile("cifar", IMAGENET_MEAN, IMAGENET_STD, 32, 32, None, ())
    with pytest.raises(ValueError, match="BatchNorm folding"):
        build_explainer(model, profile, settings(composite="epsilon_gamma:0.25", canonizer="fold_bn"))
