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
from camserve.serving.requests import KSERVE_V1, KSERVE_V2, PLAIN, parse_request
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
    from test_server_api import bomb_png
    with pytest.raises(ImageTooLargeError) as caught:  # header-only check, no pixel is decoded
        decode_image(bomb_png(40000, 40000))
    assert "pixels" in str(caught.value)
    with pytest.raises(DecompressionBombError):
        decode_image(bomb_png(40000, 40000), max_pixels=10 ** 10)
