"""The classifier over HTTP: a real TorchServe (tests/serverkit.py), real photographs, token auth.

Everything goes through ``requests`` to the loopback server started once per session.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zlib
import struct

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import decode_png as png, label_of, photo_bytes as photo
from serverkit import REPO

pytestmark = pytest.mark.server
MODEL = "effnet_lite0"
# clear photographs (the pretrained model's top-1 is right with p > 0.9 on these)
CLEAR = ["n01560419_bulbul.JPEG", "n01582220_magpie.JPEG", "n01665541_leatherback_turtle.JPEG",
         "n01795545_black_grouse.JPEG", "n01833805_hummingbird.JPEG", "n01914609_sea_anemone.JPEG",
         "n01955084_chiton.JPEG", "n01828970_bee_eater.JPEG"]


def post(server, path, **kwargs):
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    return requests.post(f"{server.url}{path}", headers=headers, timeout=300, **kwargs)


def test_token_is_required(torchserve_server):
    response = requests.post(f"{torchserve_server.url}/predictions/{MODEL}", data=photo(CLEAR[0]), timeout=60)
    # TorchServe 0.12 answers a missing/wrong token with 400 and an InvalidKeyException body
    assert response.status_code in (400, 401)
    assert "Token Authorization failed" in response.json()["message"]
    wrong = requests.post(f"{torchserve_server.url}/predictions/{MODEL}", data=photo(CLEAR[0]), timeout=60,
                          headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code in (400, 401)


def test_predictions_are_right_on_clear_photos(torchserve_server, samples):
    for name in CLEAR[:3]:
        response = post(torchserve_server, f"/predictions/{MODEL}", data=photo(name))
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["predictions"]) == 5
        assert body["predictions"][0]["label"] == label_of(name, samples)
        assert body["predictions"][0]["score"] > 0.5
        assert "explanation" not in body


def test_explanation_png_on_the_object(torchserve_server, samples):
    name = "n01833805_hummingbird.JPEG"
    response = post(torchserve_server, f"/{MODEL}/predict?explain=gradcam&overlay=1&colormap=inferno",
                    data=photo(name))
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanation"]
    assert body["predictions"][0]["label"] == label_of(name, samples)
    assert explanation["method"] == "gradcam" and explanation["layer"] == "_conv_head"
    assert explanation["target"] == body["predictions"][0]["index"]
    heatmap = png(explanation["heatmap"])
    assert heatmap.size == (224, 224) and heatmap.mode == "L"
    pixels = np.asarray(heatmap).astype(float)
    assert pixels.std() > 10
    border = np.concatenate([pixels[:16].ravel(), pixels[-16:].ravel(), pixels[:, :16].ravel(), pixels[:, -16:].ravel()])
    centre = pixels[56:168, 56:168]
    assert centre.mean() > border.mean()
    assert png(explanation["overlay"]).size == (224, 224) and png(explanation["overlay"]).mode == "RGB"
    assert png(explanation["heatmap_color"]).mode == "RGB"
    width, height = Image.open(io.BytesIO(photo(name))).size
    x0, y0, x1, y1 = explanation["crop_box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert abs((x1 - x0) - (y1 - y0)) < 2  # a square crop
    assert explanation["image_size"] == [width, height]
    # one explained request = one forward + one backward (Grad-CAM needs no relevance pass)
    assert explanation["passes"] == {"forward": 1, "backward": 1, "relevance": 0}


def test_array_format_is_layer_resolution(torchserve_server):
    response = post(torchserve_server, f"/predictions/{MODEL}",
                    files={"data": photo(CLEAR[1]), "explain": "shallowcam", "layer": "_blocks.4", "format": "array"})
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    array = np.asarray(explanation["array"])
    assert array.shape == tuple(explanation["layer_shape"]) == (28, 28)
    assert 0.0 <= array.min() and array.max() <= 1.0 and array.max() > 0.9
    assert explanation["passes"]["forward"] == 1 and explanation["passes"]["relevance"] == 1


def test_json_headers_and_explanations_route(torchserve_server):
    image = base64.b64encode(photo(CLEAR[2])).decode()
    by_json = post(torchserve_server, f"/predictions/{MODEL}",
                   json={"data": image, "explain": "layercam", "layer": "_blocks.10", "target": "top2"})
    assert by_json.status_code == 200, by_json.text
    explanation = by_json.json()["explanation"]
    assert explanation["layer"] == "_blocks.10" and len(explanation["targets"]) == 2
    assert len(explanation["heatmaps"]) == 2 and png(explanation["heatmaps"][1]).size == (224, 224)
    by_header = post(torchserve_server, f"/predictions/{MODEL}", data=photo(CLEAR[2]),
                     headers={"X-Camserve-Explain": "cam", "X-Camserve-Target": "34"})
    assert by_header.json()["explanation"]["method"] == "cam"
    assert by_header.json()["explanation"]["target"] == 34
    default = post(torchserve_server, f"/explanations/{MODEL}", data=photo(CLEAR[2]))
    assert default.status_code == 200, default.text
    # the archive's calibrated default (configs/effnet_lite0.yaml's card), with its calibrated score
    explanation = default.json()["explanation"]
    assert (explanation["method"], explanation["layer"]) == ("layercam", "_blocks.0")
    card = json.loads((REPO / "benchmarks" / "results" / "calibration_effnet_lite0_200.json").read_text())
    score = next(s for s in card["scores"] if (s["method"], s["layer"]) == ("layercam", "_blocks.0"))
    assert explanation["calibration"] == {k: score[k] for k in ("overall", "vs_layercam", "sem", "n")}
    assert "calibration" not in by_header.json()["explanation"]  # CAM at _conv_head: not a calibrated reading


def test_kserve_v1_and_v2(torchserve_server, samples):
    images = [base64.b64encode(photo(n)).decode() for n in CLEAR[3:5]]
    v1 = post(torchserve_server, f"/v1/models/{MODEL}:predict",
              json={"instances": [{"data": images[0]}, images[1]]})
    assert v1.status_code == 200, v1.text
    predictions = v1.json()["predictions"]
    assert [p["predictions"][0]["label"] for p in predictions] == [label_of(n, samples) for n in CLEAR[3:5]]
    v1x = post(torchserve_server, f"/v1/models/{MODEL}:explain",
               json={"instances": [{"data": images[0], "explain": "gradcampp"}], "parameters": {"format": "array"}})
    assert v1x.status_code == 200, v1x.text
    assert v1x.json()["explanations"][0]["explanation"]["method"] == "gradcampp"
    v2 = post(torchserve_server, f"/v2/models/{MODEL}/infer",
              json={"id": "r-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": images}],
                    "parameters": {"explain": "gradcam", "target": "top2"}})
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert body["id"] == "r-1" and body["model_name"] == MODEL
    out = {o["name"]: o for o in body["outputs"]}  # Open Inference Protocol: named tensors, row-major data
    assert (out["scores"]["datatype"], out["scores"]["shape"]) == ("FP32", [2, 5])
    assert (out["indices"]["datatype"], out["indices"]["shape"]) == ("INT64", [2, 5])
    assert (out["labels"]["datatype"], out["labels"]["shape"]) == ("BYTES", [2, 5])
    assert [out["labels"]["data"][0], out["labels"]["data"][5]] == [label_of(n, samples) for n in CLEAR[3:5]]
    scores = np.asarray(out["scores"]["data"]).reshape(2, 5)
    assert (np.diff(scores, axis=1) <= 0).all() and scores[:, 0].min() > 0.5
    assert out["method"]["data"] == ["gradcam", "gradcam"] and out["layer"]["data"] == ["_conv_head"] * 2
    assert out["targets"]["shape"] == [2, 2]
    assert out["targets"]["data"][::2] == out["indices"]["data"][::5]  # target top1 = predicted class
    heatmap = out["heatmap"]
    assert (heatmap["datatype"], heatmap["shape"]) == ("BYTES", [2, 2])
    assert heatmap["parameters"] == {"content_type": "image/png", "encoding": "base64"}
    assert all(png(p).size == (224, 224) for p in heatmap["data"])
    assert (out["crop_box"]["datatype"], out["crop_box"]["shape"]) == ("FP32", [2, 4])
    assert out["passes_forward"]["data"] == [1, 1]
    v2x = post(torchserve_server, f"/v2/models/{MODEL}/explain",
               json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [images[1]]}],
                     "parameters": {"format": "array", "layer": "_blocks.10"}})
    assert v2x.status_code == 200, v2x.text
    out = {o["name"]: o for o in v2x.json()["outputs"]}
    assert out["method"]["data"] == ["layercam"]  # the explain route's default method (calibrated)
    array = out["heatmap_array"]
    assert (array["datatype"], array["shape"]) == ("FP32", [1, 1, 14, 14]) and len(array["data"]) == 14 * 14
    assert 0.0 <= min(array["data"]) and max(array["data"]) <= 1.0 and "heatmap" not in out
    # the old form (each image's JSON answer as text in one BYTES output) only when asked for
    legacy = post(torchserve_server, f"/v2/models/{MODEL}/infer",
                  json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [images[1]]}],
                        "parameters": {"json_output": True, "explain": "cam"}})
    output = legacy.json()["outputs"][0]
    assert output["name"] == "predictions" and output["datatype"] == "BYTES" and output["shape"] == [1]
    assert json.loads(output["data"][0])["explanation"]["method"] == "cam"
    # requested outputs only (OIP "outputs"), options as X-Camserve-* headers
    some = post(torchserve_server, f"/v2/models/{MODEL}/infer", headers={"X-Camserve-Topk": "3"},
                json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [images[0]]}],
                      "outputs": [{"name": "labels"}, {"name": "scores"}]})
    assert [(o["name"], o["shape"]) for o in some.json()["outputs"]] == [("scores", [1, 3]), ("labels", [1, 3])]


OPTION_SETS = [
    ({}, None),
    ({"explain": "gradcam"}, ("gradcam", "_conv_head")),
    ({"explain": "gradcam", "layer": "_blocks.10", "target": "5"}, ("gradcam", "_blocks.10")),
    ({"explain": "shallowcam", "layer": "_blocks.2", "temperature": "2"}, ("shallowcam", "_blocks.2")),
    ({"explain": "layercam", "format": "array"}, ("layercam", "_blocks.0")),
    ({"explain": "cam", "target": "top2"}, ("cam", "_conv_head")),
    ({"explain": "gradcampp", "layer": "_blocks.14", "overlay": "1"}, ("gradcampp", "_blocks.14")),
    ({"topk": "2"}, None),
]


def concurrent(server, calls):
    """Fire ``calls`` (path, kwargs) at once from threads; responses in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, path, kwargs):
        barrier.wait()
        results[i] = post(server, path, **kwargs)

    threads = [threading.Thread(target=run, args=(i, p, k)) for i, (p, k) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batch_of_eight_different_option_sets(torchserve_server, samples):
    calls = [(f"/predictions/{MODEL}", {"files": {"data": photo(CLEAR[i]), **opts}})
             for i, (opts, _) in enumerate(OPTION_SETS)]
    responses = concurrent(torchserve_server, calls)
    sizes = []
    for i, (response, (opts, expected)) in enumerate(zip(responses, OPTION_SETS)):
        assert response.status_code == 200, response.text
        body = response.json()
        sizes.append(body["batch_size"])
        assert body["predictions"][0]["label"] == label_of(CLEAR[i], samples)
        assert len(body["predictions"]) == int(opts.get("topk", 5))
        if expected is None:
            assert "explanation" not in body
            continue
        explanation = body["explanation"]
        assert (explanation["method"], explanation["layer"]) == expected
        assert explanation["passes"]["forward"] == 1  # the batch's single forward
        if "target" in opts and opts["target"].isdigit():
            assert explanation["targets"] == [int(opts["target"])]
        if opts.get("target") == "top2":
            assert len(explanation["targets"]) == 2 and len(explanation["heatmaps"]) == 2
        if opts.get("format") == "array":
            assert np.asarray(explanation["array"]).shape == (112, 112)  # LayerCAM at its calibrated _blocks.0
        else:
            assert png(explanation["heatmap"]).size == (224, 224)
        assert ("overlay" in explanation) == (opts.get("overlay") == "1")
        if "temperature" in opts:  # the softmax start's temperature, echoed (T = 1 is not)
            assert explanation["options"]["temperature"] == 2.0 and explanation["options"]["start"] == "softmax"
    assert max(sizes) > 1, f"no request was batched: {sizes}"
    print("batch sizes seen by the 8 concurrent requests:", sizes)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 1-bit pixels (compressed zeros)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def big_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="JPEG", quality=30)
    return buffer.getvalue()


