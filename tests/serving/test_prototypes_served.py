"""Few-shot prototypes served by the embedding handler (issue 21, item 3): ``prototypes=true`` runs a
SimpleShot episode whose support set is the archive's labelled gallery, in-process on the real
EfficientNet-Lite0 features and real photographs (the TorchServe and KServe doors: tests/integration)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from camserve.cli.main import main
from camserve.engine import Gallery
from camserve.serving.embedding import EmbeddingHandler
from conftest import SAMPLES
from handlerkit import handle, initialised

CLASSES = {"tench": "n01440764_tench.JPEG", "bulbul": "n01560419_bulbul.JPEG", "chiton": "n01955084_chiton.JPEG"}


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shots(name: str):
    """Two shots of a photograph: itself and its mirror."""
    photo = Image.open(SAMPLES / CLASSES[name]).convert("RGB")
    return [encoded(photo), encoded(photo.transpose(Image.FLIP_LEFT_RIGHT))]


def zoomed(name: str) -> bytes:
    """A held-out view of the class: the photograph's centre 70 %."""
    photo = Image.open(SAMPLES / CLASSES[name]).convert("RGB")
    w, h = photo.size
    return encoded(photo.crop((int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h))))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A handler whose archive ships a 3-way 2-shot gallery built by `camserve gallery --shots 2` from
    class sub-folders, one whose gallery keeps no feature maps, and one without a gallery."""
    workdir = tmp_path_factory.mktemp("prototypes")
    support = workdir / "support"          # one sub-folder per class, as `camserve gallery --shots` reads it
    for name in CLASSES:
        (support / name).mkdir(parents=True)
        for i, data in enumerate(shots(name)):
            (support / name / f"shot{i}.png").write_bytes(data)
    (support / "tench" / "shot9.png").write_bytes(zoomed("tench"))   # beyond --shots 2: left out
    (support / "notes.txt").write_text("not an image")
    assert main(["gallery", str(support), str(workdir / "gallery.npz"), "--shots", "2"]) == 0
    gallery = Gallery.load(str(workdir / "gallery.npz"))
    labels = [name for name in sorted(CLASSES) for _ in range(2)]
    assert gallery.labels == labels and gallery.feature_maps.shape[-2:] == (7, 7)
    Gallery(gallery.embeddings, labels).save(str(workdir / "nomaps.npz"))
    plain, plain_context = initialised(EmbeddingHandler, workdir, {"handler": {}}, name="effnet_lite0_embed")
    handler, context = initialised(EmbeddingHandler, workdir, {"handler": {"gallery_file": "gallery.npz"}},
                                   name="effnet_lite0_embed")
    nomaps = initialised(EmbeddingHandler, workdir, {"handler": {"gallery_file": "nomaps.npz"}},
                         name="effnet_lite0_embed")
    return {"handler": (handler, context), "plain": (plain, plain_context), "nomaps": nomaps, "labels": labels}


def answers(pair, rows):
    handler, context = pair
    out = handle(handler, context, rows)
    return [(context.get_response_status(i)[0], json.loads(a)) for i, a in enumerate(out)]


def png_size(text):
    return Image.open(io.BytesIO(base64.b64decode(text))).size


def test_the_query_wins_its_own_class_and_each_shot_gets_its_map(served):
    rows = [{"image": zoomed(name), "prototypes": "true", "topk": "2"} for name in CLASSES]
    rows.append({"image": zoomed("tench"), "prototypes": "true", "format": "array", "embedding": "0", "overlay": "1"})
    rows.append({"image": zoomed("bulbul"), "reference": shots("bulbul")[1]})  # a FAM pair in the same batch
    got = answers(served["handler"], rows)
    assert [status for status, _ in got] == [200] * 5
    for (_, body), name in zip(got[:3], CLASSES):
        prototype = body["prototype"]
        assert prototype["label"] == name and prototype["shots"] == 2
        assert set(prototype["scores"]) == set(CLASSES)
        assert body["similarity"] == max(prototype["scores"].values()) == prototype["scores"][name]
        assert (body["metric"], body["reference"], body["weights"], body["route"]) == (
            "nearest_centroid", "prototype", "jacobian", "jacobian")
        assert png_size(body["query_map"]) == (224, 224) and body["reference_map"] is None
        matches = body["matches"]
        assert [m["label"] for m in matches] == [name, name]
        assert {m["index"] for m in matches} == {i for i, y in enumerate(served["labels"]) if y == name}
        assert matches[0]["similarity"] >= matches[1]["similarity"] > 0.5
        assert all(m["query_map"] is None and png_size(m["reference_map"]) == (224, 224) for m in matches)
        assert len(body["embedding"]) == body["dim"] == 1280
    _, array = got[3]
    assert array["prototype"]["label"] == "tench" and "embedding" not in array
    assert png_size(array["overlay"]) == (224, 224)        # the query's map over its crop
    assert np.asarray(array["query_map"]).shape == (7, 7) and array["size"] == [7, 7]
    assert len(array["matches"]) == 2                       # the archive's gallery_topk (3) capped by 2 shots
    assert all(np.asarray(m["reference_map"]).shape == (7, 7) for m in array["matches"])
    _, pair = got[4]
    assert pair["reference"] == "image" and pair["similarity"] > 0.8 and "prototype" not in pair


def test_bad_prototype_requests_are_400s_naming_the_cause_and_the_batch_goes_on(served):
    rows = [{"image": zoomed("tench"), "prototypes": "true", "reference": shots("tench")[0]},
            {"image": zoomed("tench"), "prototypes": "true", "layer": "stage99"},
            {"image": zoomed("tench"), "prototypes": "true", "weights": "sfam"},
            {"image": zoomed("tench"), "prototypes": "true", "gallery": "2"},
            {"image": zoomed("tench"), "prototypes": "true", "explain": "gradcam_similarity"},
            {"image": zoomed("tench"), "prototypes": "true", "topk": "50"},
            {"image": zoomed("tench"), "prototypes": "maybe"},
            {"image": zoomed("tench"), "prototypes": "true"}]
    got = answers(served["handler"], rows)
    assert [status for status, _ in got] == [400] * 7 + [200]
    messages = [body["error"]["message"] for _, body in got[:7]]
    for message, word in zip(messages, ("reference", "stage99", "sfam", "gallery", "gradcam_similarity", "topk",
                                        "prototypes")):
        assert word in message, message
    assert got[7][1]["prototype"]["label"] == "tench"
    (status, body), = answers(served["plain"], [{"image": zoomed("tench"), "prototypes": "true"}])
    assert status == 400 and "no gallery" in body["error"]["message"]
    (status, body), = answers(served["nomaps"], [{"image": zoomed("tench"), "prototypes": "true"}])
    assert status == 400 and "feature map" in body["error"]["message"]


def test_the_query_map_against_its_prototype_at_every_stage(served):
    """``layer=`` with ``prototypes=true``: the winning class and scores do not depend on the layer; the
    query's map is the relevance route's at each stage below the last map (no shot maps there: the
    gallery keeps last feature maps only) and the Jacobian route's at the last map, named or not."""
    stages = [f"stage{i}" for i in range(1, 9)]
    rows = [{"image": zoomed("bulbul"), "prototypes": "true", "layer": stage, "format": "array"} for stage in stages]
    rows.append({"image": zoomed("bulbul"), "prototypes": "true", "format": "array"})
    got = answers(served["handler"], rows)
    assert [status for status, _ in got] == [200] * 9
    plain = got[-1][1]
    shapes = []
    for (_, body), stage in zip(got[:-1], stages):
        assert body["prototype"] == plain["prototype"] and body["similarity"] == plain["similarity"]
        shape = list(np.asarray(body["query_map"]).shape)
        assert body["layer_shape"] == shape and body["size"] == shape[::-1]
        assert float(np.ptp(body["query_map"])) > 0.5, stage
        shapes.append(shape)
        if stage == "stage8":
            assert (body["route"], body["layer"]) == ("jacobian", "_conv_head")
            assert body["query_map"] == plain["query_map"] and body["passes"] == {"forward": 1, "backward": 1}
            assert all(m["reference_map"] is not None for m in body["matches"])
        else:
            assert (body["route"], body["method"]) == ("relevance", "fam-relevance")
            assert body["passes"] == {"forward": 2, "backward": 1, "relevance": 1}
            assert all(m["reference_map"] is None and m["label"] == "bulbul" for m in body["matches"])
    assert shapes[0] == [112, 112] and shapes[-1] == [7, 7]
    assert [s[0] for s in shapes] == sorted((s[0] for s in shapes), reverse=True)


def test_gallery_command_refuses_a_support_set_of_one_class(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_bytes(shots("tench")[0])
    with pytest.raises(SystemExit, match="at least 2 class sub-folders"):
        main(["gallery", str(tmp_path), str(tmp_path / "g.npz"), "--shots", "1"])
