"""The golden answers: a fixed set of requests whose answers must stay byte-identical (timings excepted).

Every door of the product is asked the same fixed questions — TorchServe (bundled classifier and
embedding archives, the bring-your-own archives of tests/byo_archives.py; plain, each method family,
compare, FAM, gallery, KServe v1 and v2 envelopes, JSON and multipart, headers, errors) and camserve's
KServe predictor — one request at a time (so each is its own batch), and each answer is reduced to a
canonical form: the status code, and the JSON body with its timing fields removed (``seconds``,
``batch_seconds``, the v2 outputs of those names) and every long string (PNG heatmaps, overlays,
base64 arrays) replaced by its SHA-256. Key order is kept, so a reordered answer is a change too.

The expected forms live in ``tests/golden/answers.json``. ``CAMSERVE_RECORD_GOLDEN=1`` rewrites that
file from the running code (do it only on purpose, before a refactor, and commit it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import requests

from conftest import photo_bytes as photo
from serverkit import REPO, start_kserve

pytestmark = pytest.mark.server
GOLDEN = Path(__file__).resolve().parent / "golden" / "answers.json"
RECORD = os.environ.get("CAMSERVE_RECORD_GOLDEN") == "1"

#: keys whose values are wall-clock measurements (never the same twice)
TIMING_KEYS = {"seconds", "batch_seconds", "comparison_seconds", "forward_seconds"}
#: strings longer than this are hashed (base64 PNGs and arrays); shorter ones are kept verbatim
LONG = 200
#: number lists longer than this (embeddings, layer-resolution arrays) are hashed too
LONG_LIST = 16

CLS, EMB = "effnet_lite0", "effnet_lite0_embed"
BIRD, TENCH, SHARK, TURTLE = ("n01833805_hummingbird.JPEG", "n01440764_tench.JPEG",
                              "n01484850_great_white_shark.JPEG", "n01665541_leatherback_turtle.JPEG")


def b64(name: str) -> str:
    return base64.b64encode(photo(name)).decode("ascii")


def canonical(value: Any) -> Any:
    """The answer without timings, long strings as their SHA-256."""
    if isinstance(value, dict):
        if value.get("name") in TIMING_KEYS and "datatype" in value:  # a v2 output tensor of timings
            return None
        out = {}
        for key, item in value.items():
            if key in TIMING_KEYS:
                continue
            item = canonical(item)
            if item is not None or value[key] is None:
                out[key] = item
        return out
    if isinstance(value, list):
        if len(value) > LONG_LIST and all(isinstance(v, (int, float)) for v in value):
            return "sha256:" + hashlib.sha256(json.dumps(value).encode()).hexdigest()
        items = [canonical(v) for v in value]
        return [v for v, raw in zip(items, value) if v is not None or raw is None]
    if isinstance(value, str) and value.startswith("{"):  # a JSON answer carried as text (v2 json_output)
        try:
            return {"json_text": canonical(json.loads(value))}
        except ValueError:
            pass
    if isinstance(value, str) and len(value) > LONG:
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return value


def answer_form(response: requests.Response) -> Dict[str, Any]:
    try:
        body = canonical(response.json())
    except ValueError:
        body = "sha256:" + hashlib.sha256(response.content).hexdigest()
    return {"status": response.status_code, "body": body}


def v2(inputs: List[Tuple[str, List[str]]], rid: str, **parameters) -> Dict[str, Any]:
    body: Dict[str, Any] = {"id": rid, "inputs": [{"name": name, "datatype": "BYTES", "shape": [len(data)],
                                                  "data": data} for name, data in inputs]}
    if parameters:
        body["parameters"] = parameters
    return body


def multipart(name: str, **fields: str) -> Dict[str, Any]:
    return {"files": {"data": photo(name), **{k: (None, v) for k, v in fields.items()}}}


def torchserve_requests() -> List[Tuple[str, str, Dict[str, Any]]]:
    """(id, path, requests.post keyword arguments) for TorchServe."""
    p = f"/predictions/{CLS}"
    e = f"/predictions/{EMB}"
    bird, tench = b64(BIRD), b64(TENCH)
    return [
        # -- the bundled classifier: plain, each method, options, envelopes
        ("cls-plain-multipart", p, multipart(BIRD)),
        ("cls-plain-raw", p, {"data": photo(TENCH)}),
        ("cls-plain-topk2", p, multipart(SHARK, topk="2")),
        ("cls-cam", p, multipart(BIRD, explain="cam")),
        ("cls-gradcam", p, multipart(BIRD, explain="gradcam")),
        ("cls-gradcampp-overlay", p, multipart(TURTLE, explain="gradcampp", layer="_blocks.14", overlay="1")),
        ("cls-layercam-json-top2", p, {"json": {"data": tench, "explain": "layercam", "layer": "_blocks.10",
                                               "target": "top2"}}),
        ("cls-cam-headers", p, {"data": photo(TURTLE), "headers": {"X-Camserve-Explain": "cam",
                                                                  "X-Camserve-Target": "34"}}),
        ("cls-explanations-route", f"/explanations/{CLS}", {"data": photo(SHARK)}),
        ("cls-shallowcam-t2", p, multipart(BIRD, explain="shallowcam", layer="_blocks.2", temperature="2")),
        ("cls-shallowcam-start-target", p, multipart(BIRD, explain="shallowcam", start="target")),
        ("cls-shallowcam-array", p, multipart(SHARK, explain="shallowcam", layer="_blocks.4", format="array")),
        ("cls-relevancecam", p, multipart(TURTLE, explain="relevancecam")),
        ("cls-layercam-array", p, multipart(BIRD, explain="layercam", format="array")),
        ("cls-gradcam-jet", p, multipart(TENCH, explain="gradcam", colormap="jet", overlay="1", alpha="0.4")),
        ("cls-compare", p, multipart(BIRD, compare="gradcam,layercam,shallowcam")),
        ("cls-compare-layer", p, multipart(TENCH, compare="layercam,shallowcam", layer="_blocks.10")),
        ("cls-captum-ig", p, multipart(BIRD, explain="captum.integrated_gradients", steps="8",
                                       internal_batch_size="4")),
        ("cls-captum-compare", p, multipart(TURTLE, compare="shallowcam,captum.integrated_gradients", steps="8")),
        ("cls-v1-predict", f"/v1/models/{CLS}:predict", {"json": {"instances": [{"data": bird}, tench]}}),
        ("cls-v1-explain-array", f"/v1/models/{CLS}:explain",
         {"json": {"instances": [{"data": bird, "explain": "gradcampp"}], "parameters": {"format": "array"}}}),
        ("cls-v2-infer-gradcam", f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird, tench])], "g-1", explain="gradcam", target="top2")}),
        ("cls-v2-explain-array", f"/v2/models/{CLS}/explain",
         {"json": v2([("image", [tench])], "g-2", format="array", layer="_blocks.10")}),
        ("cls-v2-json-output", f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird])], "g-3", json_output=True, explain="cam")}),
        ("cls-v2-outputs-header", f"/v2/models/{CLS}/infer",
         {"json": {**v2([("image", [tench])], "g-4"), "outputs": [{"name": "labels"}, {"name": "scores"}]},
          "headers": {"X-Camserve-Topk": "3"}}),
        ("cls-v2-compare", f"/v2/models/{CLS}/infer", {"json": v2([("image", [bird])], "g-5", compare="cam,gradcam")}),
        # -- classifier errors: each a clear 4xx
        ("cls-err-method", p, multipart(BIRD, explain="nosuchcam")),
        ("cls-err-layer", p, multipart(BIRD, explain="gradcam", layer="no.such.layer")),
        ("cls-err-target", p, multipart(BIRD, explain="gradcam", target="5000")),
        ("cls-err-option", p, multipart(BIRD, explain="gradcam", flavour="mint")),
        ("cls-err-temperature", p, multipart(BIRD, explain="shallowcam", temperature="0")),
        ("cls-err-image", p, {"files": {"data": b"not an image at all"}}),
        ("cls-err-json", p, {"data": b"{\"data\": ", "headers": {"Content-Type": "application/json"}}),
        ("cls-err-captum", p, multipart(BIRD, explain="captum.no_such_method")),
        ("cls-err-compare-option", p, multipart(BIRD, compare="gradcam,cam", temperature="4")),
        ("cls-err-colormap", p, multipart(BIRD, explain="gradcam", colormap="rainbowish")),
        # -- the bundled embedding model: FAM, pairs, gallery
        ("emb-plain", e, {"data": photo(BIRD)}),
        ("emb-pair-multipart", e, {"files": {"image": photo(BIRD), "reference": photo(TURTLE)}}),
        ("emb-pair-json", e, {"json": {"image": bird, "reference": tench}}),
        ("emb-gallery", e, {"files": {"image": photo(TENCH), "gallery": (None, "3")}}),
        ("emb-gallery-json", e, {"json": {"image": tench, "gallery": True, "topk": 5, "embedding": False}}),
        ("emb-similarity-dot", e, {"files": {"image": photo(BIRD), "reference": photo(SHARK),
                                             "similarity": (None, "dot")}}),
        ("emb-v2-pair", f"/v2/models/{EMB}/infer", {"json": v2([("image", [bird]), ("reference", [tench])], "g-6")}),
        ("emb-v1-pair", f"/v1/models/{EMB}:predict", {"json": {"instances": [{"image": bird, "reference": tench}]}}),
        ("emb-err-ref-length", e, {"json": {"image": bird, "reference_embedding": [0.1, 0.2]}}),
        ("emb-err-gallery", e, {"files": {"image": photo(BIRD), "gallery": (None, "500")}}),
        ("emb-err-both", e, {"json": {"image": bird, "reference": tench, "reference_embedding": [1.0]}}),
        # -- bring-your-own archives
        ("byo-tv-plain", "/predictions/tv_resnet18", multipart(BIRD)),
        ("byo-tv-default", "/explanations/tv_resnet18", {"data": photo(BIRD)}),
        ("byo-tv-gradcam-stage", "/predictions/tv_resnet18", multipart(TENCH, explain="gradcam", layer="stage3")),
        ("byo-tv-err-layer", "/predictions/tv_resnet18", multipart(BIRD, explain="gradcam", layer="layer9")),
        ("byo-vit-gradcam", "/predictions/timm_vit", multipart(BIRD, explain="gradcam")),
        ("byo-vit-layercam", "/predictions/timm_vit", multipart(BIRD, explain="layercam")),
        ("byo-vit-err-shallowcam", "/predictions/timm_vit", multipart(BIRD, explain="shallowcam")),
        ("byo-cifar-plain", "/predictions/cifar_resnet20", multipart(TURTLE, topk="3")),
        ("byo-cifar-default", "/explanations/cifar_resnet20", {"data": photo(TURTLE)}),
        ("byo-cifar-compare", "/predictions/cifar_resnet20", multipart(TURTLE, compare="layercam,shallowcam")),
        ("byo-cifar-v1-explain", "/v1/models/cifar_resnet20:explain", {"json": {"instances": [{"data": bird}]}}),
        # (tv_resnet18_embed is left out: its archive has no weights, so each build draws new random ones)
        ("byo-proj-pair", "/predictions/tv_resnet18_proj", {"files": {"image": photo(BIRD),
                                                                        "reference": photo(TENCH)}}),
    ]


def kserve_requests() -> List[Tuple[str, str, str, Dict[str, Any]]]:
    """(id, server, path, requests.post keyword arguments) for camserve's KServe predictor."""
    bird, tench = b64(BIRD), b64(TENCH)
    return [
        ("ks-v1-predict", CLS, f"/v1/models/{CLS}:predict", {"json": {"instances": [{"data": bird}]}}),
        ("ks-v1-explain", CLS, f"/v1/models/{CLS}:explain", {"json": {"instances": [{"data": tench}]}}),
        ("ks-v1-gradcam-top2", CLS, f"/v1/models/{CLS}:predict",
         {"json": {"instances": [{"data": bird, "explain": "gradcam", "topk": 2}]}}),
        ("ks-v2-infer", CLS, f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird, tench])], "k-1", explain="layercam", colormap="jet")}),
        ("ks-v2-explain", CLS, f"/v2/models/{CLS}/explain", {"json": v2([("image", [tench])], "k-2")}),
        ("ks-raw", CLS, f"/v1/models/{CLS}:predict", {"data": photo(SHARK), "headers": {"Content-Type": "image/jpeg"}}),
        ("ks-err-layer", CLS, f"/v1/models/{CLS}:predict",
         {"json": {"instances": [{"data": bird, "explain": "gradcam", "layer": "no.such.layer"}]}}),
        ("ks-err-model", CLS, "/v1/models/nope:predict", {"json": {"instances": [{"data": bird}]}}),
        ("ks-emb-pair", EMB, f"/v1/models/{EMB}:predict", {"json": {"instances": [{"image": bird, "reference": tench}]}}),
        ("ks-emb-v2-gallery", EMB, f"/v2/models/{EMB}/infer", {"json": v2([("image", [tench])], "k-3", gallery=3)}),
    ]


