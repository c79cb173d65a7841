"""Bring-your-own models over HTTP: archives built by ``camserve archive`` served by a real TorchServe
side by side with the bundled ones (tests/byo_archives.py): a torchvision CNN, a timm ViT, the
pretrained CIFAR-10 ResNet-20 as an eager model, and two torchvision embedding models."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from byo_archives import CIFAR_CLASSES, SHARED, TV_CLASSES
from conftest import decode_png, photo_bytes as photo

pytestmark = pytest.mark.server
PHOTO = "n01833805_hummingbird.JPEG"
CIFAR = SHARED / "data" / "cifar10-test"


def post(server, model, timeout=300, **kwargs):
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    return requests.post(f"{server.url}/predictions/{model}", headers=headers, timeout=timeout, **kwargs)


def explained(server, model, **fields):
    response = post(server, model, files={"data": photo(PHOTO), **{k: (None, str(v)) for k, v in fields.items()}})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model,labels", [("tv_resnet18", TV_CLASSES), ("cifar_resnet20", CIFAR_CLASSES),
                                          ("timm_vit", [str(i) for i in range(10)])])
def test_plain_predictions_use_the_archive_label_map(torchserve_server, model, labels):
    body = post(torchserve_server, model, data=photo(PHOTO), headers={"Content-Type": "application/octet-stream"})
    assert body.status_code == 200, body.text
    predictions = body.json()["predictions"]
    assert len(predictions) == 5
    assert {p["label"] for p in predictions} <= set(labels)
    assert all(p["label"] == labels[p["index"]] for p in predictions)
    assert abs(sum(p["score"] for p in body.json()["predictions"])) <= 1.0 + 1e-6


@pytest.mark.parametrize("model,stages", [("tv_resnet18", ["stage2", "stage3", "stage5"]),
                                          ("cifar_resnet20", ["stage1", "stage2", "stage3"])])
@pytest.mark.parametrize("method", ["gradcam", "layercam", "shallowcam"])
def test_cnn_methods_at_discovered_stages(torchserve_server, model, stages, method):
    for stage in stages:
        body = explained(torchserve_server, model, explain=method, layer=stage)
        e = body["explanation"]
        assert e["method"] == method
        assert not e["layer"].startswith("stage"), "the answer names the module path behind the alias"
        heatmap = decode_png(e["heatmap"])
        side = 32 if model == "cifar_resnet20" else 224
        assert heatmap.size == (side, side)
        assert np.asarray(heatmap).std() > 0, f"{method} at {stage} gave a constant map"


def test_archive_method_options_are_the_served_defaults(torchserve_server):
    """The ResNet-20 archive's ``--method-option``s (temperature 4, β from l+1 where there is one) are
    what a Shallow-CAM request gets unless it names its own; naming the start drops the temperature;
    ``beta_from=auto`` serves the last stage too."""
    default = explained(torchserve_server, "cifar_resnet20", explain="shallowcam")["explanation"]
    assert default["layer"] == "layer1"
    assert default["options"]["temperature"] == 4.0 and default["options"]["beta_from"] == "auto"
    assert default["options"]["start"] == "softmax"
    own = explained(torchserve_server, "cifar_resnet20", explain="shallowcam", start="target",
                    beta_from="layer")["explanation"]
    assert "temperature" not in own["options"] and own["options"]["contrastive"] is False
    assert own["heatmap"] != default["heatmap"]
    last = explained(torchserve_server, "cifar_resnet20", explain="shallowcam", layer="stage3")["explanation"]
    assert last["layer"] == "layer3" and last["options"]["beta_from"] == "auto"
    other = explained(torchserve_server, "tv_resnet18", explain="shallowcam")["explanation"]
    assert "temperature" not in other["options"]  # another archive: its own (no) defaults


def test_cnn_stage_layer_shapes_shrink(torchserve_server):
    shapes = [explained(torchserve_server, "cifar_resnet20", explain="layercam", layer=s)["explanation"]["layer_shape"]
              for s in ("stage1", "stage2", "stage3")]
    assert shapes == [[32, 32], [16, 16], [8, 8]]


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_vit_gradient_cams(torchserve_server, method):
    body = explained(torchserve_server, "timm_vit", explain=method)
    e = body["explanation"]
    assert e["layer_shape"] == [14, 14]
    assert decode_png(e["heatmap"]).size == (224, 224)


@pytest.mark.parametrize("method", ["shallowcam", "relevancecam"])
def test_vit_refuses_lrp_methods_with_the_reason(torchserve_server, method):
    response = post(torchserve_server, "timm_vit", files={"data": photo(PHOTO), "explain": (None, method)})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"].lower()
    assert "attention" in message or "token" in message or "transformer" in message, message


def test_unknown_layer_lists_the_stages(torchserve_server):
    response = post(torchserve_server, "tv_resnet18", files={"data": photo(PHOTO), "explain": (None, "gradcam"),
                                                             "layer": (None, "layer9")})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "stage1" in message and "layer1" in message, message


def cifar_files(per_class: int):
    return [(index, path) for index, name in enumerate(CIFAR_CLASSES)
            for path in sorted((CIFAR / name).glob("*.jpg"))[:per_class]]


def test_served_resnet20_top1_matches_in_process(torchserve_server):
    """The pretrained ResNet-20 served from its eager archive classifies the CIFAR-10 JPEGs as the same
    model run in-process (same weights file, the example model.py, 32×32, ImageNet mean/std)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "cifar_resnet"))
    from model import CifarResNet
    from camserve.engine.models import load_weights

    files = cifar_files(per_class=200)
    model = load_weights(CifarResNet(20), str(SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th")).eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                          for _, p in files])
    with torch.no_grad():
        local = model((images - mean) / std).argmax(dim=1).tolist()

    def served(chunk):
        body = {"instances": [{"data": base64.b64encode(p.read_bytes()).decode(), "topk": 1} for _, p in chunk]}
        response = requests.post(f"{torchserve_server.url}/v1/models/cifar_resnet20:predict", json=body,
                                 headers=torchserve_server.headers(), timeout=300)
        assert response.status_code == 200, response.text
        return [p["predictions"][0]["index"] for p in response.json()["predictions"]]

    chunks = [files[i:i + 16] for i in range(0, len(files), 16)]
    with ThreadPoolExecutor(4) as pool:
        remote = [i for part in pool.map(served, chunks) for i in part]
    truth = [index for index, _ in files]
    local_acc = np.mean([a == b for a, b in zip(local, truth)])
    served_acc = np.mean([a == b for a, b in zip(remote, truth)])
    agreement = np.mean([a == b for a, b in zip(local, remote)])
    print(f"ResNet-20 on {len(files)} CIFAR-10 JPEGs: served {served_acc:.4f}, in-process {local_acc:.4f}, "
          f"agreement {agreement:.4f}")
    assert abs(served_acc - local_acc) <= 0.01
    assert 0.75 <= served_acc <= 0.85


def embed(server, model, **files):
    response = requests.post(f"{server.url}/predictions/{model}", headers=server.headers(), timeout=300,
                             files={k: (None, v) if isinstance(v, str) else v for k, v in files.items()})
    assert response.status_code == 200, response.text
    return response.json()


def test_embed_pooled_route_without_gradients(torchserve_server):
    body = embed(torchserve_server, "tv_resnet18_embed", image=photo(PHOTO),
                 reference=photo("n01560419_bulbul.JPEG"))
    assert body["dim"] == 512 and len(body["embedding"]) == 512
    assert body["route"] == "pooled" and body["method"] == "fam"
    assert body["passes"].get("backward", 0) == 0
    assert -1.0 <= body["similarity"] <= 1.0
    assert decode_png(body["query_map"]).size == (224, 224)
    assert decode_png(body["reference_map"]).size == (224, 224)


def test_embed_projection_head_takes_the_jacobian_route(torchserve_server):
    body = embed(torchserve_server, "tv_resnet18_proj", image=photo(PHOTO),
                 reference=photo("n01560419_bulbul.JPEG"))
    assert body["dim"] == 128
    assert body["route"] == "jacobian"
    assert body["passes"].get("backward", 0) >= 1
    assert np.asarray(decode_png(body["query_map"])).shape == (224, 224)


def test_embedding_of_an_image_with_itself_is_one(torchserve_server):
    body = embed(torchserve_server, "tv_resnet18_embed", image=photo(PHOTO), reference=photo(PHOTO))
    assert body["similarity"] == pytest.approx(1.0, abs=1e-5)
