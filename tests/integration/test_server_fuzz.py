"""Malformed requests against the session's real TorchServe (issue 12): each one a 4xx with a message.

About 290 requests — 262 malformed: bodies, JSON (invalid, deeply nested, too many values), KServe
v1/v2 envelopes, classifier and embedding options, headers, image formats and sizes — plus the three
defects of the issue (a deeply nested body, an unknown ``similarity=``/``method=`` without a
reference, a request beyond ``max_request_size``) are sent concurrently from a bounded pool (:data:`WORKERS` threads)
with good requests mixed in. Every malformed one must be a 4xx whose JSON names the problem; every
good one must be answered correctly; after the run the server is healthy, the workers are the same
processes (none crashed and was restarted) and a good request right after is answered correctly.

The one documented exception to "a 4xx with a message" is TorchServe's frontend itself: a body over
``max_request_size`` is answered 413 with an **empty** body before any handler sees it, and a
request line over 4,096 bytes or headers over 8,192 bytes are answered 400 "Invalid HTTP message."
(see docs/serving.md, Errors); those cases assert exactly that.

:func:`test_an_answer_over_max_response_size_fails_alone` starts a second, small server with a
60,000-byte ``max_response_size``: an answer over it is a 413 for that request alone (TorchServe
itself would kill the worker and fail the whole batch).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
from PIL import Image

from conftest import label_of, photo_bytes as photo

pytestmark = pytest.mark.server
CLASSIFIER, EMBED = "effnet_lite0", "effnet_lite0_embed"
GOOD = "n01560419_bulbul.JPEG"
OTHER = "n01582220_magpie.JPEG"
WORKERS = 6
MAX_REQUEST = 16 * 1024 * 1024  # config.properties max_request_size


@dataclass
class Case:
    name: str
    path: str
    kwargs: Dict[str, Any]
    status: Tuple[int, ...] = (400,)
    word: Optional[str] = None  # a word the error message must contain (case-insensitive)
    method: str = "post"
    auth: bool = True
    empty_body: bool = False  # TorchServe's frontend 413: no body at all
    good: Optional[str] = None  # a good request: the photo whose label must be top-1
    extra: Dict[str, Any] = field(default_factory=dict)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels; ``idat`` its (maybe garbage) data."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", idat or zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def encoded(fmt: str, size=(48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 160, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def odd_images() -> Dict[str, bytes]:
    """Valid images in unusual formats, modes and sizes."""
    images = {fmt: encoded(fmt) for fmt in ("GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA")}
    for mode in ("L", "LA", "RGBA", "P", "I;16", "1", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
        images[f"mode {mode}"] = buffer.getvalue()
    for size in ((1, 1), (50, 1), (1, 50), (3, 2000 // 20)):
        images[f"size {size[0]}x{size[1]}"] = encoded("PNG", size)
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    images["animated gif"] = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    buffer = io.BytesIO()
    Image.new("RGB", (60, 20), (5, 200, 5)).save(buffer, format="JPEG", exif=exif)
    images["exif rotated jpeg"] = buffer.getvalue()
    return images


def jpost(model: str, body: Any, route: str = "predictions", **extra) -> Tuple[str, Dict[str, Any]]:
    path = {"predictions": f"/predictions/{model}", "v1": f"/v1/models/{model}:predict",
            "v2": f"/v2/models/{model}/infer", "v2x": f"/v2/models/{model}/explain"}[route]
    return path, {"json": body, **extra}


def raw_json(model: str, text, route: str = "predictions") -> Tuple[str, Dict[str, Any]]:
    path = f"/predictions/{model}" if route == "predictions" else f"/v2/models/{model}/infer"
    data = text.encode() if isinstance(text, str) else text
    return path, {"data": data, "headers": {"Content-Type": "application/json"}}


def cases() -> List[Case]:
    jpeg, png = photo(GOOD), encoded("PNG")
    image, image2 = b64(jpeg), b64(photo(OTHER))
    out: List[Case] = []

    def add(name, path_kwargs, status=(400,), word=None, **kw):
        path, kwargs = path_kwargs
        out.append(Case(name, path, kwargs, tuple(status) if isinstance(status, (list, tuple, range)) else (status,),
                        word, **kw))

    C = f"/predictions/{CLASSIFIER}"
    E = f"/predictions/{EMBED}"
    octet = {"Content-Type": "application/octet-stream"}

    # --- the three defects of issue 12 ---------------------------------------------------------
    add("defect: nested arrays 100k deep", raw_json(CLASSIFIER, "[" * 100_000 + "]" * 100_000), word="levels")
    add("defect: nested objects 5k deep in v2", raw_json(CLASSIFIER, '{"inputs":' + '{"a":' * 5000 + "1"
                                                         + "}" * 5000 + "}", route="v2"), word="levels")
    add("defect: embed similarity without reference", (E, {"files": {"image": jpeg, "similarity": "manhattan"}}),
        word="manhattan")
    add("defect: embed method without reference", (E, {"files": {"image": jpeg, "method": "nosuchfam"}}),
        word="nosuchfam")
    for route in ("predictions", "v1", "v2"):
        path = jpost(CLASSIFIER, None, route)[0]
        add(f"defect: {route} over max_request_size", (path, {"data": b'{"data": "' + b"A" * (MAX_REQUEST + 16) + b'"}',
                                                              "headers": {"Content-Type": "application/json"}}),
            status=413, empty_body=True)

    # --- bodies: raw bytes ---------------------------------------------------------------------
    add("empty body", (C, {"data": b"", "headers": octet}), word="empty")
    rng = random.Random(12)
    for n in (1, 2, 7, 64, 511, 4096, 70_000):
        add(f"random bytes {n}", (C, {"data": bytes(rng.getrandbits(8) for _ in range(n)), "headers": octet}),
            word="image")
    for fraction in (0.0005, 0.002, 0.01, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        add(f"truncated jpeg {fraction}", (C, {"data": jpeg[: int(len(jpeg) * fraction)], "headers": octet}),
            word="image")
    for cut in (8, 20, 33, 40, len(png) // 2, len(png) - 24):
        add(f"truncated png {cut}", (C, {"data": png[:cut], "headers": octet}), word="image")
    for fmt in ("GIF", "BMP", "TIFF", "WEBP"):
        data = encoded(fmt)
        add(f"truncated {fmt}", (C, {"data": data[: max(12, len(data) // 3)], "headers": octet}), word="image")
    add("png with garbage pixel data", (C, {"data": header_png(64, 64, b"\x78\x9c" + b"\xff" * 200), "headers": octet}),
        word="image")
    add("jpeg magic then zeros", (C, {"data": b"\xff\xd8\xff\xe0" + b"\x00" * 600, "headers": octet}), word="image")
    add("text body", (C, {"data": b"hello, model", "headers": octet}), word="image")
    add("json-looking body as octet-stream", (C, {"data": b'{"data": "abc"}', "headers": octet}), word="json")
    add("multipart-looking body as octet-stream",
        (C, {"data": b"--xx\r\nContent-Disposition: form-data\r\n\r\n", "headers": octet}), word="multipart")
    for w, h in ((10_000, 5_000), (40_000, 40_000), (2 ** 16, 2 ** 15), (7_000, 6_000)):
        add(f"pixels over max_pixels {w}x{h}", (C, {"data": header_png(w, h), "headers": octet}), status=413,
            word="pixels")
    for w, h in ((1, 40_000), (40_000, 1), (3_000, 20), (20, 3_000)):  # a tiny file, a huge resize
        add(f"aspect ratio {w}x{h}", (C, {"data": encoded("PNG", (w, h)), "headers": octet}), word="aspect ratio")
    for w, h in ((0, 10), (10, 0), (0, 0)):
        add(f"header claims {w}x{h}", (C, {"data": header_png(w, h), "headers": octet}), word="image")
    add("embed: aspect ratio of the reference", (E, {"files": {"image": jpeg, "reference": encoded("PNG", (4_000, 2))}}),
        word="aspect ratio")
    add("image over max_pixels as multipart", (C, {"files": {"data": header_png(9_000, 9_000)}}), status=413,
        word="pixels")
    add("embed: image over max_pixels", (E, {"files": {"image": header_png(9_000, 9_000)}}), status=413, word="pixels")
    add("embed: reference over max_pixels",
        (E, {"files": {"image": jpeg, "reference": header_png(9_000, 9_000)}}), status=413, word="reference")

    # --- JSON bodies -----------------------------------------------------------------------------
    for i, text in enumerate(["{", "}", "{oops", '{"data": }', '{"data": "x",}', "[1, 2", '{"a" "b"}', "nul",
                              "{'data': 'x'}", '{"data": "x"} trailing', "\x00", '{"data": "\\ud800"', "",
                              '{"data": NaN', '"unterminated']):
        add(f"invalid json {i}", raw_json(CLASSIFIER, text), word="json")
    add("json body not utf-8", raw_json(CLASSIFIER, b'{"data": "\xff\xfe"}'), word="utf-8")
    add("jpeg sent as json", raw_json(CLASSIFIER, jpeg), word="json")
    for depth in (33, 40, 100, 500, 990, 1200, 20_000):
        add(f"nested option {depth} deep", raw_json(CLASSIFIER, '{"data": "%s", "explain": %s}'
                                                    % (image, "[" * depth + "]" * depth)), word="levels")
    add("nested object option", raw_json(CLASSIFIER, '{"data": "x", "o": ' + '{"k":' * 300 + "0" + "}" * 300 + "}"),
        word="levels")
    add("nested v2 parameters", raw_json(CLASSIFIER, json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                                                  "data": [image]}], "parameters": {}})[:-1]
                                         + ', "deep": ' + "[" * 64 + "]" * 64 + "}", route="v2"), word="levels")
    add("too many json values", raw_json(CLASSIFIER, '{"data": "x", "list": [' + ",".join(["0"] * 300_000) + "]}"),
        word="values")
    add("json list body", jpost(CLASSIFIER, [image]), word="list")
    for value in ("a-string", 42, None, True, 3.5):
        add(f"json scalar body {value!r}", jpost(CLASSIFIER, value), status=(400,))
    add("json object without image", jpost(CLASSIFIER, {"explain": "gradcam"}), word="no image")
    add("empty json object", jpost(CLASSIFIER, {}), word="no image")
    for i, data in enumerate(["@@@", "", "   ", "é", "data:image/png;base64,", "A", "!" * 40, b64(b"not an image"),
                              image[:-7] + "@@@@@@@", "data:,"]):
        add(f"bad base64 {i}", jpost(CLASSIFIER, {"data": data}), word="image" if i == 7 else None)
    for i, data in enumerate([123, None, [], {}, ["x"], {"b64": 5}, 1.5, False]):
        add(f"data of the wrong type {i}", jpost(CLASSIFIER, {"data": data}))
    add("two images in one request", (C, {"files": {"data": jpeg, "image": jpeg}}), word="two")
    add("two images in one json body", jpost(CLASSIFIER, {"data": image, "image": image}), word="two")

    # --- KServe v1 -------------------------------------------------------------------------------
    for i, instances in enumerate([None, "x", 5, [], {}, [5], [None], [[]], [{"explain": "gradcam"}],
                                   [{"data": "@@@"}], [image] * 17, [{"data": image, "explain": "nosuchcam"}],
                                   [{"b64": {"b64": 3}}], [{"data": image}, {"data": image, "topk": "0"}]]):
        add(f"v1 instances {i}", jpost(CLASSIFIER, {"instances": instances}, "v1"))
    add("v1 parameters not an object", jpost(CLASSIFIER, {"instances": [image], "parameters": [1]}, "v1"),
        word="parameters")
    add("v1 json_output", jpost(CLASSIFIER, {"instances": [image], "parameters": {"json_output": True}}, "v1"),
        word="json_output")
    add("v1 bad option in parameters", jpost(CLASSIFIER, {"instances": [image], "parameters": {"format": "gif"}}, "v1"),
        word="explanation")

    # --- KServe v2 -------------------------------------------------------------------------------
    def tensor(data, name="image", datatype="BYTES", shape=None, **more):
        return {"name": name, "datatype": datatype, "shape": [len(data)] if shape is None else shape,
                "data": data, **more}

    v2_bodies = [
        ("inputs missing", {"id": "1"}), ("inputs not a list", {"inputs": {"name": "image"}}),
        ("inputs empty", {"inputs": []}), ("input not an object", {"inputs": ["x"]}),
        ("input without data", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}),
        ("data not a list", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": image}]}),
        ("image as FP32", {"inputs": [tensor([0.5], datatype="FP32")]}),
        ("image as INT8", {"inputs": [tensor([1, 2], datatype="INT8")]}),
        ("shape mismatch", {"inputs": [tensor([image], shape=[2])]}),
        ("shape not a list", {"inputs": [tensor([image], shape="1")]}),
        ("shape negative", {"inputs": [tensor([image], shape=[-1])]}),
        ("shape of bools", {"inputs": [tensor([image], shape=[True])]}),
        ("17 images", {"inputs": [tensor([image] * 17)]}),
        ("bad base64 element", {"inputs": [tensor(["@@@"])]}),
        ("element of the wrong type", {"inputs": [tensor([5])]}),
        ("element without image", {"inputs": [tensor([{"explain": "gradcam"}])]}),
        ("corrupt image element", {"inputs": [tensor([b64(jpeg[:300])])]}),
        ("reference input on the classifier", {"inputs": [tensor([image]), tensor([image2], name="reference")]}),
        ("reference_embedding on the classifier", {"inputs": [tensor([image]), tensor([0.1], "reference_embedding",
                                                                                     "FP32")]}),
        ("parameters not an object", {"inputs": [tensor([image])], "parameters": "explain"}),
        ("input parameters not an object", {"inputs": [tensor([image], parameters=[1])]}),
        ("json_output not a flag", {"inputs": [tensor([image])], "parameters": {"json_output": "maybe"}}),
        ("json_output per input", {"inputs": [tensor([image], parameters={"json_output": True})]}),
        ("unknown requested output", {"inputs": [tensor([image])], "outputs": [{"name": "logits"}]}),
        ("outputs not a list", {"inputs": [tensor([image])], "outputs": "scores"}),
        ("output without a name", {"inputs": [tensor([image])], "outputs": [{"shape": [1]}]}),
        ("unknown method", {"inputs": [tensor([image])], "parameters": {"explain": "nosuchcam"}}),
        ("unknown layer", {"inputs": [tensor([image])], "parameters": {"explain": "gradcam", "layer": "_nope"}}),
        ("target too large", {"inputs": [tensor([image])], "parameters": {"explain": "cam", "target": 5000}}),
        ("unknown parameter on a plain prediction", {"inputs": [tensor([image])], "parameters": {"binary_data": 1}}),
        ("bad option in one input", {"inputs": [tensor([image]), tensor([image2], parameters={"topk": 99})]}),
    ]
    for name, body in v2_bodies:
        add(f"v2 {name}", jpost(CLASSIFIER, body, "v2"))
        if name in ("inputs empty", "shape mismatch", "unknown method"):
            add(f"v2 explain {name}", jpost(CLASSIFIER, body, "v2x"))
    embed_v2 = [
        ("reference_embedding as BYTES", [tensor([image]), tensor(["0.1"], "reference_embedding")], "FP32"),
        ("reference_embedding as INT64", [tensor([image]), tensor([1], "reference_embedding", "INT64")], "FP32"),
        ("reference_embedding shape mismatch", [tensor([image]), tensor([0.1, 0.2], "reference_embedding", "FP32",
                                                                       [3])], "shape"),
        ("reference_embedding 3-d", [tensor([image]), tensor([0.1] * 8, "reference_embedding", "FP32", [2, 2, 2])],
         "shape"),
        ("reference_embedding rows mismatch", [tensor([image]), tensor([0.1] * 4, "reference_embedding", "FP32",
                                                                      [2, 2])], "rows"),
        ("reference_embedding of strings", [tensor([image]), tensor(["a"], "reference_embedding", "FP32")], "numbers"),
        ("reference_embedding empty", [tensor([image]), tensor([], "reference_embedding", "FP32")], "numbers"),
        ("reference_embedding wrong length", [tensor([image]), tensor([0.1] * 7, "reference_embedding", "FP32")],
         "1280"),
        ("two reference_embedding inputs", [tensor([image]), tensor([0.1], "reference_embedding", "FP32"),
                                            tensor([0.1], "reference_embedding", "FP32")], "at most one"),
        ("references count mismatch", [tensor([image, image]), tensor([image2], "reference")], "references"),
        ("reference as FP32", [tensor([image]), tensor([0.1], "reference", "FP32")], "BYTES"),
        ("corrupt reference", [tensor([image]), tensor([b64(b"junk")], "reference")], "reference"),
        ("reference and embedding both", [tensor([image]), tensor([image2], "reference"),
                                          tensor([0.1] * 1280, "reference_embedding", "FP32")], "at most one"),
    ]
    for name, inputs, word in embed_v2:
        add(f"embed v2 {name}", jpost(EMBED, {"inputs": inputs}, "v2"), word=word)

    # --- classifier options ----------------------------------------------------------------------
    option_cases = [
        ({"explain": "nosuchcam"}, "nosuchcam"), ({"explain": "gradcam", "layer": "_blocks.99"}, "_blocks.99"),
        ({"explain": "layercam", "layer": "features.nope"}, "features.nope"), ({"layer": "_blocks.4"}, "explanation"),
        ({"target": "3"}, "explanation"), ({"format": "array"}, "explanation"), ({"overlay": "1"}, "explanation"),
        ({"colormap": "jet"}, "explanation"), ({"alpha": "0.5"}, "explanation"), ({"steps": "32"}, "steps"),
        ({"explain": "gradcam", "target": "1000"}, "1000"), ({"explain": "gradcam", "target": "-1"}, "-1"),
        ({"explain": "gradcam", "target": "top99"}, "top99"), ({"explain": "gradcam", "target": "abc"}, "abc"),
        ({"explain": "gradcam", "target": "1,2,x"}, None), ({"explain": "gradcam", "format": "gif"}, "format"),
        ({"explain": "gradcam", "colormap": "rainbow"}, "rainbow"), ({"explain": "gradcam", "overlay": "maybe"},
                                                                     "overlay"),
        ({"explain": "gradcam", "alpha": "2"}, "alpha"), ({"explain": "gradcam", "alpha": "-0.1"}, "alpha"),
        ({"explain": "gradcam", "alpha": "abc"}, "alpha"), ({"topk": "0"}, "topk"), ({"topk": "21"}, "topk"),
        ({"topk": "abc"}, "topk"), ({"topk": "1.5"}, "topk"), ({"topk": "-3"}, "topk"),
        ({"explain": "gradcam", "spatial": "relevance"}, "spatial"), ({"explain": "shallowcam", "spatial": "nope"},
                                                                      None),
        ({"explain": "gradcam", "bogus_option": "1"}, "bogus_option"),
        ({"compare": "gradcam", "explain": "cam"}, "compare"), ({"compare": "gradcam"}, None),
        ({"compare": "gradcam,nosuchcam"}, "nosuchcam"), ({"compare": "cam,gradcam,layercam,gradcampp,shallowcam"},
                                                          None),
        ({"compare": "cam,gradcam", "target": "top2"}, "target"), ({"compare": ",,"}, None),
        ({"explain": "captum.integrated_gradients", "steps": "100000"}, "steps"),
        ({"explain": "captum.integrated_gradients", "steps": "0"}, None),
        ({"explain": "captum.nosuch"}, "captum.nosuch"), ({"json_output": "1"}, "json_output"),
    ]
    for i, (fields, word) in enumerate(option_cases):
        add(f"option {i} {fields}", (C, {"files": {"data": jpeg, **fields}}), word=word)
    add("option value not utf-8", (C, {"files": {"data": jpeg, "explain": ("e", b"\xff\xfe", "application/octet-stream")}}),
        word="'explain'")
    add("explain route with a bad option", (f"/explanations/{CLASSIFIER}", {"files": {"data": jpeg, "format": "gif"}}),
        word="format")
    add("query options on /predict", (f"/{CLASSIFIER}/predict?explain=gradcam&colormap=rainbow",
                                      {"files": {"data": jpeg}}), word="rainbow")
    add("query option unknown on /predict", (f"/{CLASSIFIER}/predict?topk=0", {"files": {"data": jpeg}}), word="topk")

    # --- embedding options ---------------------------------------------------------------------------
    embed_cases = [
        ({"similarity": "l1"}, "l1"), ({"method": "gradcam"}, "gradcam"), ({"explain": "cam"}, "cam"),
        ({"gallery": "many"}, "gallery"), ({"gallery": "500"}, "gallery"), ({"gallery": "-1"}, "gallery"),
        ({"topk": "0"}, "topk"), ({"topk": "x"}, "topk"), ({"gallery": "2", "topk": "3"}, "disagree"),
        ({"gallery": "off", "topk": "3"}, "gallery"), ({"embedding": "perhaps"}, "embedding"),
        ({"overlay": "2"}, "overlay"), ({"colormap": "rainbow"}, "rainbow"), ({"colour": "red"}, "colour"),
        ({"method": "fam", "explain": "gradcam_similarity"}, "disagree"), ({"layer": "_blocks.4"}, "layer"),
        ({"reference": photo(OTHER), "similarity": "l2"}, "l2"), ({"reference": photo(OTHER), "method": "x"}, "'x'"),
        ({"reference": photo(OTHER), "explain": "0"}, "explain=0"), ({"reference": b"junk"}, "reference"),
        ({"reference": photo(OTHER), "gallery": "2"}, "at most one"),
        ({"reference_embedding": "[0.1, 0.2]"}, "1280"), ({"reference_embedding": "not json"}, "reference_embedding"),
        ({"reference_embedding": "[]"}, "reference_embedding"), ({"reference_embedding": '["a"]'},
                                                                 "reference_embedding"),
        ({"reference_embedding": "[true]"}, "reference_embedding"),
    ]
    for i, (fields, word) in enumerate(embed_cases):
        add(f"embed option {i}", (E, {"files": {"image": jpeg, **fields}}), word=word)
    add("embed reference_embedding NaN", (E, {"data": '{"image": "%s", "reference_embedding": [%s]}'
                                              % (image, ",".join(["NaN"] + ["0.1"] * 1279)),
                                              "headers": {"Content-Type": "application/json"}}), word="nan")
    add("embed no image", (E, {"files": {"reference": jpeg}}), word="no image")
    add("embed v1 bad instance option", jpost(EMBED, {"instances": [{"image": image, "similarity": "x"}]}, "v1"),
        word="similarity")

    # --- headers and routes ----------------------------------------------------------------------
    for name, headers, word in [("X-Camserve-Explain unknown", {"X-Camserve-Explain": "nosuchcam"}, "nosuchcam"),
                                ("X-Camserve-Topk 0", {"X-Camserve-Topk": "0"}, "topk"),
                                ("X-Camserve-Format gif", {"X-Camserve-Explain": "cam", "X-Camserve-Format": "gif"},
                                 "format"),
                                ("X-Camserve-Target bad", {"X-Camserve-Explain": "cam", "X-Camserve-Target": "x"}, "x"),
                                ("X-Camserve-Json-Output on a plain route", {"X-Camserve-Json-Output": "1"},
                                 "json_output"),
                                ("X-Camserve-Unknown", {"X-Camserve-Whatever": "1"}, "whatever")]:
        add(f"header {name}", (C, {"data": jpeg, "headers": {**octet, **headers}}), word=word)
    add("v2 header json_output not a flag", jpost(CLASSIFIER, {"inputs": [tensor([image])]}, "v2",
                                                  headers={"X-Camserve-Json-Output": "maybe"}), word="json_output")
    add("json content type, jpeg body", (C, {"data": jpeg, "headers": {"Content-Type": "application/json"}}),
        word="json")
    add("form-urlencoded without image", (C, {"data": "explain=gradcam",
                                              "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        word="no image")
    add("multipart without a boundary", (C, {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}),
        status=range(400, 500))
    add("multipart without an image field", (C, {"files": {"explain": "gradcam"}}), word="no image")
    add("no token", (C, {"data": jpeg, "headers": octet}), status=(400, 401), word="token", auth=False)
    add("wrong token", (C, {"data": jpeg, "headers": {**octet, "Authorization": "Bearer nope"}}), status=(400, 401),
        word="token", auth=False)
    add("unknown model", ("/predictions/nosuchmodel", {"data": jpeg, "headers": octet}), status=404, word="nosuchmodel")
    add("unknown v2 model", jpost("nosuchmodel", {"inputs": [tensor([image])]}, "v2"), status=404, word="nosuchmodel")
    add("request line over 4096 bytes", (C + "?" + "q" * 5000, {"data": jpeg, "headers": octet}),
        word="invalid http message")
    add("headers over 8192 bytes", (C, {"data": jpeg, "headers": {**octet, "X-Pad": "p" * 9000}}),
        word="invalid http message")

    # --- good requests mixed in (each must be answered correctly) --------------------------------
    for i in range(6):
        out.append(Case(f"good plain {i}", C, {"data": jpeg, "headers": octet}, (200,), good=GOOD))
    out.append(Case("good explained", C, {"files": {"data": jpeg, "explain": "gradcam"}}, (200,), good=GOOD))
    out.append(Case("good v2", *jpost(CLASSIFIER, {"inputs": [tensor([image])]}, "v2"), (200,), good=GOOD))
    out.append(Case("good embed", E, {"files": {"image": jpeg, "reference": photo(OTHER)}}, (200,), good="embed"))
    for name, data in odd_images().items():  # unusual but valid images: answered 200 with 5 predictions
        out.append(Case(f"good {name}", C, {"data": data, "headers": octet}, (200,), good="any"))
    return out


def send(server, case: Case) -> requests.Response:
    kwargs = dict(case.kwargs)
    headers = {**(server.headers() if case.auth else {}), **kwargs.pop("headers", {})}
    for attempt in range(3):
        try:
            return requests.request(case.method, f"{server.url}{case.path}", headers=headers, timeout=240, **kwargs)
        except requests.ConnectionError:
            # the frontend closes the connection of a 413 while the client still sends the body
            if not case.empty_body or attempt == 2:
                raise
            time.sleep(0.5)


def message_of(response: requests.Response) -> str:
    body = response.json()
    error = body.get("error", body)
    return str(error.get("message", "")) if isinstance(error, dict) else str(error)


def check(case: Case, response: requests.Response, samples) -> Optional[str]:
    """``None`` when ``response`` is what ``case`` expects, else why not."""
    if response.status_code not in case.status:
        return f"status {response.status_code}: {response.text[:300]}"
    if case.empty_body:
        return None if response.content == b"" else f"expected an empty body, got {response.text[:200]}"
    if case.good is not None:
        body = response.json()
        if case.good == "any":
            return None if len(body.get("predictions", [])) == 5 else str(body)[:300]
        if case.good == "embed":
            return None if body.get("similarity", 0) > 0 and len(body.get("embedding", [])) == 1280 else str(body)[:300]
        try:
            if "outputs" in body:
                label = next(o for o in body["outputs"] if o["name"] == "labels")["data"][0]
            else:
                label = body["predictions"][0]["label"]
        except (KeyError, IndexError, StopIteration, TypeError):
            return f"unexpected answer {str(body)[:300]}"
        return None if label == label_of(case.good, samples) else f"top-1 {label}"
    try:
        message = message_of(response)
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not message:
        return f"no message: {response.text[:200]}"
    if case.word and case.word.lower() not in message.lower():
        return f"message lacks {case.word!r}: {message[:300]}"
    return None


def workers(server) -> Dict[str, List[Tuple[Any, Any]]]:
    out = {}
    for model in (CLASSIFIER, EMBED):
        info = requests.get(f"{server.management_url}/models/{model}", headers=server.headers("management"),
                            timeout=30).json()[0]
        out[model] = sorted((w.get("pid"), w.get("startTime")) for w in info["workers"])
    return out


def test_malformed_requests_are_4xx_with_a_message(torchserve_server, samples):
    all_cases = cases()
    malformed = [c for c in all_cases if c.good is None]
    assert len(malformed) >= 200, len(malformed)
    before = workers(torchserve_server)
    start = time.monotonic()
    random.Random(7).shuffle(all_cases)  # good requests share batches with malformed ones
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        responses = list(pool.map(lambda c: send(torchserve_server, c), all_cases))
    seconds = time.monotonic() - start
    failures = [f"{case.name}: {why}" for case, response in zip(all_cases, responses)
                if (why := check(case, response, samples)) is not None]
    print(f"{len(all_cases)} requests ({len(malformed)} malformed) in {seconds:.1f} s")
    if os.environ.get("CAMSERVE_FUZZ_LOG"):
        with open(os.environ["CAMSERVE_FUZZ_LOG"], "w") as log:
            for case, response in zip(all_cases, responses):
                log.write(f"{response.status_code}\t{case.name}\t{response.text[:160]!r}\n")
    assert not failures, "\n".join(failures)
    ping = requests.get(f"{torchserve_server.url}/ping", headers=torchserve_server.headers(), timeout=30)
    assert ping.json()["status"] == "Healthy"
    assert workers(torchserve_server) == before, "a worker died and was restarted during the fuzz"
    after = send(torchserve_server, Case("good after", f"/predictions/{CLASSIFIER}",
                                         {"files": {"data": photo(GOOD), "explain": "gradcam"}}, (200,), good=GOOD))
    assert check(Case("", "", {}, (200,), good=GOOD), after, samples) is None, after.text[:300]
    assert after.json()["explanation"]["method"] == "gradcam"
    embed = send(torchserve_server, Case("good embed after", f"/predictions/{EMBED}",
                                         {"files": {"image": photo(GOOD)}}, (200,)))
    assert embed.status_code == 200 and len(embed.json()["embedding"]) == 1280


def test_an_answer_over_max_response_size_fails_alone(samples):
    """TorchServe kills the worker when one answer exceeds ``max_response_size`` ("Worker died." for the
    whole batch); camserve answers that request alone with a 413 naming the limit."""
    import shutil
    import threading

    from serverkit import start_server

    limit = "60000"
    previous = os.environ.get("CAMSERVE_MAX_RESPONSE_BYTES")
    os.environ["CAMSERVE_MAX_RESPONSE_BYTES"] = limit  # the workers inherit TorchServe's environment
    try:
        server = start_server(models={CLASSIFIER: "effnet_lite0.mar"}, overrides={"max_response_size": limit})
    finally:
        if previous is None:
            os.environ.pop("CAMSERVE_MAX_RESPONSE_BYTES", None)
        else:
            os.environ["CAMSERVE_MAX_RESPONSE_BYTES"] = previous
    try:
        before = requests.get(f"{server.management_url}/models/{CLASSIFIER}", headers=server.headers("management"),
                              timeout=30).json()[0]["workers"]
        big = {"files": {"data": photo(GOOD), "explain": "gradcam", "target": "top3", "overlay": "1",
                         "colormap": "jet"}}
        small = {"data": photo(GOOD), "headers": {"Content-Type": "application/octet-stream"}}
        calls = [big] + [small] * 5
        barrier = threading.Barrier(len(calls))
        responses: List[Any] = [None] * len(calls)

        def run(i, kwargs):
            barrier.wait()
            responses[i] = send(server, Case(f"call {i}", f"/predictions/{CLASSIFIER}", kwargs))

        threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert responses[0].status_code == 413, responses[0].text[:300]
        assert "max_response_size" in message_of(responses[0]) and limit in message_of(responses[0])
        for response in responses[1:]:
            assert response.status_code == 200, response.text[:300]
            assert response.json()["predictions"][0]["label"] == label_of(GOOD, samples)
        after = requests.get(f"{server.management_url}/models/{CLASSIFIER}", headers=server.headers("management"),
                             timeout=30).json()[0]["workers"]
        assert [w["pid"] for w in after] == [w["pid"] for w in before], "the worker died"
        again = send(server, Case("after", f"/predictions/{CLASSIFIER}", {"files": {"data": photo(GOOD),
                                                                                 "explain": "gradcam"}}))
        assert again.status_code == 200 and again.json()["explanation"]["method"] == "gradcam"
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.mark.parametrize("classifier,embed", [("tv_resnet18", "tv_resnet18_embed"), ("timm_vit", "tv_resnet18_proj")])
def test_malformed_requests_to_bring_your_own_archives(torchserve_server, classifier, embed):
    """The same malformed requests sent to archives built by ``camserve archive`` (a torchvision CNN
    and a 512-d pooled embedder; a timm ViT and a 128-d projection-head embedder): each a 4xx with a
    message (the words may differ: the embedding size, the layer names), the workers alive after."""
    def retarget(path: str) -> str:
        return path.replace(f"/{EMBED}", f"/{embed}").replace(f"/{CLASSIFIER}", f"/{classifier}")

    malformed = [Case(c.name, retarget(c.path), c.kwargs, c.status, None, c.method, c.auth, c.empty_body)
                 for c in cases() if c.good is None]
    models = (classifier, embed)

    def pids():
        return {m: sorted(w.get("pid") for w in requests.get(f"{torchserve_server.management_url}/models/{m}",
                                                               headers=torchserve_server.headers("management"),
                                                               timeout=30).json()[0]["workers"]) for m in models}
    before = pids()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        responses = list(pool.map(lambda c: send(torchserve_server, c), malformed))
    failures = [f"{case.name}: {why}" for case, response in zip(malformed, responses)
                if (why := check(case, response, None)) is not None]
    assert not failures, "\n".join(failures)
    assert pids() == before, "a worker died and was restarted during the fuzz"
    good = requests.post(f"{torchserve_server.url}/predictions/{classifier}", headers=torchserve_server.headers(),
                         files={"data": photo(GOOD), "explain": (None, "gradcam")}, timeout=240)
    assert good.status_code == 200 and good.json()["explanation"]["method"] == "gradcam", good.text[:300]
