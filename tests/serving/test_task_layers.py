"""``handler.task_layers``: the embedding archive's FAM layer per task when a request names none, in-process
on the real EfficientNet-Lite0 features and real photographs (the bundled archive's setting is checked
over TorchServe and KServe in tests/integration)."""

from __future__ import annotations

import json

import pytest

from camserve.serving.embedding import EmbeddingHandler
from camserve.serving.settings import HandlerSettings
from conftest import SAMPLES
from handlerkit import handle, initialised

QUERY, REFERENCE = SAMPLES / "n01560419_bulbul.JPEG", SAMPLES / "n01582220_magpie.JPEG"


def test_a_pair_gets_the_task_layer_unless_it_names_one(tmp_path):
    handler, context = initialised(EmbeddingHandler, tmp_path, {"handler": {"task_layers": {"pair": "stage2"}}},
                                   name="effnet_lite0_embed")
    pair = {"image": QUERY.read_bytes(), "reference": REFERENCE.read_bytes()}
    rows = [dict(pair), {**pair, "layer": "_conv_head"}, {**pair, "method": "gradcam_similarity"},
            {**pair, "layer": "stage3"}]
    answers = [json.loads(a) for a in handle(handler, context, rows)]
    assert [context.get_response_status(i)[0] for i in range(len(rows))] == [200] * 4
    assert (answers[0]["layer"], answers[0]["route"], answers[0]["layer_shape"]) == ("_blocks.2", "relevance", [56, 56])
    assert (answers[1]["layer"], answers[1]["route"]) == ("_conv_head", "pooled")   # named: the request's own
    assert answers[2]["method"] == "gradcam_similarity" and "layer" not in answers[2]   # last map only
    assert answers[3]["layer"] == "_blocks.4"
    assert len({round(a["similarity"], 5) for a in answers}) == 1   # the same similarity, explained at each layer


@pytest.mark.parametrize("section, words", [
    ({"task_layers": {"pairs": "stage2"}}, ["task_layers", "pair"]),
    ({"task_layers": ["stage2"]}, ["task_layers"]),
    ({"task_layers": {"pair": ""}}, ["task_layers"]),
])
def test_a_malformed_section_is_a_configuration_error(section, words):
    with pytest.raises(ValueError) as refused:
        HandlerSettings.from_model_config({"handler": section})
    assert all(word in str(refused.value) for word in words)


def test_a_layer_the_route_cannot_reach_stops_the_load_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"task_layers\.gallery.*stage99"):
        initialised(EmbeddingHandler, tmp_path, {"handler": {"task_layers": {"gallery": "stage99"}}},
                    name="effnet_lite0_embed")