@pytest.fixture(scope="module")
def kserve_servers(tmp_path_factory):
    """camserve's KServe predictor for the two bundled archives, as built."""
    work = tmp_path_factory.mktemp("golden-kserve")
    from serverkit import KServe

    started = [KServe(name, ["--mar", str(REPO / "model_store" / f"{name}.mar")], work) for name in (CLS, EMB)]
    try:
        for server in started:
            server.wait_ready()
        yield {s.name: s for s in started}
    finally:
        for server in started:
            server.stop()


def test_golden_answers(torchserve_server, kserve_servers):
    answers: Dict[str, Any] = {}
    for rid, path, kwargs in torchserve_requests():
        kwargs = dict(kwargs)
        headers = {**torchserve_server.headers(), **kwargs.pop("headers", {})}
        response = requests.post(f"{torchserve_server.url}{path}", headers=headers, timeout=300, **kwargs)
        answers[rid] = {"door": "torchserve", "path": path, **answer_form(response)}
    for rid, name, path, kwargs in kserve_requests():
        response = kserve_servers[name].post(path, **kwargs)
        answers[rid] = {"door": "kserve", "path": path, **answer_form(response)}
    assert len(answers) >= 60
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert list(expected) == list(answers), "the fixed request set changed: record it again on purpose"
    changed = [rid for rid in answers if answers[rid] != expected[rid]]
    assert not changed, "answers changed:\n" + "\n".join(
        f"{rid}:\n  was {json.dumps(expected[rid])[:600]}\n  now {json.dumps(answers[rid])[:600]}" for rid in changed)
