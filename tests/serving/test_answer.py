"""The typed answers (camserve.serving.answer): JSON round trips, v2 tensors, audit records, and the
batch door's records in the same vocabulary (fast, no server)."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from camserve.cli.batch_steps import Item, Result, Settings, render_item
from camserve.engine.imaging.render import encode_png, to_uint8
from camserve.ops.audit import Base64
from camserve.serving.answer import (ClassifierAnswer, ComparisonAnswer, EmbeddingAnswer, ExplanationAnswer, FamAnswer,
                                     FamMatch, Prediction, RenderedMaps)
from camserve.serving.encode import dumps, envelope_body
from camserve.serving.protocol import KSERVE_V1, KSERVE_V2, PLAIN, V2_OUTPUT_NAMES

PNG_TEXT = base64.b64encode(b"png").decode()
PREDICTIONS = [Prediction(3, "c3", 0.75), Prediction(1, "c1", 0.125)]


def explanation(method="gradcam", targets=(3,), fmt="png", colormap=None, overlays=False, options=None):
    k = len(targets)
    if fmt == "array":
        maps = RenderedMaps("array", [2, 2], arrays=[[[0.1, 0.2], [0.3, 0.4]]] * k)
    else:
        maps = RenderedMaps("png", [224, 224], heatmaps=[PNG_TEXT] * k,
                            heatmap_colors=[PNG_TEXT] * k if colormap else None,
                            overlays=[PNG_TEXT] * k if overlays else None)
    return ExplanationAnswer(method=method, layer="_conv_head", targets=list(targets),
                             labels=[f"c{t}" for t in targets], layer_shape=[7, 7], maps=maps, colormap=colormap,
                             crop_box=[16.0, 0.0, 240.0, 224.0], image_size=[256, 224], options=dict(options or {}),
                             passes={"forward": 1, "backward": 1}, seconds=0.1, batch_seconds=0.2, batch_size=2)


def comparison_answer():
    return ClassifierAnswer(PREDICTIONS, batch_size=1,
                            explanations=[explanation("gradcam"), explanation("layercam", options={"x": 1})],
                            comparison=ComparisonAnswer(["gradcam", "layercam"], 3, [0.5, 0.25], [[1.0, 0.5], [0.5, 1.0]]))


def embedding_answer(matches=True, reference_map=True):
    fam = FamAnswer(similarity=0.9, metric="cosine", method="fam", route="pooled",
                    reference="gallery" if matches else "image", query_map=PNG_TEXT,
                    reference_map=PNG_TEXT if reference_map else None, size=[224, 224], passes={"forward": 1},
                    seconds=0.1, batch_seconds=0.2,
                    matches=[FamMatch(4, "tench", 0.9, PNG_TEXT, PNG_TEXT), FamMatch(7, "shark", 0.5, PNG_TEXT, None)]
                    if matches else None)
    return EmbeddingAnswer(dim=3, batch_size=1, crop_box=[0.0, 0.0, 5.0, 5.0], embedding=[0.1, 0.2, 0.3], fam=fam)


ANSWERS = [ClassifierAnswer(PREDICTIONS, batch_size=2),
           ClassifierAnswer(PREDICTIONS, batch_size=2, explanation=explanation()),
           ClassifierAnswer(PREDICTIONS, batch_size=2, explanation=explanation(targets=(3, 1), colormap="jet",
                                                                               overlays=True, options={"a": 1})),
           ClassifierAnswer(PREDICTIONS, batch_size=2, explanation=explanation("lrp", targets=(3, 1), fmt="array")),
           comparison_answer(),
           EmbeddingAnswer(dim=3, batch_size=1, crop_box=[0.0, 0.0, 5.0, 5.0], embedding=[0.1, 0.2, 0.3]),
           embedding_answer(matches=False), embedding_answer(matches=True), embedding_answer(False, False)]
UNDEFINED_RHO = ClassifierAnswer(PREDICTIONS, batch_size=1, explanations=[explanation("gradcam"), explanation("cam")],
                                 comparison=ComparisonAnswer(["gradcam", "cam"], 3, [0.5, 0.25], [[1.0, None], [None, None]]))
ANSWERS.append(UNDEFINED_RHO)
ARRAY_FAM = EmbeddingAnswer(dim=3, batch_size=1, crop_box=[0.0, 0.0, 5.0, 5.0], fam=FamAnswer(
    similarity=0.9, metric="cosine", method="fam", route="pooled", reference="gallery", weights="neighbour",
    neighbours={"indices": [4, 7], "label": "tench"}, format="array", query_map=[[0.0, 1.0], [0.5, 0.25]],
    reference_map=None, size=[2, 2], matches=[FamMatch(4, "tench", 0.9, [[0.0, 1.0], [0.5, 0.25]], [[1.0, 0.0], [0.0, 0.0]])]))
ANSWERS.append(ARRAY_FAM)
PROTOTYPE_FAM = EmbeddingAnswer(dim=3, batch_size=1, crop_box=[0.0, 0.0, 5.0, 5.0], fam=FamAnswer(
    similarity=-0.25, metric="nearest_centroid", method="fam", route="jacobian", reference="prototype",
    weights="jacobian", prototype={"label": "tench", "shots": 2, "scores": {"tench": -0.25, "bulbul": -1.5}},
    format="array", query_map=[[0.0, 1.0], [0.5, 0.25]], reference_map=None, size=[2, 2],
    matches=[FamMatch(0, "tench", 0.8, None, [[1.0, 0.0], [0.0, 0.0]]),
             FamMatch(1, "tench", 0.7, None, [[0.0, 1.0], [0.0, 0.0]])]))
ANSWERS.append(PROTOTYPE_FAM)


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_json_round_trip(answer):
    body = answer.to_json()
    again = type(answer).from_json(json.loads(dumps(body)))
    assert again == answer and dumps(again.to_json()) == dumps(body)  # same fields, same key order


def test_classifier_json_spells_the_servers_fields():
    body = ANSWERS[2].to_json()
    assert list(body) == ["predictions", "batch_size", "explanation"]
    assert body["predictions"][0] == {"index": 3, "label": "c3", "score": 0.75}
    e = body["explanation"]
    assert list(e) == ["method", "layer", "target", "targets", "labels", "format", "layer_shape", "size", "heatmap",
                       "heatmaps", "heatmap_color", "heatmap_colors", "overlay", "overlays", "colormap", "crop_box",
                       "image_size", "options", "passes", "seconds", "batch_seconds", "batch_size"]
    assert e["target"] == 3 and e["targets"] == [3, 1] and len(e["heatmaps"]) == 2
    arrays = ANSWERS[3].to_json()["explanation"]
    assert arrays["format"] == "array" and "heatmap" not in arrays and len(arrays["arrays"]) == 2
    assert list(comparison_answer().to_json()) == ["predictions", "batch_size", "explanations", "comparison"]


def test_embedding_json_keeps_an_absent_reference_map_as_null():
    body = embedding_answer(matches=False, reference_map=False).to_json()
    assert "reference_map" in body and body["reference_map"] is None
    assert list(body)[:4] == ["dim", "batch_size", "embedding", "crop_box"]
    assert embedding_answer().to_json()["matches"][1]["reference_map"] is None
    plain = EmbeddingAnswer(dim=3, batch_size=1, crop_box=[0.0, 0.0, 5.0, 5.0]).to_json()
    assert plain == {"dim": 3, "batch_size": 1, "crop_box": [0.0, 0.0, 5.0, 5.0]}  # embedding=0, no reference


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_v2_tensors_are_known_outputs_with_consistent_shapes(answer):
    tensors = answer.to_v2_tensors()
    assert tensors and {name.split(".")[0] for name in tensors} <= V2_OUTPUT_NAMES  # `name.<i>`: per item
    for name, t in tensors.items():
        size = 1
        for dim in t.shape:
            size *= dim
        assert len(t.data) == size, name
        assert t.datatype in ("FP32", "INT64", "BYTES", "BOOL")


def test_v2_tensor_shapes():
    one = ANSWERS[2].to_v2_tensors()
    assert (one["scores"].shape, one["indices"].data, one["labels"].data) == ([2], [3, 1], ["c3", "c1"])
    assert one["heatmap"].shape == [2] and one["heatmap"].parameters["content_type"] == "image/png"
    assert one["targets"].data == [3, 1] and one["target_labels"].data == ["c3", "c1"]
    assert one["crop_box"].shape == [4] and one["passes_forward"].shape == []
    assert one["options"].data == ['{"a":1}'] and one["colormap"].data == ["jet"]
    assert ANSWERS[3].to_v2_tensors()["heatmap_array"].shape == [2, 2, 2]
    compared = comparison_answer().to_v2_tensors()
    assert compared["method"].shape == [2] and compared["heatmap"].shape == [2, 1]  # method dimension
    assert compared["crop_box"].shape == [4] and compared["spearman"].shape == [2, 2]
    assert "options.1" in compared and "options.0" not in compared  # only layercam has options
    undefined = UNDEFINED_RHO.to_v2_tensors()["spearman"]  # a constant map's ρ: JSON text with null, not a 500
    assert undefined.datatype == "BYTES" and json.loads(undefined.data[0]) == [[1.0, None], [None, None]]
    arrays = ARRAY_FAM.to_v2_tensors()
    assert arrays["query_map_array"].shape == [2, 2] and arrays["match_query_map_array"].shape == [1, 2, 2]
    assert arrays["weights"].data == ["neighbour"] and json.loads(arrays["neighbours"].data[0])["label"] == "tench"
    assert "query_map" not in arrays and EmbeddingAnswer.from_json(ARRAY_FAM.to_json()).fam.format == "array"
    embedded = embedding_answer().to_v2_tensors()
    assert embedded["embedding"].shape == [3] and embedded["match_index"].data == [4, 7]
    assert "match_reference_map" not in embedded  # one match has none
    assert list(embedded)[-2:] == ["crop_box", "batch_seconds"]


def test_envelopes_write_each_answers_json_and_stack_its_tensors():
    answers = [ANSWERS[1], ANSWERS[1]]
    assert envelope_body(PLAIN, answers[:1], False, "m") == ANSWERS[1].to_json()
    assert envelope_body(KSERVE_V1, answers, True, "m") == {"explanations": [a.to_json() for a in answers]}
    outputs = {o["name"]: o for o in envelope_body(KSERVE_V2, answers, False, "m")["outputs"]}
    assert outputs["scores"]["shape"] == [2, 2] and outputs["heatmap"]["shape"] == [2, 1]
    legacy = envelope_body(KSERVE_V2, answers, False, "m", json_output=True)["outputs"][0]
    assert [json.loads(d) for d in legacy["data"]] == [a.to_json() for a in answers]


def test_audit_records():
    assert ANSWERS[0].to_audit_record() is None and ANSWERS[5].to_audit_record() is None  # nothing explained
    record = ANSWERS[2].to_audit_record()
    assert record["kind"] == "explanation" and record["explanation_seconds"] == 0.1 and record["batch_size"] == 2
    assert record["options"] == {"method": "gradcam", "layer": "_conv_head", "targets": [3, 1], "options": {"a": 1},
                                 "format": "png"}
    assert record["heatmaps"] == [PNG_TEXT, PNG_TEXT] and all(isinstance(h, Base64) for h in record["heatmaps"])
    assert record["topk"] == [p.to_json() for p in PREDICTIONS]
    arrays = ANSWERS[3].to_audit_record()["heatmaps"]
    assert arrays == [[[0.1, 0.2], [0.3, 0.4]]] * 2 and not isinstance(arrays[0], Base64)
    compared = comparison_answer().to_audit_record()
    assert compared["kind"] == "compare" and compared["explanation_seconds"] == 0.2 and len(compared["heatmaps"]) == 2
    assert compared["options"] == {"compare": ["gradcam", "layercam"], "target": 3,
                                   "layers": ["_conv_head", "_conv_head"], "method_options": [{}, {"x": 1}],
                                   "format": "png"}
    assert compared["comparison"] == {"seconds": [0.5, 0.25], "spearman": [[1.0, 0.5], [0.5, 1.0]]}
    embedded = embedding_answer().to_audit_record()
    assert embedded["kind"] == "embedding" and embedded["topk"] is None and embedded["similarity"] == 0.9
    assert len(embedded["heatmaps"]) == 5  # the pair, then each match's (one reference map absent)
    assert embedded["matches"] == [{"index": 4, "label": "tench", "similarity": 0.9},
                                   {"index": 7, "label": "shark", "similarity": 0.5}]
    assert embedded["options"] == {"method": "fam", "metric": "cosine", "route": "pooled", "reference": "gallery"}
    assert embedding_answer(matches=False).to_audit_record()["matches"] is None


def test_predictions_from_a_softmax_and_from_earlier_records():
    probabilities = torch.tensor([0.1, 0.6, 0.3])
    assert Prediction.top(probabilities, ["a", "b"], 5) == [Prediction(1, "b", 0.6), Prediction(2, "2", 0.3),
                                                            Prediction(0, "a", 0.1)]  # no label: the index
    assert Prediction.from_json({"class": 2, "name": "x", "prob": 0.5}) == Prediction(2, "x", 0.5)
    assert Prediction.from_json({"index": 1, "score": 0.5}, ["a", "b"]) == Prediction(1, "b", 0.5)


def test_batch_record_speaks_the_servers_vocabulary(tmp_path):
    """A batch record's top-k is exactly the servers' ``predictions`` ({index, label, score})."""
    class Backend:
        names = ["c0", "c1", "c2", "c3"]
        description = "test"

    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    item = Item(tmp_path / "a.jpg", sha256="ab" * 32, size_bytes=10, image=image)
    settings = Settings("m", "1", "gradcam", "_conv_head", "top1", {}, 2, "jet", 0.5, 64, False, 0)
    result = Result(PREDICTIONS, [3], torch.rand(1, 7, 7), [0.0, 0.0, 30.0, 20.0], "_conv_head", {"per_image": 0.1})
    files, record = render_item(item, result, settings, "sid", Backend(), encode_png, to_uint8)
    assert record["topk"] == ClassifierAnswer(PREDICTIONS).to_json()["predictions"]
    assert record["topk"] == [{"index": 3, "label": "c3", "score": 0.75}, {"index": 1, "label": "c1", "score": 0.125}]
    assert record["targets"] == [3] and record["target_names"] == ["c3"] and len(files) == 3


def test_server_answer_read_back_by_the_batch_door():
    """``camserve batch --server`` reads a server answer with :meth:`ClassifierAnswer.from_json`: a
    comparison's first explanation, a one-image list unwrapped, labels filled from the class names."""
    body = comparison_answer().to_json()
    answer = ClassifierAnswer.from_json([body])
    assert answer.explained.method == "gradcam" and answer.explained.maps.heatmaps == [PNG_TEXT]
    sparse = ClassifierAnswer.from_json({"predictions": [{"index": 1, "score": 0.5}],
                                         "explanation": {"target": 1, "heatmap": PNG_TEXT}}, ["a", "b"])
    assert sparse.predictions == [Prediction(1, "b", 0.5)] and sparse.explained.targets == [1]
    assert sparse.explained.crop_box == [] and sparse.explained.layer is None
    with pytest.raises(ValueError):
        ClassifierAnswer.from_json("not an answer")


def test_prototype_answer_carries_the_episode_and_each_shot_map():
    """``prototypes=true``: the episode (``prototype``: JSON text in v2) and each shot's own map; the
    shots carry no query map of their own, so v2 has no ``match_query_map*``."""
    body = PROTOTYPE_FAM.to_json()
    assert body["prototype"]["label"] == "tench" and [m["query_map"] for m in body["matches"]] == [None, None]
    tensors = PROTOTYPE_FAM.to_v2_tensors()
    assert json.loads(tensors["prototype"].data[0]) == body["prototype"]
    assert "match_query_map_array" not in tensors and tensors["match_reference_map_array"].shape == [2, 2, 2]
    assert [p.title for p in PROTOTYPE_FAM.panels()][1:] == ["shot 0 tench · 0.800", "shot 1 tench · 0.700"]
