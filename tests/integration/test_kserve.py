"""camserve as a KServe predictor, over real HTTP: ``camserve kserve`` runs KServe's own model server
on loopback (a subprocess, no mocks) with the bundled EfficientNet-Lite0 (``--model-config``) and with
a bring-your-own spec (the pretrained CIFAR-10 ResNet-20 as an eager model, from the same flags as
``camserve archive``). v1 ``:predict`` / ``:explain``, v2 ``/infer``, plain and explained, concurrent
requests with mixed options answered from batched forwards (counted on ``/metrics``), bad inputs →
4xx with the handlers' messages and the server healthy after; the same answer bytes as TorchServe;
the layout ``camserve kserve-layout`` writes for KServe's TorchServe runtime, served by a real
TorchServe; the deployment files checked against their schema and the running server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest
import requests
import yaml

from byo_archives import CIFAR_CLASSES, RESNET20
from conftest import decode_png, photo_bytes as photo
from embedkit import TASKS, check_stages, instances
from serverkit import REPO, VENV_BIN, KServe, free_port

pytestmark = pytest.mark.server
MODEL = "effnet_lite0"
BYO = "cifar20"
EMBED = "effnet_lite0_embed"
TENCH = "n01440764_tench.JPEG"
PHOTOS = ["n01440764_tench.JPEG", "n01484850_great_white_shark.JPEG", "n01494475_hammerhead.JPEG",
          "n01498041_stingray.JPEG"]
READY_S = 300
#: the test server's batching window (the model-config says 100 ms; wider here so that concurrent
#: requests from a busy 2-core machine reliably meet in one batch)
DELAY_MS = 400


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def effnet_config(work) -> Path:
    """configs/effnet_lite0.yaml naming its calibration card (``handler.calibration``, an absolute path
    here), as archive.sh's ``--calibrate`` ships it in the .mar: both doors answer with its scores."""
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    config["handler"]["calibration"] = str(REPO / "benchmarks" / "results" / "calibration_effnet_lite0_200.json")
    path = work / "effnet_lite0.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both predictors, started together (their model loads overlap), stopped at the end."""
    work = tmp_path_factory.mktemp("kserve")
    (work / "cifar10.json").write_text(json.dumps({str(i): [f"c{i}", n] for i, n in enumerate(CIFAR_CLASSES)}))
    if not (REPO / "model_store" / f"{EMBED}.mar").exists():
        subprocess.run([str(REPO / "archive.sh")], check=True, cwd=REPO, capture_output=True)
    started = [
        KServe(MODEL, ["--model-config", str(effnet_config(work)), "--max-batch-delay-ms", str(DELAY_MS),
                       "--max-request-mb", "4"], work),
        KServe(BYO, ["--source", "eager", "--model-file", "examples/cifar_resnet/model.py", "--class-name",
                     "CifarResNet", "--kwargs", '{"depth": 20}', "--weights", str(RESNET20), "--preprocess",
                     "crop=32", "--labels", str(work / "cifar10.json"), "--max-batch-delay-ms", str(DELAY_MS)],
               work),
        KServe(EMBED, ["--mar", str(REPO / "model_store" / f"{EMBED}.mar")], work),  # a built archive as it is
    ]
    try:
        for server in started:
            server.wait_ready()
        yield {s.name: s for s in started}
    finally:
        codes = [s.stop() for s in started]
        assert all(s.process.poll() is not None for s in started), "a predictor outlived its tests"
        del codes


@pytest.fixture(scope="module")
def effnet(servers) -> KServe:
    return servers[MODEL]


@pytest.fixture(scope="module")
def cifar(servers) -> KServe:
    return servers[BYO]


@pytest.fixture(scope="module")
def embed(servers) -> KServe:
    return servers[EMBED]


def v1(image: bytes, **options) -> Dict:
    return {"instances": [{"data": b64(image), **options}]}


