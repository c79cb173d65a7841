"""``camserve.client`` against the session's real TorchServe (token auth on): typed answers over the
three protocols, maps as arrays and images, many images in order with one refused among them, one
error type with the server's status and message, and a refused inference key regenerated from the
key file — every call a real HTTP request."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.client import CamserveError, Client, heatmap_arrays, overlay_images
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer
from conftest import SAMPLES, label_of, load_uint8

pytestmark = pytest.mark.server
MODEL, EMBED = "effnet_lite0", "effnet_lite0_embed"
BIRD, TENCH, TURTLE = "n01833805_hummingbird.JPEG", "n01440764_tench.JPEG", "n01665541_leatherback_turtle.JPEG"


def client(server, **kwargs) -> Client:
    return Client(server.url, inference_key=server.keys["inference"], management_url=server.management_url, **kwargs)


@pytest.mark.parametrize("protocol", ["torchserve", "v1", "v2"])
def test_typed_answers_over_every_protocol(torchserve_server, samples, protocol):
    answer = client(torchserve_server, protocol=protocol).predict(MODEL, SAMPLES / BIRD, explain="gradcam",
                                                                  layer="_blocks.10", overlay=True)
    assert isinstance(answer, ClassifierAnswer)
    assert answer.predictions[0].label == label_of(BIRD, samples) and answer.predictions[0].score > 0.9
    explanation = answer.explanation
    assert (explanation.method, explanation.layer) == ("gradcam", "_blocks.10")
    (heatmap,) = heatmap_arrays(explanation)
    assert heatmap.shape == (224, 224) and heatmap.min() == 0.0 and 0.9 < heatmap.max() <= 1.0
    (overlay,) = overlay_images(explanation)
    assert overlay.size == (224, 224) and overlay.mode == "RGB"


def test_image_inputs_of_every_kind_give_the_same_prediction(torchserve_server):
    c = client(torchserve_server)
    path = SAMPLES / TENCH
    pil = Image.open(path).convert("RGB")
    inputs = [path, path.read_bytes(), pil, np.asarray(pil), load_uint8(path), load_uint8(path).float() / 255]
    indices = {c.predict(MODEL, image, topk=1).predictions[0].index for image in inputs}
    assert indices == {0}  # tench, from JPEG bytes and from the lossless PNG the client encodes alike


def test_layer_resolution_arrays_and_embedding_answers(torchserve_server):
    c = client(torchserve_server, protocol="v1")
    answer = c.predict(MODEL, SAMPLES / BIRD, explain="shallowcam", layer="_blocks.4", format="array")
    (array,) = heatmap_arrays(answer.explanation)
    assert array.shape == (28, 28) and answer.explanation.layer_shape == [28, 28]
    pair = client(torchserve_server).predict(EMBED, SAMPLES / BIRD, reference=SAMPLES / TURTLE)
    assert isinstance(pair, EmbeddingAnswer) and pair.dim == 1280 and pair.fam is not None
    assert -1.0 <= pair.fam.similarity <= 1.0


def test_many_images_in_order_with_a_refused_one_in_place(torchserve_server, samples):
    names = [r["file"] for r in samples[:6]]
    images = [SAMPLES / n for n in names]
    images.insert(3, b"not an image")
    answers = client(torchserve_server).predict_many(MODEL, images, concurrency=3, progress=False, topk=1)
    assert len(answers) == 7
    refused = answers.pop(3)
    assert isinstance(refused, CamserveError) and refused.status == 400 and "decodable image" in refused.message
    truth = {r["file"]: int(r["class_index"]) for r in samples}
    hits = sum(a.predictions[0].index == truth[n] for a, n in zip(answers, names))
    assert hits >= 5  # the bundled model's top-1 on these photographs; each answer is its own image's


def test_errors_carry_the_servers_status_and_message(torchserve_server):
    c = client(torchserve_server)
    with pytest.raises(CamserveError) as bad_layer:
        c.predict(MODEL, SAMPLES / BIRD, explain="gradcam", layer="no.such.layer")
    assert bad_layer.value.status == 400 and "no.such.layer" in bad_layer.value.message
    with pytest.raises(CamserveError) as missing:
        c.predict("no_such_model", SAMPLES / BIRD)
    assert missing.value.status == 404
    with pytest.raises(CamserveError) as refused:
        Client(torchserve_server.url, inference_key="not-the-key").predict(MODEL, SAMPLES / BIRD)
    assert refused.value.status == 400 and "Token Authorization failed" in refused.value.message
    with pytest.raises(ValueError, match="protocol"):
        Client(torchserve_server.url, protocol="grpc")


def test_a_refused_key_is_regenerated_from_the_key_file(torchserve_server, tmp_path):
    """TorchServe's keys expire; a client with the key file regenerates the inference key on the
    management API with the file's API key and sends the request again. (The session server's own
    key changes too: the fixture's copy is updated for the tests after this one.)"""
    key_file = torchserve_server.workdir / "key_file.json"
    c = Client(torchserve_server.url, inference_key="an-expired-key",  # as if the key in hand had expired
               key_file=str(key_file), management_url=torchserve_server.management_url)
    answer = c.predict(MODEL, SAMPLES / BIRD, topk=1)
    new_key = json.loads(key_file.read_text())["inference"]["key"]
    torchserve_server.keys["inference"] = new_key
    assert answer.predictions[0].index == 94 and c.inference_key == new_key != "an-expired-key"
