"""Request parsing, options and image limits of the serving layer, without a server (fast)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from camserve.serving.errors import (DecompressionBombError, ImageTooLargeError, InvalidBase64Error,
                                     InvalidImageError, InvalidJSONError, InvalidRequestOptionError,
                                     MissingInputError)
from camserve.serving.images import b64decode, decode_image
from camserve.serving.options import parse_options
from camserve.serving.protocol import KSERVE_V1, KSERVE_V2, PLAIN
from camserve.serving.requests import parse_request
from camserve.serving.settings import HandlerSettings

SETTINGS = HandlerSettings.from_model_config({"handler": {"default_method": "shallowcam",
                                                          "method_layers": {"shallowcam": "_blocks.4"},
                                                          "audit_log": "x.jsonl"}})


def jpeg(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_settings_keep_unknown_keys_for_extensions():
    assert SETTINGS.layer_for("shallowcam", None) == "_blocks.4"
    assert SETTINGS.layer_for("gradcam", None) is None and SETTINGS.extra == {"audit_log": "x.jsonl"}


def test_plain_multipart_and_query_options():
    parsed = parse_request({"data": jpeg(), "explain": b"gradcam", "layer": b"_blocks.10"})
    assert parsed.envelope == PLAIN and len(parsed.items) == 1
    options = parse_options(parsed.items[0].options, SETTINGS, explain_route=False)
    assert (options.method, options.layer, options.format) == ("gradcam", "_blocks.10", "png")
    headers = parse_request({"body": jpeg()}, header_options={"explain": "cam", "target": "3"})
    assert parse_options(headers.items[0].options, SETTINGS, False).target == "3"


def test_explain_route_and_flags_use_the_default_method():
    assert parse_options({}, SETTINGS, explain_route=True).method == "shallowcam"
    assert parse_options({"explain": b"1"}, SETTINGS, False).layer == "_blocks.4"
    assert parse_options({"explain": "0"}, SETTINGS, False).method is None
    options = parse_options({"explain": "shallowcam", "spatial": "relevance"}, SETTINGS, False)
    assert options.method_options == {"spatial": "relevance"}


@pytest.mark.parametrize("raw", [{"explain": "gradcam", "format": "gif"}, {"explain": "gradcam", "colormap": "rainbow"},
                                 {"explain": "gradcam", "overlay": "maybe"}, {"topk": "0"}, {"layer": "_blocks.2"}])
def test_bad_serving_options(raw):
    with pytest.raises(InvalidRequestOptionError):
        parse_options(raw, SETTINGS, False)


def test_kserve_envelopes():
    image = base64.b64encode(jpeg()).decode()
    v1 = parse_request({"body": {"instances": [image, {"data": image, "explain": "cam"}], "parameters": {"topk": 2}}})
    assert v1.envelope == KSERVE_V1 and len(v1.items) == 2
    assert v1.items[1].options == {"topk": 2, "explain": "cam"}
    v2 = parse_request({"body": {"id": "7", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                        "data": [image]}], "parameters": {"explain": "gradcam"}}})
    assert v2.envelope == KSERVE_V2 and v2.request_id == "7" and v2.items[0].options["explain"] == "gradcam"
    with pytest.raises(InvalidRequestOptionError):
        parse_request({"body": {"instances": [image] * 17}})


def test_request_errors():
    with pytest.raises(InvalidJSONError):
        parse_request({"body": b"{oops"}, json_parts=["body"])
    with pytest.raises(MissingInputError):
        parse_request({"explain": b"gradcam"})
    with pytest.raises(InvalidBase64Error):
        b64decode("@@@")
    with pytest.raises(InvalidImageError):
        decode_image(b"not an image")
    with pytest.raises(InvalidImageError):
        decode_image(jpeg()[:100])


def test_pixel_limits():
    assert tuple(decode_image(jpeg((40, 30))).shape) == (3, 30, 40)
    with pytest.raises(ImageTooLargeError):
        decode_image(jpeg((400, 300)), max_pixels=100_000)
    from integration.test_server_api import bomb_png
    with pytest.raises(ImageTooLargeError) as caught:  # header-only check, no pixel is decoded
        decode_image(bomb_png(40000, 40000))
    assert "pixels" in str(caught.value)
    with pytest.raises(DecompressionBombError):
        decode_image(bomb_png(40000, 40000), max_pixels=10 ** 10)


# -- issue 12: JSON bounds, KServe v2 inputs and tensors, settings that do something ---------------
def test_deeply_nested_json_is_a_400_before_parsing():
    from camserve.serving.requests import MAX_JSON_DEPTH, check_json, load_json
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads alone raises RecursionError here
    with pytest.raises(InvalidJSONError, match="nested 100000 levels"):
        parse_request({"body": deep}, json_parts=["body"])
    inside = ('{"data": "x", "a": "[[[[[[", "b": ' + "[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5) + "}")
    with pytest.raises(InvalidJSONError, match=f"at most {MAX_JSON_DEPTH} levels"):
        load_json(inside.encode())
    nested: list = []
    for _ in range(500):  # already parsed by TorchServe's worker: walked without recursion
        nested = [nested]
    with pytest.raises(InvalidJSONError, match="levels"):
        parse_request({"body": {"data": "x", "explain": nested}})
    with pytest.raises(InvalidJSONError, match="more than 10 values"):
        check_json(list(range(20)), max_values=10)
    assert load_json(b'{"data": "a[b{c", "x": [[1]]}')["x"] == [[1]]  # brackets in strings do not count


def test_json_output_and_outputs_are_v2_only_and_validated():
    image = base64.b64encode(jpeg()).decode()
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
    parsed = parse_request({"body": {**v2, "parameters": {"json_output": True}, "outputs": [{"name": "scores"}]}})
    assert parsed.meta == {"json_output": True, "outputs": ["scores"]} and "json_output" not in parsed.items[0].options
    assert parse_request({"body": v2}, header_options={"json_output": "1"}).meta["json_output"] is True
    for bad in ({**v2, "parameters": {"json_output": "maybe"}}, {**v2, "outputs": [{"name": "nope"}]},
                {**v2, "outputs": "scores"}):
        with pytest.raises(InvalidRequestOptionError):
            parse_request({"body": bad})
    with pytest.raises(InvalidRequestOptionError, match="KServe v2"):
        parse_request({"body": {"data": image, "json_output": True}})
    with pytest.raises(InvalidRequestOptionError, match="shape"):
        parse_request({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [image]}]}})


def test_v2_reference_embedding_input_is_an_embedding():
    from camserve.serving.protocol import EMBED_FIELDS
    image = base64.b64encode(jpeg()).decode()
    vector = [0.5, -0.25, 1.0, 0.0]
    for shape, data in (([4], vector), ([1, 4], vector), ([1, 4], [vector])):
        parsed = parse_request({"body": {"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "data": [image, image]},
            {"name": "reference_embedding", "datatype": "FP32", "shape": shape, "data": data}]}}, EMBED_FIELDS)
        assert [item.payloads["reference_embedding"] for item in parsed.items] == [vector, vector]
        assert all(isinstance(item.payloads["image"], str) for item in parsed.items)
    rows = parse_request({"body": {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [image, image]},
        {"name": "reference_embedding", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}}, EMBED_FIELDS)
    assert [item.payloads["reference_embedding"] for item in rows.items] == [[1.0, 2.0], [3.0, 4.0]]
    for bad in ({"datatype": "BYTES", "shape": [4], "data": vector}, {"datatype": "FP32", "shape": [3], "data": vector},
                {"datatype": "FP32", "shape": [3, 1], "data": [1, 2, 3]}, {"datatype": "FP32", "data": ["a"]}):
        with pytest.raises(InvalidRequestOptionError, match="reference_embedding"):
            parse_request({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "data": [image]},
                                               {"name": "reference_embedding", **bad}]}}, EMBED_FIELDS)
    with pytest.raises(InvalidRequestOptionError, match="no 'reference_embedding' input"):  # the classifier
        parse_request({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "data": [image]},
                                           {"name": "reference_embedding", "datatype": "FP32", "data": vector}]}})


def test_plain_prediction_rejects_options_it_would_ignore():
    with pytest.raises(InvalidRequestOptionError, match="unknown option"):
        parse_options({"steps": "32"}, SETTINGS, False)
    with pytest.raises(InvalidRequestOptionError, match="need an explanation"):
        parse_options({"alpha": "0.3"}, SETTINGS, False)
    assert parse_options({"topk": "3", "explain": "0"}, SETTINGS, False).topk == 3


def test_archive_colormap_is_the_overlay_default():
    import numpy as np
    import torch
    from camserve.serving.answer import RenderedMaps
    maps = torch.linspace(0, 1, 49).reshape(1, 7, 7)
    crop = torch.full((1, 3, 32, 32), 0.5)
    overlays = {}
    for name in ("jet", "gray"):
        settings = HandlerSettings.from_model_config({"handler": {"colormap": name}})
        options = parse_options({"explain": "gradcam", "overlay": "1"}, settings, False)
        assert options.colormap is None and options.default_colormap == name
        fields = RenderedMaps.render(maps, crop, options, (32, 32), 3).to_json()
        overlays[name] = np.asarray(Image.open(io.BytesIO(base64.b64decode(fields["overlay"]))))
        assert "heatmap_color" not in fields  # no colormap asked: no colour rendering
    gray = overlays["gray"].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()  # gray has no hue
    assert not np.array_equal(overlays["jet"], overlays["gray"])


def test_embedding_options_are_validated_without_a_reference():
    from camserve.serving.embedding import parse_embed_options
    settings = HandlerSettings.from_model_config({"handler": {"gallery_topk": 4, "max_gallery_topk": 10}})
    for raw, word in (({"similarity": "manhattan"}, "similarity"), ({"method": "nosuch"}, "nosuch"),
                      ({"explain": "nosuch"}, "nosuch"), ({"gallery": "many"}, "gallery"), ({"topk": "0"}, "topk"),
                      ({"embedding": "perhaps"}, "embedding"), ({"overlay": "2"}, "overlay"),
                      ({"colormap": "rainbow"}, "colormap"), ({"colour": "x"}, "colour"),
                      ({"method": "fam", "explain": "gradcam_similarity"}, "disagree"),
                      ({"gallery": "3", "topk": "4"}, "disagree"), ({"gallery": "false", "topk": "4"}, "gallery")):
        with pytest.raises(InvalidRequestOptionError, match=word):
            parse_embed_options(raw, settings)
    assert parse_embed_options({"gallery": "true"}, settings).gallery is True  # → handler.gallery_topk
    assert parse_embed_options({"gallery": True, "topk": "2"}, settings).gallery == 2
    assert parse_embed_options({"gallery": "1"}, settings).gallery == 1
    assert parse_embed_options({"gallery": "0"}, settings).gallery is None
    assert parse_embed_options({"topk": "5"}, settings).gallery == 5
    ok = parse_embed_options({"similarity": "DOT", "method": "gradcam_similarity"}, settings)
    assert (ok.similarity, ok.method) == ("dot", "gradcam_similarity")
    assert parse_embed_options({"explain": "0"}, settings).method is None


def test_v2_answer_is_named_tensors():
    from camserve.serving.answer import ClassifierAnswer
    from camserve.serving.encode import envelope_body
    png = base64.b64encode(b"png").decode()
    results = [{"predictions": [{"index": 3 + i, "label": f"c{3 + i}", "score": 0.5}, {"index": 1, "label": "c1",
                                                                                      "score": 0.25}],
                "batch_size": 2,
                "explanation": {"method": "gradcam", "layer": "_conv_head", "target": 3, "targets": [3, 4],
                                "labels": ["c3", "c4"], "format": "png", "layer_shape": [7, 7], "heatmap": png,
                                "heatmaps": [png, png], "size": [224, 224], "crop_box": [0, 1, 2, 3],
                                "image_size": [10, 20], "options": {}, "passes": {"forward": 1, "backward": 1},
                                "seconds": 0.1, "batch_size": 2}} for i in range(2)]
    answers = [ClassifierAnswer.from_json(r) for r in results]
    assert [a.to_json() for a in answers] == results  # the typed answer writes back the same JSON
    body = envelope_body(KSERVE_V2, answers, False, "m", "id-1")
    assert body["id"] == "id-1" and body["model_name"] == "m"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["scores"]["datatype"] == "FP32" and out["scores"]["shape"] == [2, 2]
    assert out["indices"] == {"name": "indices", "datatype": "INT64", "shape": [2, 2], "data": [3, 1, 4, 1]}
    assert out["labels"]["data"] == ["c3", "c1", "c4", "c1"] and out["labels"]["datatype"] == "BYTES"
    assert out["heatmap"]["shape"] == [2, 2] and out["heatmap"]["parameters"]["content_type"] == "image/png"
    assert out["crop_box"] == {"name": "crop_box", "datatype": "FP32", "shape": [2, 4],
                               "data": [0.0, 1.0, 2.0, 3.0] * 2}
    assert out["targets"]["data"] == [3, 4, 3, 4] and out["method"]["data"] == ["gradcam", "gradcam"]
    # a plain image next to an explained one: the explanation's outputs are per image (`name.<i>`)
    mixed = envelope_body(KSERVE_V2, [ClassifierAnswer(answers[0].predictions, batch_size=2), answers[1]],
                          False, "m")
    names = {o["name"]: o for o in mixed["outputs"]}
    assert names["scores"]["shape"] == [2, 2] and "heatmap" not in names
    assert names["heatmap.1"]["shape"] == [1, 2] and names["heatmap.1"]["parameters"]["index"] == 1
    only = envelope_body(KSERVE_V2, answers, False, "m", outputs=["scores", "heatmap"])
    assert [o["name"] for o in only["outputs"]] == ["scores", "heatmap"]
    legacy = envelope_body(KSERVE_V2, answers, True, "m", json_output=True)["outputs"]
    assert legacy[0]["name"] == "explanations" and legacy[0]["shape"] == [2]
    import json
    assert json.loads(legacy[0]["data"][1])["predictions"][0]["index"] == 4


def test_extreme_aspect_ratio_is_a_400_before_decoding():
    from camserve.serving.errors import ImageShapeError
    from camserve.serving.images import MAX_ASPECT_RATIO
    # 40,000 pixels, but the resize to 256 on the short side would make 256 x 10,240,000 floats
    with pytest.raises(ImageShapeError, match="aspect ratio of 40000:1"):
        decode_image(jpeg((40000, 1)))
    with pytest.raises(ImageShapeError):
        decode_image(jpeg((1, MAX_ASPECT_RATIO + 1)))
    assert tuple(decode_image(jpeg((MAX_ASPECT_RATIO, 1))).shape) == (3, 1, MAX_ASPECT_RATIO)


def test_v2_keeps_answer_keys_it_does_not_know():
    from camserve.serving.answer import ClassifierAnswer
    from camserve.serving.encode import envelope_body
    results = [{"predictions": [{"index": 1, "label": "a", "score": 0.5}], "batch_size": 1, "new_seconds": 0.25,
                "new_counts": [1, 2.5], "new_flag": True, "new_info": {"x": 1}}]
    answers = [ClassifierAnswer.from_json(r) for r in results]  # a newer server's answer, read back
    assert answers[0].to_json() == results[0] and list(answers[0].to_json()) == list(results[0])
    out = {o["name"]: o for o in envelope_body(KSERVE_V2, answers, False, "m")["outputs"]}
    assert (out["new_seconds"]["datatype"], out["new_seconds"]["shape"]) == ("FP32", [1])
    assert out["new_counts"]["datatype"] == "FP32" and out["new_counts"]["data"] == [1.0, 2.5]
    assert out["new_flag"]["datatype"] == "BOOL" and out["new_info"]["data"] == ['{"x":1}']


def test_v2_compare_answer_has_a_method_dimension():
    from camserve.serving.answer import ClassifierAnswer
    from camserve.serving.encode import envelope_body
    png = base64.b64encode(b"png").decode()

    def explanation(method):
        return {"method": method, "layer": "_conv_head", "target": 3, "targets": [3], "labels": ["c3"],
                "format": "png", "layer_shape": [7, 7], "heatmap": png, "size": [224, 224],
                "crop_box": [0, 1, 2, 3], "image_size": [10, 20], "options": {}, "passes": {"forward": 1},
                "seconds": 0.5, "batch_seconds": 0.5}
    result = {"predictions": [{"index": 3, "label": "c3", "score": 0.9}], "batch_size": 1,
              "explanations": [explanation("gradcam"), explanation("layercam")],
              "comparison": {"methods": ["gradcam", "layercam"], "target": 3, "seconds": [0.5, 0.5],
                             "spearman": [[1.0, 0.5], [0.5, 1.0]]}}
    answer = ClassifierAnswer.from_json(result)
    assert answer.to_json() == result
    out = {o["name"]: o for o in envelope_body(KSERVE_V2, [answer], False, "m")["outputs"]}
    assert out["method"]["shape"] == [1, 2] and out["method"]["data"] == ["gradcam", "layercam"]
    assert out["heatmap"]["shape"] == [1, 2, 1] and out["spearman"]["shape"] == [1, 2, 2]
    assert out["crop_box"]["shape"] == [1, 4] and out["comparison_target"]["data"] == [3]
    assert out["batch_seconds"]["shape"] == [1, 2] and out["scores"]["shape"] == [1, 1]


def test_archive_method_options_are_defaults_a_request_overrides():
    """``handler.method_options``: defaults for what a request does not name; naming one option of a
    coupled group (``start`` / ``contrastive`` / ``temperature``) takes none of that group from the
    defaults; compare= gets each method's defaults; bad defaults stop the worker (ValueError)."""
    settings = HandlerSettings.from_model_config({"handler": {
        "method_options": {"ShallowCAM": {"temperature": 4, "beta_from": "auto"}, "gradcam": {}}}})
    assert settings.method_options == {"shallowcam": {"temperature": 4, "beta_from": "auto"}, "gradcam": {}}

    def method_options(raw):
        return parse_options(raw, settings, explain_route=False).method_options

    assert method_options({"explain": "shallowcam"}) == {"temperature": 4, "beta_from": "auto"}
    assert method_options({"explain": "shallowcam", "beta_from": "layer"}) == {"temperature": 4, "beta_from": "layer"}
    assert method_options({"explain": "shallowcam", "start": "target"}) == {"beta_from": "auto", "start": "target"}
    assert method_options({"explain": "shallowcam", "contrastive": "0"}) == {"beta_from": "auto", "contrastive": "0"}
    assert method_options({"explain": "shallowcam", "temperature": "2"}) == {"temperature": "2", "beta_from": "auto"}
    assert method_options({"explain": "gradcam"}) == {}
    assert method_options({"explain": "relevancecam"}) == {}
    compared = parse_options({"compare": "layercam,shallowcam"}, settings, explain_route=False).compare
    assert [spec.options for spec in compared] == [{}, {"temperature": 4, "beta_from": "auto"}]
    assert parse_options({}, settings, explain_route=True).method_options == {"temperature": 4, "beta_from": "auto"}
    for bad, fragment in (({"nosuchcam": {}}, "not a CAM-family method"),
                          ({"shallowcam": {"temperature": "cold"}}, "positive number"),
                          ({"shallowcam": {"start": "rival", "temperature": 2}}, "softmax"),
                          ({"layercam": {"beta": "one"}}, "no option"),
                          ({"shallowcam": ["temperature"]}, "mapping"),
                          ("shallowcam", "map methods")):
        with pytest.raises(ValueError, match=fragment):
            HandlerSettings.from_model_config({"handler": {"method_options": bad}})