def v2(images: List[bytes], **parameters) -> Dict:
    body = {"id": "req-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                       "data": [b64(i) for i in images]}]}
    if parameters:
        body["parameters"] = parameters
    return body


def outputs(body: Dict) -> Dict[str, Dict]:
    return {o["name"]: o for o in body["outputs"]}


# -- health, metadata, metrics -------------------------------------------------------------------
def test_health_readiness_metadata_and_metrics(effnet):
    assert requests.get(f"{effnet.url}/", timeout=10).json() == {"status": "alive"}
    assert requests.get(f"{effnet.url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{effnet.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{effnet.url}/v1/models/{MODEL}", timeout=10).json() == {"name": MODEL, "ready": True}
    assert requests.get(f"{effnet.url}/v2/models/{MODEL}/ready", timeout=10).json()["ready"] is True
    meta = requests.get(f"{effnet.url}/v2/models/{MODEL}", timeout=10).json()
    assert meta["name"] == MODEL and meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert requests.get(f"{effnet.url}/v2/models/nope/ready", timeout=10).status_code == 404
    text = requests.get(f"{effnet.url}/metrics", timeout=10).text
    for series in ("camserve_model_forwards_total", "camserve_batches_total", "camserve_queued_requests",
                   "request_predict_seconds"):
        assert series in text, series


# -- the protocols -----------------------------------------------------------------------------
def test_v1_and_v2_plain_and_explained(effnet, samples):
    label = next(r["name"] for r in samples if r["file"] == TENCH)
    plain = effnet.post(f"/v1/models/{MODEL}:predict", json=v1(photo(TENCH)))
    assert plain.status_code == 200, plain.text
    assert plain.headers["content-type"].startswith("application/json")
    answer = plain.json()["predictions"][0]
    assert answer["predictions"][0]["label"] == label and "explanation" not in answer

    explained = effnet.post(f"/v1/models/{MODEL}:explain", json=v1(photo(TENCH)))
    assert explained.status_code == 200, explained.text
    e = explained.json()["explanations"][0]["explanation"]
    assert e["method"] == "layercam" and e["layer"] == "_blocks.0"  # the model-config's (calibrated) defaults
    assert set(e["calibration"]) == {"overall", "vs_layercam", "sem", "n"}  # its card, read beside the config
    assert decode_png(e["heatmap"]).size == (224, 224)

    by_option = effnet.post(f"/v1/models/{MODEL}:predict", json=v1(photo(TENCH), explain="gradcam", topk=2))
    answer = by_option.json()["predictions"][0]
    assert len(answer["predictions"]) == 2 and answer["explanation"]["method"] == "gradcam"

    infer = effnet.post(f"/v2/models/{MODEL}/infer", json=v2([photo(TENCH), photo(PHOTOS[1])], topk=3))
    assert infer.status_code == 200, infer.text
    body = infer.json()
    assert body["model_name"] == MODEL and body["id"] == "req-1"
    out = outputs(body)
    assert out["labels"]["shape"] == [2, 3] and out["labels"]["data"][0] == label
    assert "heatmap" not in out

    infer_x = effnet.post(f"/v2/models/{MODEL}/infer", json=v2([photo(TENCH)], explain="gradcam", colormap="jet"))
    out = outputs(infer_x.json())
    assert out["method"]["data"] == ["gradcam"]
    assert decode_png(out["heatmap"]["data"][0]).size == (224, 224)
    assert decode_png(out["heatmap_color"]["data"][0]).mode == "RGB"

    v2_explain = effnet.post(f"/v2/models/{MODEL}/explain", json=v2([photo(TENCH)]))
    assert outputs(v2_explain.json())["method"]["data"] == ["layercam"]

    raw = effnet.post(f"/v1/models/{MODEL}:predict", data=photo(TENCH), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] == label

    headers = {"X-Camserve-Explain": "layercam"}  # the handlers' header options work here too
    by_header = effnet.post(f"/v1/models/{MODEL}:predict", json=v1(photo(TENCH)), headers=headers)
    assert by_header.json()["predictions"][0]["explanation"]["method"] == "layercam"


def concurrent(server: KServe, calls):
    """Send every ``(path, json)`` at once (one thread each); responses in call order."""
    def run(call):
        path, body = call
        return server.post(path, json=body)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_mixed_options_share_batched_forwards(effnet):
    cases = [  # (path, body, check(answer json))
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[0]), topk=1),
         lambda a: len(a["predictions"][0]["predictions"]) == 1 and "explanation" not in a["predictions"][0]),
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[1]), explain="gradcam", topk=3),
         lambda a: a["predictions"][0]["explanation"]["method"] == "gradcam" and len(a["predictions"][0]["predictions"]) == 3),
        (f"/v1/models/{MODEL}:explain", v1(photo(PHOTOS[2])),
         lambda a: a["explanations"][0]["explanation"]["method"] == "layercam"),
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[3]), explain="gradcam++", format="array"),
         lambda a: a["predictions"][0]["explanation"]["format"] == "array"
         and len(a["predictions"][0]["explanation"]["array"]) == 7),
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[0]), explain="layercam", target="top2"),
         lambda a: len(a["predictions"][0]["explanation"]["targets"]) == 2),
        (f"/v2/models/{MODEL}/infer", v2([photo(PHOTOS[1])], explain="gradcam", overlay=1),
         lambda a: "overlay" in outputs(a) and outputs(a)["method"]["data"] == ["gradcam"]),
        (f"/v2/models/{MODEL}/infer", v2([photo(PHOTOS[2])], topk=4),
         lambda a: outputs(a)["scores"]["shape"] == [1, 4] and "heatmap" not in outputs(a)),
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[3]), explain="nosuchmethod"),  # a bad one in the batch
         None),
    ]
    forwards = effnet.metric("camserve_model_forwards_total", model=MODEL)
    batches = effnet.metric("camserve_batches_total", model=MODEL)
    gradcam = effnet.metric("camserve_explanation_seconds_count", model=MODEL, method="gradcam")
    responses = concurrent(effnet, [(path, body) for path, body, _ in cases])
    for (path, body, check), response in zip(cases, responses):
        if check is None:
            assert response.status_code == 400 and "nosuchmethod" in response.json()["error"]["message"]
            continue
        assert response.status_code == 200, response.text
        assert check(response.json()), (path, response.text[:300])
    used_forwards = effnet.metric("camserve_model_forwards_total", model=MODEL) - forwards
    used_batches = effnet.metric("camserve_batches_total", model=MODEL) - batches
    good = len(cases) - 1
    assert 1 <= used_forwards < good, f"{good} good requests took {used_forwards} forwards ({used_batches} batches)"
    sizes = [(r.json().get("predictions") or r.json().get("explanations"))[0]["batch_size"] for r in responses[:5]]
    assert max(sizes) > 1, sizes
    # explanation time per method on /metrics: two gradcam rows (v1 + v2) more than before
    assert effnet.metric("camserve_explanation_seconds_count", model=MODEL, method="gradcam") > gradcam