def test_errors_are_isolated_in_their_batch(torchserve_server, samples):
    good = photo(CLEAR[5])
    cases = {
        "corrupt image": ({"data": good[: len(good) // 3][:200] + b"garbage"}, 400, "image"),
        "unknown method": ({"data": good, "explain": "nosuchcam"}, 400, "nosuchcam"),
        "unknown layer": ({"data": good, "explain": "gradcam", "layer": "_blocks.99"}, 400, "_blocks.99"),
        "bad target": ({"data": good, "explain": "gradcam", "target": "1000"}, 400, "1000"),
        "oversized": ({"data": big_jpeg(8000, 6000)}, 413, "pixels"),
        "bomb": ({"data": bomb_png(40000, 40000)}, 413, "pixels"),
        "bad option": ({"data": good, "explain": "gradcam", "format": "gif"}, 400, "format"),
        "bad method option": ({"data": good, "explain": "shallowcam", "start": "rival", "temperature": "2"}, 400,
                              "temperature"),
    }
    calls = [(f"/predictions/{MODEL}", {"files": files}) for files, _, _ in cases.values()]
    calls.append((f"/predictions/{MODEL}", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}))
    calls.append((f"/predictions/{MODEL}", {"json": {"data": "@@not base64@@"}}))
    calls.append((f"/predictions/{MODEL}", {"files": {"data": good, "explain": "gradcam"}}))  # neighbour
    responses = concurrent(torchserve_server, calls)
    expected = [(status, word) for _, status, word in cases.values()] + [(400, "JSON"), (400, "base64")]
    for (name, response), (status, word) in zip(zip(list(cases) + ["invalid json", "bad base64"], responses), expected):
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert word.lower() in error["message"].lower(), (name, error)
        assert error["status"] == status
    neighbour = responses[-1]
    assert neighbour.status_code == 200, neighbour.text
    assert neighbour.json()["predictions"][0]["label"] == label_of(CLEAR[5], samples)
    assert neighbour.json()["explanation"]["method"] == "gradcam"
    ping = requests.get(f"{torchserve_server.url}/ping", headers=torchserve_server.headers(), timeout=30)
    assert ping.json()["status"] == "Healthy"
    again = post(torchserve_server, f"/predictions/{MODEL}", data=good)
    assert again.status_code == 200


def test_prometheus_has_explanation_time_per_method(torchserve_server):
    post(torchserve_server, f"/predictions/{MODEL}", files={"data": photo(CLEAR[6]), "explain": "gradcam"})
    text = requests.get(f"{torchserve_server.metrics_url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("ExplanationTime{")]
    assert any('Method="gradcam"' in line and f'ModelName="{MODEL}"' in line for line in lines), lines
