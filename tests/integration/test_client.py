"""``camserve.client`` against the session's real TorchServe (token auth on; both bundled archives and
a bring-your-own one) and a real ``camserve kserve`` predictor: typed answers over the three
protocols, maps as arrays and images, many images in order with one refused among them, one error
type with the server's status and message, a refused inference key regenerated from the key file,
``503`` + ``Retry-After`` answers retried, the asyncio client, and the answers' rich display (the
figure and HTML card a notebook shows) — every call a real HTTP request."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import yaml

from byo_archives import SHARED
from camserve.client import AsyncClient, CamserveError, Client, heatmap_arrays, overlay_images
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer
from conftest import SAMPLES, label_of, load_uint8
from serverkit import REPO, start_kserve

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


def test_the_asyncio_client_answers_alike_and_regenerates_a_key(torchserve_server, samples):
    names = [r["file"] for r in samples[:4]]

    async def run():
        key_file = torchserve_server.workdir / "key_file.json"
        async with AsyncClient(torchserve_server.url, inference_key="an-expired-key", key_file=str(key_file),
                               management_url=torchserve_server.management_url, protocol="v2") as c:
            answers = await c.predict_many(MODEL, [SAMPLES / n for n in names] + [b"junk"], concurrency=3,
                                           progress=False, explain="gradcam", topk=1)
            return answers, c.inference_key
    answers, key = asyncio.run(run())
    torchserve_server.keys["inference"] = key
    refused = answers.pop()
    assert isinstance(refused, CamserveError) and refused.status == 400 and "decodable image" in refused.message
    sync = client(torchserve_server)
    for answer, name in zip(answers, names):
        same = sync.predict(MODEL, SAMPLES / name, explain="gradcam", topk=1)
        assert answer.predictions[0].index == same.predictions[0].index
        assert answer.explanation.maps.heatmaps == same.explanation.maps.heatmaps  # the same map, byte for byte


def test_a_bring_your_own_archive(torchserve_server):
    photo = SHARED / "data" / "cifar10-test" / "bird" / "0000.jpg"
    answer = client(torchserve_server).predict("cifar_resnet20", photo, explain="shallowcam", layer="stage1")
    assert answer.predictions[0].label == "bird"
    assert answer.explanation.layer == "layer1" and heatmap_arrays(answer.explanation)[0].shape == (32, 32)


def test_display_of_a_comparison_and_its_maps_over_the_sent_photo(torchserve_server):
    c = client(torchserve_server)
    answer = c.predict(MODEL, SAMPLES / BIRD, compare="gradcam,layercam", layer="_blocks.10")
    panels = answer.panels()
    assert [p.title.split(" · ")[0] for p in panels] == ["gradcam @ _blocks.10", "layercam @ _blocks.10"]
    figure = Image.open(io.BytesIO(answer._repr_png_()))
    assert figure.size == (2 * 224 + 6, 224 + 30)
    page = answer._repr_html_()
    assert "hummingbird" in page and page.count("<img ") == 2 and "Spearman" in page
    # the map blended over the photo the client sent matches the server's own overlay of the same map
    served = c.predict(MODEL, SAMPLES / BIRD, explain="gradcam", layer="_blocks.10", overlay=True)
    ours = np.asarray(served.with_images(image=(SAMPLES / BIRD).read_bytes()).panels()[0].image, dtype=np.float32)
    server = np.asarray(overlay_images(served.explanation)[0], dtype=np.float32)
    assert served.panels()[0].image.size == (224, 224)
    assert np.abs(ours - server).mean() < 6.0  # of 255: resampling differences only
    served.explanation.maps.overlays = None  # without the sent photo, the colour map alone
    alone = np.asarray(served.with_images().panels()[0].image, dtype=np.float32)
    assert np.abs(alone - server).mean() > 20.0


def test_display_of_a_fam_pair(torchserve_server):
    pair = client(torchserve_server).predict(EMBED, SAMPLES / BIRD, reference=SAMPLES / TURTLE)
    titles = [p.title for p in pair.panels()]
    assert titles[0].startswith("query · fam") and titles[1].startswith("reference (image)")
    assert "embedding: 1280 dimensions" in pair._repr_html_()
    plain = client(torchserve_server).predict(MODEL, SAMPLES / BIRD)
    assert plain.panels() == [] and plain._repr_png_() is None and "hummingbird" in plain._repr_html_()
    with pytest.raises(ValueError, match="no maps"):
        plain.show()


@pytest.fixture(scope="module")
def tight_kserve(tmp_path_factory):
    """``camserve kserve`` with the bundled model and a batch budget of 2 evaluations: two concurrent
    ``compare=`` requests of two methods meet in one batch, and the second is answered 503 + Retry-After."""
    work = tmp_path_factory.mktemp("client-kserve")
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    config["handler"]["captum"].update(max_evaluations=2, max_batch_evaluations=2)
    (work / "tight.yaml").write_text(yaml.safe_dump(config))
    server = start_kserve(MODEL, ["--model-config", str(work / "tight.yaml"), "--max-batch-delay-ms", "400"], work)
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_the_kserve_predictor_with_both_clients(tight_kserve, protocol):
    answer = Client(tight_kserve.url, protocol=protocol).predict(MODEL, SAMPLES / BIRD, explain="layercam",
                                                                 layer="_blocks.4", format="array")
    assert answer.predictions[0].index == 94 and heatmap_arrays(answer.explanation)[0].shape == (28, 28)

    async def bad():
        async with AsyncClient(tight_kserve.url, protocol=protocol) as c:
            await c.predict(MODEL, SAMPLES / BIRD, explain="gradcam", layer="no.such.layer")
    with pytest.raises(CamserveError) as refused:
        asyncio.run(bad())
    assert refused.value.status == 400 and "no.such.layer" in refused.value.message


def test_busy_answers_are_retried_after_retry_after(tight_kserve):
    before = tight_kserve.metric("camserve_batch_budget_rejected_total", model=MODEL)

    async def run():
        async with AsyncClient(tight_kserve.url, protocol="v1", retries=6) as c:
            return await c.predict_many(MODEL, [SAMPLES / BIRD] * 3, concurrency=3, progress=False,
                                        compare="gradcam,layercam", layer="_conv_head")
    answers = asyncio.run(run())
    assert all(isinstance(a, ClassifierAnswer) and a.comparison.methods == ["gradcam", "layercam"]
               for a in answers), answers
    assert tight_kserve.metric("camserve_batch_budget_rejected_total", model=MODEL) > before  # 503s were served
    rejected = tight_kserve.metric("camserve_batch_budget_rejected_total", model=MODEL)
    sync = Client(tight_kserve.url, protocol="v1", retries=6).predict_many(
        MODEL, [SAMPLES / BIRD] * 3, concurrency=3, progress=False, compare="gradcam,layercam", layer="_conv_head")
    assert all(isinstance(a, ClassifierAnswer) for a in sync), sync
    assert tight_kserve.metric("camserve_batch_budget_rejected_total", model=MODEL) > rejected
