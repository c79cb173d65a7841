"""The served runtime (``handler.runtime``) in the real classifier handler, in-process, on the bundled
model and real photographs: each answer says which forward served it; the OpenVINO fast path and the
eager engine give the same top-k and maps within the stated tolerance; a bad section stops the load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from camserve.serving.classifier import ImageClassifierHandler

from conftest import REPO, decode_png, photo_bytes
from handlerkit import handle, initialised

PHOTOS = ["n01560419_bulbul.JPEG", "n01582220_magpie.JPEG", "n01665541_leatherback_turtle.JPEG"]
ROWS = [{"data": photo_bytes(PHOTOS[0])},
        {"data": photo_bytes(PHOTOS[1]), "explain": "gradcam"},
        {"data": photo_bytes(PHOTOS[2]), "explain": "shallowcam", "layer": "stage2"},
        {"data": photo_bytes(PHOTOS[0]), "explain": "layercam", "layer": "_conv_head", "target": "top2"}]


def heatmaps(explanation) -> list:
    """The grayscale PNGs of an explanation's JSON: ``heatmaps`` (several targets) or ``heatmap``."""
    return explanation.get("heatmaps") or [explanation["heatmap"]]


def config(**runtime):
    base = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    if runtime:
        base["handler"]["runtime"] = runtime
    return base


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    work = tmp_path_factory.mktemp("runtime")
    fast = initialised(ImageClassifierHandler, work, config())
    eager = initialised(ImageClassifierHandler, work, config(fast_path="off", memory_format="contiguous"))
    return [json.loads(a) for a in handle(*fast, ROWS)], [json.loads(a) for a in handle(*eager, ROWS)]


def test_each_answer_says_which_forward_served_it(answers):
    fast, eager = answers
    assert [a["runtime"] for a in fast] == ["openvino", "openvino", "eager", "openvino"]
    assert [a["runtime"] for a in eager] == ["eager"] * 4


def test_fast_and_eager_answers_agree(answers):
    for fast, eager in zip(*answers):
        assert [p["index"] for p in fast["predictions"]] == [p["index"] for p in eager["predictions"]]
        for a, b in zip(fast["predictions"], eager["predictions"]):
            assert abs(a["score"] - b["score"]) <= 1e-3
        if "explanation" in eager:
            assert fast["explanation"]["targets"] == eager["explanation"]["targets"]
            for a, b in zip(heatmaps(fast["explanation"]), heatmaps(eager["explanation"])):
                pixels = [np.asarray(decode_png(x), dtype=np.int16) for x in (a, b)]
                assert np.abs(pixels[0] - pixels[1]).max() <= 1  # PNG levels: one step of rounding at most


def test_a_bad_runtime_section_stops_the_load(tmp_path):
    with pytest.raises(ValueError, match="handler.runtime.fast_path"):
        initialised(ImageClassifierHandler, tmp_path, config(fast_path="fastest"))


def test_the_environment_overrides_the_archive(tmp_path, monkeypatch):
    from camserve.serving.settings import runtime_settings
    from camserve.serving.settings import HandlerSettings

    settings = HandlerSettings.from_model_config({"handler": {"runtime": {"fast_path": "auto"}}})
    monkeypatch.setenv("CAMSERVE_RUNTIME", "fast_path=off, memory_format=contiguous")
    assert (runtime_settings(settings).fast_path, runtime_settings(settings).memory_format) == ("off", "contiguous")
    monkeypatch.setenv("CAMSERVE_RUNTIME", "fast_path")
    with pytest.raises(ValueError, match="key=value"):
        runtime_settings(settings)


def test_the_embedding_handler_reads_its_feature_map_from_openvino(tmp_path):
    from camserve.serving.embedding import EmbeddingHandler

    rows = [{"image": photo_bytes(PHOTOS[0]), "reference": photo_bytes(PHOTOS[1])},
            {"image": photo_bytes(PHOTOS[2])},
            {"image": photo_bytes(PHOTOS[1]), "reference": photo_bytes(PHOTOS[0]), "explain": "gradcam_similarity"}]
    answers = {}
    for name, runtime in (("fast", {}), ("eager", {"fast_path": "off"})):
        config = {"handler": {"runtime": runtime}} if runtime else {"handler": {}}
        handler, context = initialised(EmbeddingHandler, tmp_path, config, name="effnet_lite0_embed")
        answers[name] = [json.loads(a) for a in handle(handler, context, rows)]
    assert [a["runtime"] for a in answers["fast"]] == ["openvino"] * 3
    assert [a["runtime"] for a in answers["eager"]] == ["eager"] * 3
    for fast, eager in zip(answers["fast"], answers["eager"]):
        assert np.abs(np.array(fast["embedding"]) - np.array(eager["embedding"])).max() <= 1e-4
        if "similarity" in eager:
            assert abs(fast["similarity"] - eager["similarity"]) <= 1e-4
            for key in ("query_map", "reference_map"):
                pixels = [np.asarray(decode_png(x[key]), dtype=np.int16) for x in (fast, eager)]
                assert np.abs(pixels[0] - pixels[1]).max() <= 1
