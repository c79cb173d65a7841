"""Captum baselines over HTTP: a real TorchServe (tests/serverkit.py), real photographs, token auth.

TorchServe 0.12 drops the query string of ``/predictions/{m}``, so options travel as multipart fields
(or ``X-Camserve-<Option>`` headers). IG runs with few steps to stay quick on 2 CPU cores.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests

from conftest import decode_png as png, label_of, photo_bytes as photo

MODEL = "effnet_lite0"
STEPS = 8
HUMMINGBIRD = "n01833805_hummingbird.JPEG"  # clear photo: the pretrained top-1 is right with p > 0.9
BULBUL = "n01560419_bulbul.JPEG"




def post(server, path=f"/predictions/{MODEL}", **kwargs):
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    return requests.post(f"{server.url}{path}", headers=headers, timeout=300, **kwargs)


def test_compare_options_split_between_methods():
    """No server: compare= builds one spec per method, each with its own layer and the knobs it takes."""
    from camserve.serving.errors import InvalidRequestOptionError
    from camserve.serving.options import parse_options
    from camserve.serving.settings import HandlerSettings

    settings = HandlerSettings(default_layer="_conv_head", method_layers={"shallowcam": "_blocks.4"})
    options = parse_options({"compare": b"shallowcam, captum.integrated_gradients", "steps": b"8",
                             "spatial": b"relevance", "target": b"94"}, settings, explain_route=True)
    assert options.method is None and options.spec() is None
    assert [(s.method, s.layer, s.target, dict(s.options)) for s in options.compare] == [
        ("shallowcam", "_blocks.4", "94", {"spatial": "relevance"}),
        ("captum.integrated_gradients", "_conv_head", "94", {"steps": "8"})]
    with pytest.raises(InvalidRequestOptionError, match="exclude each other"):
        parse_options({"compare": "gradcam,cam", "explain": "gradcam"}, settings, False)


def test_captum_caps_from_model_config():
    from camserve.serving.classifier import captum_limits

    assert captum_limits({"max_steps": 64}).max_steps == 64
    for bad in ({"max_step": 64}, {"max_steps": 0}):
        with pytest.raises(ValueError, match="handler.captum"):
            captum_limits(bad)


@pytest.mark.server
def test_integrated_gradients_over_http(torchserve_server, samples):
    response = post(torchserve_server, files={"data": photo(HUMMINGBIRD), "explain": "captum.integrated_gradients",
                                              "steps": str(STEPS), "internal_batch_size": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["label"] == label_of(HUMMINGBIRD, samples)
    explanation = body["explanation"]
    assert explanation["method"] == "captum.integrated_gradients" and explanation["layer"] == "input"
    assert explanation["target"] == body["predictions"][0]["index"]
    assert explanation["options"]["steps"] == STEPS and explanation["options"]["internal_batch_size"] == 4
    heatmap = png(explanation["heatmap"])
    assert heatmap.size == (224, 224) and heatmap.mode == "L"
    assert np.asarray(heatmap).astype(float).std() > 5
    # Captum's own cost, counted: 8 steps in chunks of 4 rows = 2 forwards + 2 backwards, 8 evaluations
    assert explanation["passes"]["forward"] == 2 and explanation["passes"]["backward"] == 2
    assert explanation["passes"]["evaluations"] == STEPS
    assert explanation["seconds"] > 0


@pytest.mark.server
def test_compare_shallowcam_with_integrated_gradients(torchserve_server, samples):
    response = post(torchserve_server, files={"data": photo(HUMMINGBIRD),
                                              "compare": "shallowcam,captum.integrated_gradients",
                                              "steps": str(STEPS)})
    assert response.status_code == 200, response.text
    body = response.json()
    top = body["predictions"][0]
    assert top["label"] == label_of(HUMMINGBIRD, samples)
    assert "explanation" not in body
    shallow, ig = body["explanations"]
    assert (shallow["method"], shallow["layer"]) == ("shallowcam", "_blocks.4")  # its configured layer
    assert (ig["method"], ig["layer"]) == ("captum.integrated_gradients", "input")
    assert ig["options"]["steps"] == STEPS and "steps" not in shallow["options"]  # knobs go where they belong
    for explanation in (shallow, ig):
        assert explanation["target"] == top["index"]
        assert png(explanation["heatmap"]).size == (224, 224)
        assert explanation["seconds"] > 0
    assert shallow["passes"]["relevance"] == 1 and ig["passes"]["evaluations"] == STEPS
    comparison = body["comparison"]
    assert comparison["methods"] == ["shallowcam", "captum.integrated_gradients"]
    assert comparison["target"] == top["index"]
    assert comparison["seconds"] == [shallow["seconds"], ig["seconds"]]  # each its own time
    rho = comparison["spearman"]
    assert np.asarray(rho).shape == (2, 2)
    assert rho[0][0] == rho[1][1] == 1.0 and rho[0][1] == rho[1][0]
    assert -1.0 <= rho[0][1] <= 1.0 and rho[0][1] != 0.0
    print(f"Spearman(shallowcam, IG {STEPS} steps) on {HUMMINGBIRD}: {rho[0][1]}; seconds {comparison['seconds']}")


def concurrent(server, calls):
    """Fire ``calls`` (kwargs for :func:`post`) at once from threads; responses in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, kwargs):
        barrier.wait()
        results[i] = post(server, **kwargs)

    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.server
def test_bad_captum_knobs_are_400_and_isolated(torchserve_server, samples):
    good = photo(BULBUL)
    ig = {"data": good, "explain": "captum.integrated_gradients"}
    cases = {
        "steps=0": ({"files": {**ig, "steps": "0"}}, "'steps' must be ≥ 1"),
        "steps beyond the cap": ({"files": {**ig, "steps": "10000"}}, "max_steps"),
        "steps=abc": ({"files": {**ig, "steps": "abc"}}, "'steps' must be an integer"),
        "unknown captum method": ({"files": {"data": good, "explain": "captum.deeplift"}}, "unknown Captum method"),
        "knob by header": ({"files": {"data": good}, "headers": {"X-Camserve-Explain": "captum.integrated_gradients",
                                                                 "X-Camserve-Internal-Batch-Size": "0"}},
                           "internal_batch_size"),
        "LayerLRP on EfficientNet": ({"files": {"data": good, "explain": "captum.layer_lrp"}}, "ReLU6"),
        "compare: unknown method": ({"files": {"data": good, "compare": "shallowcam,captum.nosuch"}},
                                    "unknown Captum method"),
        "compare: bad knob": ({"files": {"data": good, "compare": "gradcam,captum.integrated_gradients",
                                         "steps": "10000"}}, "max_steps"),
        "compare: knob nobody takes": ({"files": {"data": good, "compare": "gradcam,captum.saliency",
                                                  "steps": "8"}}, "none of the compared methods"),
    }
    neighbour = {"files": {"data": good, "explain": "gradcam"}}
    responses = concurrent(torchserve_server, [call for call, _ in cases.values()] + [neighbour])
    for (name, (_, word)), response in zip(cases.items(), responses):
        assert response.status_code == 400, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["status"] == 400 and word.lower() in error["message"].lower(), (name, error)
    answered = responses[-1]
    assert answered.status_code == 200, answered.text
    assert answered.json()["predictions"][0]["label"] == label_of(BULBUL, samples)
    assert answered.json()["explanation"]["method"] == "gradcam"
    ping = requests.get(f"{torchserve_server.url}/ping", headers=torchserve_server.headers(), timeout=30)
    assert ping.json()["status"] == "Healthy"
