"""The embedding model over HTTP: embeddings, FAM pairs against a reference, gallery matches."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import SAMPLES

pytestmark = pytest.mark.server
MODEL = "effnet_lite0_embed"
QUERY, SAME_KIND, OTHER = "n01560419_bulbul.JPEG", "n01582220_magpie.JPEG", "n01955084_chiton.JPEG"


def photo(name):
    return (SAMPLES / name).read_bytes()


def b64(name):
    return base64.b64encode(photo(name)).decode()


def post(server, **kwargs):
    return requests.post(f"{server.url}/predictions/{MODEL}", headers=server.headers(), timeout=300, **kwargs)


def png(text):
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_embedding_only(torchserve_server):
    response = post(torchserve_server, data=photo(QUERY))
    assert response.status_code == 200, response.text
    body = response.json()
    vector = np.asarray(body["embedding"])
    assert body["dim"] == 1280 and vector.shape == (1280,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-3  # L2-normalised embeddings
    assert "similarity" not in body


def test_reference_image_gives_similarity_and_fam_pair(torchserve_server):
    near = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND)}).json()
    far = post(torchserve_server, json={"image": b64(QUERY), "reference": b64(OTHER)}).json()
    assert near["method"] == "fam-relevance" and near["reference"] == "image"  # the pair default: stage2
    assert near["similarity"] > far["similarity"]  # two birds are closer than a bird and a chiton
    for key in ("query_map", "reference_map"):
        image = png(near[key])
        assert image.size == (224, 224) and image.mode == "L"
        assert np.asarray(image).std() > 5
    # the archive's pair default (handler.task_layers.pair): the relevance route at stage 2, no backward
    assert (near["layer"], near["route"], near["layer_shape"]) == ("_blocks.2", "relevance", [56, 56])
    assert near["passes"] == {"forward": 1, "backward": 0, "relevance": 1}
    last = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND),
                                          "layer": (None, "_conv_head")}).json()
    assert last["route"] == "pooled" and last["passes"] == {"forward": 1, "backward": 0}  # pooled FAM: no backward
    assert last["similarity"] == near["similarity"]


def test_reference_embedding_matches_reference_image(torchserve_server):
    reference = post(torchserve_server, data=photo(SAME_KIND)).json()["embedding"]
    by_embedding = post(torchserve_server, json={"image": b64(QUERY), "reference_embedding": reference}).json()
    by_image = post(torchserve_server, json={"image": b64(QUERY), "reference": b64(SAME_KIND)}).json()
    assert by_embedding["reference"] == "embedding"
    assert by_embedding["similarity"] == pytest.approx(by_image["similarity"], abs=1e-3)
    assert by_embedding["reference_map"] is None and png(by_embedding["query_map"]).size == (224, 224)


def test_gallery_matches(torchserve_server):
    # archive.sh builds the gallery from every ~41st shared photo, starting with the tench
    response = post(torchserve_server, files={"image": photo("n01440764_tench.JPEG"), "gallery": "3",
                                              "embedding": "0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "embedding" not in body
    matches = body["matches"]
    assert len(matches) == 3
    sims = [m["similarity"] for m in matches]
    assert sims == sorted(sims, reverse=True)
    assert matches[0]["label"] == "tench" and matches[0]["similarity"] > 0.99  # the query itself is in it
    assert all(png(m["query_map"]).size == (224, 224) and png(m["reference_map"]).size == (224, 224)
               for m in matches)


def test_embed_errors(torchserve_server):
    wrong_length = post(torchserve_server, json={"image": b64(QUERY), "reference_embedding": [0.1, 0.2]})
    assert wrong_length.status_code == 400
    assert "1280" in wrong_length.json()["error"]["message"] or "dimension" in wrong_length.json()["error"]["message"]
    too_many = post(torchserve_server, files={"image": photo(QUERY), "gallery": "500"})
    assert too_many.status_code == 400 and "gallery" in too_many.json()["error"]["message"]
    both = post(torchserve_server, json={"image": b64(QUERY), "reference": b64(OTHER), "reference_embedding": [1.0]})
    assert both.status_code == 400
    assert post(torchserve_server, data=photo(QUERY)).status_code == 200


def v2(server, inputs, parameters=None, **extra):
    body = {"inputs": inputs, **({"parameters": parameters} if parameters else {}), **extra}
    return requests.post(f"{server.url}/v2/models/{MODEL}/infer", headers=server.headers(), timeout=300, json=body)


def test_kserve_v2_reference_embedding_is_an_embedding(torchserve_server):
    reference = post(torchserve_server, data=photo(SAME_KIND)).json()["embedding"]
    by_image = post(torchserve_server, json={"image": b64(QUERY), "reference": b64(SAME_KIND)}).json()
    for shape in ([len(reference)], [1, len(reference)]):
        response = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(QUERY)]},
                                          {"name": "reference_embedding", "datatype": "FP32", "shape": shape,
                                           "data": reference}])
        assert response.status_code == 200, response.text
        out = {o["name"]: o for o in response.json()["outputs"]}
        assert out["reference"]["data"] == ["embedding"]
        assert out["similarity"]["datatype"] == "FP32" and out["similarity"]["shape"] == [1]
        assert out["similarity"]["data"][0] == pytest.approx(by_image["similarity"], abs=1e-3)
        assert (out["embedding"]["datatype"], out["embedding"]["shape"]) == ("FP32", [1, 1280])
        assert png(out["query_map"]["data"][0]).size == (224, 224) and "reference_map" not in out
    wrong = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(QUERY)]},
                                   {"name": "reference_embedding", "datatype": "FP32", "shape": [2],
                                    "data": [0.1, 0.2]}])
    assert wrong.status_code == 400 and "1280" in wrong.json()["error"]["message"]


def test_kserve_v2_embeddings_and_gallery_as_tensors(torchserve_server):
    two = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(QUERY), b64(OTHER)]},
                                 {"name": "reference", "datatype": "BYTES", "shape": [2],
                                  "data": [b64(SAME_KIND), b64(SAME_KIND)]}])
    assert two.status_code == 200, two.text
    out = {o["name"]: o for o in two.json()["outputs"]}
    vectors = np.asarray(out["embedding"]["data"]).reshape(out["embedding"]["shape"])
    assert vectors.shape == (2, 1280) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    near, far = out["similarity"]["data"]
    assert near > far and out["query_map"]["shape"] == out["reference_map"]["shape"] == [2]
    gallery = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [b64("n01440764_tench.JPEG")]}], {"gallery": True, "embedding": False})
    assert gallery.status_code == 200, gallery.text
    out = {o["name"]: o for o in gallery.json()["outputs"]}
    assert out["match_label"]["shape"] == [1, 3]  # gallery=true: the archive's gallery_topk (3)
    assert out["match_label"]["data"][0] == "tench" and "embedding" not in out


def test_gallery_true_uses_the_archive_gallery_topk(torchserve_server):
    default = post(torchserve_server, files={"image": photo(QUERY), "gallery": "true", "embedding": "0"})
    assert default.status_code == 200, default.text
    assert len(default.json()["matches"]) == 3  # configs/effnet_lite0_embed.yaml: gallery_topk: 3
    asked = post(torchserve_server, json={"image": b64(QUERY), "gallery": True, "topk": 5, "embedding": False})
    assert len(asked.json()["matches"]) == 5
    off = post(torchserve_server, files={"image": photo(QUERY), "gallery": "0"})
    assert off.status_code == 200 and "matches" not in off.json()


def test_every_option_is_validated_without_a_reference(torchserve_server):
    for files, word in (({"similarity": "manhattan"}, "manhattan"), ({"method": "nosuch"}, "nosuch"),
                        ({"explain": "gradcam"}, "gradcam"), ({"colormap": "rainbow"}, "rainbow")):
        response = post(torchserve_server, files={"image": photo(QUERY), **files})
        assert response.status_code == 400, (files, response.text)
        assert word in response.json()["error"]["message"]
    assert post(torchserve_server, files={"image": photo(QUERY), "similarity": "dot"}).status_code == 200


def test_fam_at_a_shallow_layer(torchserve_server):
    """``layer=`` places the FAM pair below the last map (the relevance route), over multipart and v2."""
    shallow = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND),
                                             "layer": (None, "stage2")})
    assert shallow.status_code == 200, shallow.text
    body = shallow.json()
    assert (body["route"], body["method"], body["layer"], body["layer_shape"]) == (
        "relevance", "fam-relevance", "_blocks.2", [56, 56])
    assert body["passes"] == {"forward": 1, "backward": 0, "relevance": 1} and body["runtime"] == "eager"
    last = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND),
                                          "layer": (None, "stage8")}).json()
    assert last["layer"] == "_conv_head" and last["route"] == "pooled"
    assert abs(body["similarity"] - last["similarity"]) < 1e-5  # the same similarity, explained deeper down
    for key in ("query_map", "reference_map"):
        image = np.asarray(png(body[key]))
        assert image.shape == (224, 224) and image.std() > 5
    assert not np.array_equal(np.asarray(png(body["query_map"])), np.asarray(png(last["query_map"])))
    tensors = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(QUERY)]},
                                     {"name": "reference", "datatype": "BYTES", "shape": [1],
                                      "data": [b64(SAME_KIND)]}], {"layer": "stage3"})
    assert tensors.status_code == 200, tensors.text
    out = {o["name"]: o for o in tensors.json()["outputs"]}
    assert out["layer"]["data"] == ["_blocks.4"] and out["route"]["data"] == ["relevance"]
    for layer, kind in (("stage99", "UnknownLayerError"), ("_fc", "NotAFeatureMapError")):
        refused = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND),
                                                 "layer": (None, layer)})
        assert refused.status_code == 400 and refused.json()["error"]["type"] == kind, refused.text


def test_fam_family_weights_and_array_maps(torchserve_server):
    """``weights=`` picks the FAM family's channel weights (answered as ``weights``; neighbour weights name
    the gallery items they averaged), ``format=array`` answers the maps at the map's own resolution (7×7
    at the last map, 56×56 at stage2, the archive's pair default), over multipart and v2; bad combinations
    are 400s naming the cause."""
    pair = {"image": photo(QUERY), "reference": photo(SAME_KIND), "layer": (None, "_conv_head")}
    default = post(torchserve_server, files=pair).json()
    assert default["weights"] == "product" and default["format"] == "png"
    for weights in ("sfam", "jacobian", "product"):
        body = post(torchserve_server, files={**pair, "weights": weights}).json()
        assert body["weights"] == weights and abs(body["similarity"] - default["similarity"]) < 1e-5, body
    jacobian = post(torchserve_server, files={**pair, "weights": "jacobian"}).json()
    assert jacobian["passes"]["backward"] == 1 and default["passes"]["backward"] == 0
    neighbour = post(torchserve_server, files={"image": photo("n01440764_tench.JPEG"), "gallery": "2",
                                                "weights": "neighbour", "neighbours": "2"}).json()
    assert neighbour["weights"] == "neighbour" and len(neighbour["neighbours"]["indices"]) <= 2
    assert neighbour["neighbours"]["label"] == "tench"
    # against an image reference, neighbour weights average over the query's neighbours in the archive's gallery
    against_image = post(torchserve_server, files={**pair, "weights": "neighbour"}).json()
    assert against_image["weights"] == "neighbour" and len(against_image["neighbours"]["indices"]) >= 1

    arrays = post(torchserve_server, files={**pair, "format": "array"}).json()
    assert arrays["format"] == "array" and arrays["size"] == [7, 7]
    query = np.asarray(arrays["query_map"])
    assert query.shape == (7, 7) and np.asarray(arrays["reference_map"]).shape == (7, 7)
    assert query.min() >= 0 and query.max() == 1.0  # normalised at its own resolution
    # the PNG is that array upsampled: its 32×32 cell means follow the array
    cells = np.asarray(png(default["query_map"]), dtype=np.float32).reshape(7, 32, 7, 32).mean(axis=(1, 3)) / 255
    assert np.corrcoef(cells.ravel(), query.ravel())[0, 1] > 0.95
    shallow = post(torchserve_server, files={**pair, "format": "array", "layer": (None, "stage2")}).json()
    assert shallow["size"] == [56, 56] and np.asarray(shallow["query_map"]).shape == (56, 56)
    unnamed = post(torchserve_server, files={"image": photo(QUERY), "reference": photo(SAME_KIND),
                                             "format": "array"}).json()
    assert unnamed["query_map"] == shallow["query_map"]  # the pair default is stage2
    gallery = post(torchserve_server, files={"image": photo(QUERY), "gallery": "2", "format": "array"}).json()
    assert all(np.asarray(m["query_map"]).shape == (7, 7) for m in gallery["matches"])
    tensors = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(QUERY)]},
                                     {"name": "reference", "datatype": "BYTES", "shape": [1],
                                      "data": [b64(SAME_KIND)]}], {"format": "array", "weights": "sfam"})
    assert tensors.status_code == 200, tensors.text
    out = {o["name"]: o for o in tensors.json()["outputs"]}   # no layer named: the pair default, stage2
    assert out["query_map_array"]["shape"] == [1, 56, 56] and out["query_map_array"]["datatype"] == "FP32"
    assert out["weights"]["data"] == ["sfam"] and "query_map" not in out

    for files, word in (({**pair, "weights": "cosine"}, "cosine"),
                        ({**pair, "neighbours": "3"}, "weights=neighbour"),
                        ({**pair, "weights": "sfam", "method": "gradcam_similarity"}, "gradcam_similarity"),
                        ({"image": photo(QUERY), "weights": "sfam"}, "no reference"),
                        ({**pair, "format": "jpeg"}, "jpeg"),
                        ({**pair, "weights": "neighbour", "neighbours": "999"}, "neighbours")):
        refused = post(torchserve_server, files=files)
        assert refused.status_code == 400, (files.keys(), refused.text)
        assert word in refused.json()["error"]["message"], refused.text


def zoomed_tench() -> bytes:
    """A held-out view: the tench photograph's centre 70 % (the archive's gallery holds the whole photo)."""
    image = Image.open(SAMPLES / "n01440764_tench.JPEG").convert("RGB")
    w, h = image.size
    buffer = io.BytesIO()
    image.crop((int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fewshot_prototypes_over_the_archive_gallery(torchserve_server):
    """``prototypes=true``: a SimpleShot episode whose support set is the archive's labelled gallery
    (one shot per class here); the query's map against the winning prototype and the shot's own map,
    over multipart and v2; a clash with another reference is a 400 and the server stays up."""
    body = post(torchserve_server, files={"image": zoomed_tench(), "prototypes": "true"}).json()
    assert body["prototype"]["label"] == "tench" and body["reference"] == "prototype", body.get("prototype")
    assert body["similarity"] == max(body["prototype"]["scores"].values())
    assert png(body["query_map"]).size == (224, 224) and body["passes"] == {"forward": 1, "backward": 1}
    (shot,) = body["matches"]
    assert shot["label"] == "tench" and shot["query_map"] is None and png(shot["reference_map"]).size == (224, 224)
    tensors = v2(torchserve_server, [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(zoomed_tench()).decode()]}],
                 {"prototypes": True, "format": "array", "embedding": False})
    assert tensors.status_code == 200, tensors.text
    out = {o["name"]: o for o in tensors.json()["outputs"]}
    assert out["reference"]["data"] == ["prototype"] and "match_query_map_array" not in out
    assert out["match_reference_map_array"]["shape"] == [1, 1, 7, 7]
    assert json.loads(out["prototype"]["data"][0])["label"] == "tench"
    deep = post(torchserve_server, files={"image": zoomed_tench(), "prototypes": "true", "layer": "stage3"}).json()
    assert (deep["route"], deep["layer"], deep["layer_shape"]) == ("relevance", "_blocks.4", [28, 28])
    assert deep["prototype"] == body["prototype"] and png(deep["query_map"]).size == (224, 224)
    assert deep["matches"][0]["reference_map"] is None  # the gallery keeps the shots' last maps only
    refused = post(torchserve_server, files={"image": zoomed_tench(), "prototypes": "true", "reference": photo(QUERY)})
    assert refused.status_code == 400 and "reference" in refused.json()["error"]["message"]
    assert post(torchserve_server, files={"image": photo(QUERY)}).status_code == 200