def test_bad_inputs_are_4xx_with_a_message_and_the_server_stays_healthy(effnet):
    deep = "[" * 200 + "]" * 200
    cases = [
        (f"/v1/models/{MODEL}:predict", b'{"instances": [', "application/json", 400, "InvalidJSONError", "invalid JSON"),
        (f"/v1/models/{MODEL}:predict", json.dumps({"instances": [{"data": "not base64!"}]}).encode(),
         "application/json", 400, "InvalidBase64Error", "base64"),
        (f"/v1/models/{MODEL}:predict", json.dumps(v1(photo(TENCH), topk=999)).encode(), "application/json", 400,
         "InvalidRequestOptionError", "topk"),
        (f"/v1/models/{MODEL}:predict", json.dumps({"instances": []}).encode(), "application/json", 400,
         "MissingInputError", "instances"),
        (f"/v1/models/{MODEL}:predict", f'{{"instances": {deep}}}'.encode(), "application/json", 400,
         "InvalidJSONError", "levels"),
        (f"/v1/models/{MODEL}:predict", b"\x89PNG not really an image", "image/png", 400, "InvalidImageError", "image"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1],
                                                              "data": [1.0]}]}).encode(),
         "application/json", 400, "InvalidRequestOptionError", "BYTES"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": []}).encode(), "application/json", 400,
         "MissingInputError", "inputs"),
        (f"/v2/models/{MODEL}/infer", json.dumps(v2([photo(TENCH)], json_output="maybe")).encode(),
         "application/json", 400, "InvalidRequestOptionError", "json_output"),
        (f"/v1/models/{MODEL}:predict", b"{" + b" " * (5 * 1024 * 1024) + b"}", "application/json", 413,
         "RequestTooLargeError", "at most"),
    ]
    for path, data, content_type, status, kind, words in cases:
        response = effnet.post(path, data=data, headers={"Content-Type": content_type})
        assert response.status_code == status, (path, kind, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["status"] == status and error["type"] == kind and words in error["message"], error
    missing = effnet.post("/v1/models/nope:predict", json=v1(photo(TENCH)))
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert requests.get(f"{effnet.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{effnet.url}/v2/models/{MODEL}/ready", timeout=10).status_code == 200
    after = effnet.post(f"/v1/models/{MODEL}:predict", json=v1(photo(TENCH), explain="gradcam"))
    assert after.status_code == 200 and after.json()["predictions"][0]["explanation"]["method"] == "gradcam"
    assert effnet.process.poll() is None


# -- bring your own model ------------------------------------------------------------------------
def test_bring_your_own_spec_cifar_resnet20(cifar):
    plain = cifar.post(f"/v1/models/{BYO}:predict", json=v1(photo(TENCH), topk=10))
    assert plain.status_code == 200, plain.text
    predictions = plain.json()["predictions"][0]["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(CIFAR_CLASSES)  # the spec's label map

    calls = [(f"/v2/models/{BYO}/infer", v2([photo(PHOTOS[i])], explain=method))
             for i, method in enumerate(["gradcam", "layercam", "shallowcam", "gradcam"])]
    forwards = cifar.metric("camserve_model_forwards_total", model=BYO)
    responses = concurrent(cifar, calls)
    for (path, body), response in zip(calls, responses):
        assert response.status_code == 200, response.text
        out = outputs(response.json())
        assert out["method"]["data"] == [body["parameters"]["explain"]]
        assert decode_png(out["heatmap"]["data"][0]).size == (32, 32)  # --preprocess crop=32
        assert set(out["labels"]["data"]) <= set(CIFAR_CLASSES)
    assert cifar.metric("camserve_model_forwards_total", model=BYO) - forwards < len(calls)

    explained = cifar.post(f"/v1/models/{BYO}:explain", json=v1(photo(TENCH)))
    assert explained.json()["explanations"][0]["explanation"]["method"] == "shallowcam"
    bad = cifar.post(f"/v1/models/{BYO}:predict", json=v1(photo(TENCH), layer="no.such.layer", explain="gradcam"))
    assert bad.status_code == 400 and "no.such.layer" in bad.json()["error"]["message"]


def test_embedding_archive_fam_reference_and_gallery(embed):
    pair = embed.post(f"/v1/models/{EMBED}:predict",
                      json={"instances": [{"image": b64(photo(TENCH)), "reference": b64(photo(PHOTOS[1]))}]})
    assert pair.status_code == 200, pair.text
    answer = pair.json()["predictions"][0]
    assert answer["method"] == "fam-relevance" and answer["reference"] == "image" and answer["dim"] == 1280
    assert decode_png(answer["query_map"]).size == decode_png(answer["reference_map"]).size == (224, 224)
    gallery = embed.post(f"/v2/models/{EMBED}/infer", json={**v2([photo(TENCH)]),
                                                            "parameters": {"gallery": True, "embedding": False}})
    assert gallery.status_code == 200, gallery.text
    out = outputs(gallery.json())
    assert out["match_index"]["shape"] == [1, 3] and "embedding" not in out  # the archive's gallery, top 3
    bad = embed.post(f"/v1/models/{EMBED}:predict",
                     json={"instances": [{"image": b64(photo(TENCH)), "reference_embedding": [0.1, 0.2]}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"]
    # FAM below the last map (layer=): the relevance route, on the predictor as on TorchServe
    shallow = embed.post(f"/v1/models/{EMBED}:predict", json={"instances": [
        {"image": b64(photo(TENCH)), "reference": b64(photo(PHOTOS[1])), "layer": "stage3"}]})
    assert shallow.status_code == 200, shallow.text
    answer = shallow.json()["predictions"][0]
    assert (answer["route"], answer["layer"], answer["runtime"]) == ("relevance", "_blocks.4", "eager")
    assert answer["passes"]["relevance"] == 1 and decode_png(answer["query_map"]).size == (224, 224)
    refused = embed.post(f"/v1/models/{EMBED}:predict", json={"instances": [
        {"image": b64(photo(TENCH)), "reference": b64(photo(PHOTOS[1])), "layer": "nope"}]})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "UnknownLayerError"
    # few-shot prototypes over the archive's gallery (one shot per class): the tench wins its own class
    fewshot = embed.post(f"/v1/models/{EMBED}:predict", json={"instances": [
        {"image": b64(photo(TENCH)), "prototypes": True, "embedding": False}]})
    assert fewshot.status_code == 200, fewshot.text
    answer = fewshot.json()["predictions"][0]
    assert answer["prototype"]["label"] == "tench" and answer["matches"][0]["reference_map"]
    # pairs, gallery matches and prototypes at every stage (the relevance route below the last map)
    for task in TASKS:
        stages = embed.post(f"/v1/models/{EMBED}:predict", json={"instances": instances(EMBED, task)})
        assert stages.status_code == 200, stages.text[:500]
        check_stages(EMBED, task, stages.json()["predictions"])
    # the FAM family's weights and maps at their own resolution, as v2 FP32 tensors
    arrays = embed.post(f"/v2/models/{EMBED}/infer", json={
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(photo(TENCH))]},
                   {"name": "reference", "datatype": "BYTES", "shape": [1], "data": [b64(photo(PHOTOS[1]))]}],
        "parameters": {"weights": "sfam", "format": "array", "embedding": False}})
    assert arrays.status_code == 200, arrays.text
    out = outputs(arrays.json())
    assert out["weights"]["data"] == ["sfam"] and out["query_map_array"]["datatype"] == "FP32"
    assert out["query_map_array"]["shape"][-2:] == [56, 56] and "query_map" not in out  # the pair default: stage2


# -- the same answer as TorchServe ---------------------------------------------------------------
VOLATILE = {"seconds", "batch_seconds"}


def stable(value):
    """An answer without its timings (``seconds``, ``batch_seconds``; v2: those output tensors)."""
    if isinstance(value, dict):
        if value.get("name") in VOLATILE and "datatype" in value:
            return None
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [s for s in (stable(v) for v in value) if s is not None]
    return value


def test_same_topk_and_heatmap_bytes_as_torchserve(torchserve_server, effnet, embed):
    requests_to_send = [
        (f"/v1/models/{MODEL}:explain", v1(photo(TENCH))),
        (f"/v1/models/{MODEL}:predict", v1(photo(PHOTOS[1]), explain="gradcam", topk=3, colormap="inferno")),
        (f"/v2/models/{MODEL}/infer", v2([photo(PHOTOS[2])], explain="layercam", overlay=1)),
    ]
    for path, body in requests_to_send:  # one at a time: a batch of one on both servers
        ts = requests.post(f"{torchserve_server.url}{path}", json=body, headers=torchserve_server.headers(),
                           timeout=300)
        ks = effnet.post(path, json=body)
        assert ts.status_code == ks.status_code == 200, (ts.text[:300], ks.text[:300])
        ts_body, ks_body = ts.json(), ks.json()
        if "outputs" in ts_body:
            assert outputs(ts_body)["heatmap"]["data"] == outputs(ks_body)["heatmap"]["data"]
            assert outputs(ts_body)["labels"] == outputs(ks_body)["labels"]
        else:
            key = "explanations" if path.endswith(":explain") else "predictions"
            t, k = ts_body[key][0], ks_body[key][0]
            assert t["predictions"] == k["predictions"]
            assert t["explanation"]["heatmap"] == k["explanation"]["heatmap"]  # the same PNG bytes
        assert stable(ts_body) == stable(ks_body)  # and everything else but the timings
    pair = {"instances": [{"image": b64(photo(TENCH)), "reference": b64(photo(PHOTOS[3]))}]}
    ts = requests.post(f"{torchserve_server.url}/v1/models/{EMBED}:predict", json=pair,
                       headers=torchserve_server.headers(), timeout=300)
    ks = embed.post(f"/v1/models/{EMBED}:predict", json=pair)
    assert ts.status_code == ks.status_code == 200
    assert stable(ts.json()) == stable(ks.json())  # embedding, similarity, FAM maps
    bad = json.dumps({"instances": [{"data": "not base64!"}]})
    ts = requests.post(f"{torchserve_server.url}/v1/models/{MODEL}:predict", data=bad,
                       headers={**torchserve_server.headers(), "Content-Type": "application/json"}, timeout=60)
    ks = effnet.post(f"/v1/models/{MODEL}:predict", data=bad, headers={"Content-Type": "application/json"})
    assert ts.status_code == ks.status_code == 400 and ts.json() == ks.json()  # the same error


# -- KServe's TorchServe runtime: the generated layout, served by a real TorchServe ---------------
def test_kserve_layout_is_served_by_a_real_torchserve(tmp_path, effnet):
    subprocess.run([str(REPO / "archive.sh")], check=True, cwd=REPO, capture_output=True)
    out = tmp_path / "layout"
    done = subprocess.run([str(VENV_BIN / "camserve"), "kserve-layout", "--mar", str(REPO / "model_store" / "effnet_lite0.mar"),
                           "--output", str(out), "--storage-uri", "s3://bucket/camserve"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model-store" / "effnet_lite0.mar").read_bytes() == (REPO / "model_store" / "effnet_lite0.mar").read_bytes()
    props = dict(line.split("=", 1) for line in (out / "config" / "config.properties").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:8085"  # where KServe's wrapper forwards
    assert props["model_store"] == "/mnt/models/model-store" and props["enable_envvars_config"] == "false"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["models"]["effnet_lite0"]["1.0"]["marName"] == "effnet_lite0.mar"
    assert snapshot["models"]["effnet_lite0"]["1.0"]["batchSize"] == 8
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    check_inference_service(isvc)
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "pytorch"
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/camserve"

    # the same file, with loopback ports of this machine and this folder's model store
    ports = {"inference": free_port(), "management": free_port(), "metrics": free_port(),
             "grpc_inference": free_port(), "grpc_management": free_port()}
    local = {"inference_address": f"http://127.0.0.1:{ports['inference']}",
             "management_address": f"http://127.0.0.1:{ports['management']}",
             "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
             "grpc_inference_port": str(ports["grpc_inference"]), "grpc_management_port": str(ports["grpc_management"]),
             "model_store": str(out / "model-store")}
    lines = [f"{line.split('=', 1)[0]}={local[line.split('=', 1)[0]]}" if line.split("=", 1)[0] in local else line
             for line in (out / "config" / "config.properties").read_text().splitlines()]
    work = tmp_path / "ts"
    (work / "tmp").mkdir(parents=True)
    (work / "config.properties").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, TMPDIR=str(work / "tmp"), LOG_LOCATION=str(work / "logs"),
               METRICS_LOCATION=str(work / "logs"), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    log = open(work / "stdout.log", "wb")
    process = subprocess.Popen([str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config",
                                str(work / "config.properties")], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = local["inference_address"]
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert process.poll() is None, (work / "stdout.log").read_text()[-3000:]
            try:
                info = requests.get(f"{local['management_address']}/models/effnet_lite0", timeout=5).json()
                if info[0]["workers"] and all(w["status"] == "READY" for w in info[0]["workers"]):
                    break
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            assert time.monotonic() < deadline, "TorchServe did not load the layout's model"
            time.sleep(2)
        # what KServe's TorchServe wrapper sends: the v1 body, JSON with a charset, no token
        headers = {"Content-Type": "application/json; charset=UTF-8"}
        for path, body in [(f"/v1/models/{MODEL}:predict", v1(photo(TENCH), explain="gradcam")),
                           (f"/v1/models/{MODEL}:explain", v1(photo(TENCH)))]:
            ts = requests.post(f"{url}{path}", data=json.dumps(body), headers=headers, timeout=300)
            ks = effnet.post(path, data=json.dumps(body), headers=headers)
            assert ts.status_code == ks.status_code == 200, ts.text[:300]
            assert stable(ts.json()) == stable(ks.json())
        assert "ts_inference_requests_total" in requests.get(f"{local['metrics_address']}/metrics", timeout=30).text
    finally:
        subprocess.run([str(VENV_BIN / "torchserve"), "--stop", "--foreground"], cwd=work, env=env,
                       capture_output=True, timeout=120)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
    assert process.poll() is not None


# -- the deployment files ------------------------------------------------------------------------
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_inference_service(isvc: Dict) -> None:
    """The fields KServe's v1beta1 InferenceService schema requires, and the values they may take."""
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert DNS_1123.match(isvc["metadata"]["name"]) and len(isvc["metadata"]["name"]) <= 63
    predictor = isvc["spec"]["predictor"]
    assert isinstance(predictor["minReplicas"], int) and isinstance(predictor["maxReplicas"], int)
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"] and predictor["maxReplicas"] >= 1
    assert predictor["scaleMetric"] in ("concurrency", "rps", "cpu", "memory")
    assert isinstance(predictor["scaleTarget"], int) and predictor["scaleTarget"] > 0
    containers = predictor.get("containers") or [predictor["model"]]
    for container in containers:
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert int(container["resources"]["requests"].get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(limits["nvidia.com/gpu"])
    annotations = isvc["metadata"].get("annotations") or {}
    assert all(isinstance(v, str) for v in annotations.values()), "annotation values must be strings"


def kserve_parser():
    import argparse

    from camserve.cli import kserve as cli

    parser = argparse.ArgumentParser(prog="camserve kserve")
    cli.add_arguments(parser)
    return parser


def test_predictor_inference_service_and_dockerfile(effnet):
    isvc = yaml.safe_load((REPO / "deploy" / "inferenceservice.yaml").read_text())
    check_inference_service(isvc)
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container" and container["image"]
    args = kserve_parser().parse_args(container["args"])
    assert args.host == "0.0.0.0" and args.http_port == container["ports"][0]["containerPort"]
    # the image's paths are the repository's (Dockerfile: WORKDIR /opt/camserve, COPY configs)
    assert (REPO / args.model_config.replace("/opt/camserve/", "")).is_file()
    # the probes and the scrape path are routes the running predictor answers (with this model name)
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"].replace(args.name, MODEL)
        assert container[probe]["httpGet"]["port"] == args.http_port
        assert requests.get(f"{effnet.url}{path}", timeout=10).status_code == 200, path
    assert requests.get(f"{effnet.url}{isvc['metadata']['annotations']['prometheus.kserve.io/path']}",
                        timeout=10).status_code == 200

    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert entry == ["camserve", "kserve"]
    image_args = kserve_parser().parse_args(cmd)
    assert (REPO / image_args.model_config.replace("/opt/camserve/", "")).is_file()
    assert image_args.host == "0.0.0.0"
    extras = re.search(r'pip install -c requirements.txt "\.\[([^\]]*)\]"', dockerfile).group(1).split(",")
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared) and "kserve" in extras


# -- the micro-batcher on its own (plain asyncio, no server) -------------------------------------
def test_micro_batcher_closes_batches_at_size_or_delay():
    import asyncio

    from camserve.kserve.batcher import MicroBatcher

    sizes: List[int] = []

    def run(payloads):
        sizes.append(len(payloads))
        if "boom" in payloads:
            raise ValueError("boom")
        return [p * 2 for p in payloads]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=4, max_delay_s=0.2)
        try:
            full = await asyncio.gather(*[batcher.submit(i) for i in range(6)])  # 4 at once, then 2 after the delay
            t = time.monotonic()
            alone = await batcher.submit(10)  # waits out the delay alone
            waited = time.monotonic() - t
            failing = await asyncio.gather(batcher.submit("boom"), batcher.submit("x"), return_exceptions=True)
            return full, alone, waited, failing, batcher.batches, batcher.alive
        finally:
            batcher.close()

    full, alone, waited, failing, batches, alive = asyncio.run(scenario())
    assert full == [0, 2, 4, 6, 8, 10] and sizes[:2] == [4, 2]
    assert alone == 20 and sizes[2] == 1 and 0.15 <= waited < 5.0
    assert all(isinstance(f, ValueError) for f in failing) and sizes[3] == 2  # run raised: its batch gets the error
    assert batches == 3 and alive  # the failing batch is not counted; the batcher lives on
