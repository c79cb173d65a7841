"""Explanation summaries and sampled monitoring in the real handlers (in-process, the bundled model,
real photographs): audit records carry a bounded summary per map; ``handler.monitor`` explains plain
requests for their summaries only — the answers a client gets are byte for byte those of a handler
without it; bad monitor settings fail at load with a clear message."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from camserve.engine.imaging.summary import GRID, MAX_JSON_BYTES, MapSummary, summarise
from camserve.serving.classifier import ImageClassifierHandler
from camserve.serving.embedding import EmbeddingHandler

from conftest import REPO, SAMPLES, decode_png, photo_bytes
from handlerkit import handle, initialised

PHOTOS = ["n01560419_bulbul.JPEG", "n01582220_magpie.JPEG", "n01665541_leatherback_turtle.JPEG",
          "n01833805_hummingbird.JPEG"]


def config(tmp_path, **handler):
    base = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    base["handler"].update(handler)
    return base


def without_times(answer: str) -> dict:
    body = json.loads(answer)
    for key in ("seconds", "batch_seconds"):
        body["explanation"].pop(key)
    return body


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    """The same archive settings three ways: no audit; audit; audit + monitoring of every plain image."""
    work = tmp_path_factory.mktemp("monitoring")
    plain = initialised(ImageClassifierHandler, work, config(work))
    audited = initialised(ImageClassifierHandler, work, config(work, audit_log=str(work / "audit.jsonl")))
    monitored = initialised(ImageClassifierHandler, work, config(
        work, audit_log=str(work / "monitor.jsonl"), monitor={"fraction": 1.0}))
    yield work, plain, audited, monitored
    for handler, _ in (audited, monitored):
        handler.audit.close()


def test_summaries_in_audit_records_are_bounded_and_match_the_map(handlers):
    work, _, (handler, context), _ = handlers
    rows = [{"data": photo_bytes(PHOTOS[0]), "explain": "gradcam", "layer": "_blocks.10", "target": "top2"},
            {"data": photo_bytes(PHOTOS[1]), "compare": "gradcam,layercam", "layer": "_conv_head"}]
    answers = [json.loads(a) for a in handle(handler, context, rows)]
    explained, compared = records(work / "audit.jsonl")[-2:]
    assert explained["kind"] == "explanation" and compared["kind"] == "compare"
    assert len(explained["settings_id"]) == 12 and explained["settings_id"] == compared["settings_id"]
    summaries = explained["summaries"]
    assert [(s["method"], s["layer"], s["target"]) for s in summaries] == [
        ("gradcam", "_blocks.10", t) for t in answers[0]["explanation"]["targets"]]
    for entry, png in zip(summaries, answers[0]["explanation"]["heatmaps"]):
        assert len(json.dumps(entry)) <= MAX_JSON_BYTES + 80  # + method, layer, target
        summary = MapSummary.from_json(entry)
        # the summary of the 14×14 map agrees with the summary of the 224×224 PNG the client got
        heat = torch.from_numpy(np.asarray(decode_png(png), dtype=np.float32) / 255.0)
        from_png = summarise(heat[None])[0]
        assert summary.grid_array().shape == (GRID, GRID)
        assert np.abs(summary.grid_array() - from_png.grid_array()).mean() < 0.03
        assert np.allclose(summary.centroid, from_png.centroid, atol=0.02)
    assert [s["method"] for s in compared["summaries"]] == ["gradcam", "layercam"]


def test_monitoring_records_plain_traffic_without_changing_an_answer(handlers):
    work, (plain, plain_context), _, (monitored, context) = handlers
    rows = [{"data": photo_bytes(name)} for name in PHOTOS[:3]]
    rows.append({"data": photo_bytes(PHOTOS[3]), "explain": "shallowcam"})
    rows.append({"data": b"not an image"})
    expected = handle(plain, plain_context, [dict(r) for r in rows])
    got = handle(monitored, context, [dict(r) for r in rows])
    assert got[:3] == expected[:3] and got[4] == expected[4]  # plain answers and the refusal: the same bytes
    assert without_times(got[3]) == without_times(expected[3])  # the explained one: all but its timings
    assert [context.get_response_status(i)[0] for i in range(len(rows))] == [200, 200, 200, 200, 400]
    written = records(work / "monitor.jsonl")
    monitor = [r for r in written if r["kind"] == "monitor"]
    assert len(monitor) == 3 and len([r for r in written if r["kind"] == "explanation"]) == 1
    for record, answer in zip(monitor, expected[:3]):
        (entry,) = record["summaries"]
        assert (entry["method"], entry["layer"]) == ("cam", "_conv_head")  # the cheapest map the head allows
        assert entry["target"] == json.loads(answer)["predictions"][0]["index"] == record["topk"][0]["index"]
        assert record["heatmap_sha256"] == []


def test_monitor_settings_are_checked_at_load(tmp_path):
    with pytest.raises(ValueError, match="audit_log"):
        initialised(ImageClassifierHandler, tmp_path, config(tmp_path, monitor={"fraction": 0.5}))
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        initialised(ImageClassifierHandler, tmp_path, config(tmp_path, audit_log=str(tmp_path / "a.jsonl"),
                                                             monitor={"fraction": 2}))
    with pytest.raises(ValueError, match="no_such_layer"):
        initialised(ImageClassifierHandler, tmp_path, config(tmp_path, audit_log=str(tmp_path / "b.jsonl"),
                                                             monitor={"method": "gradcam", "layer": "no_such_layer"}))


def test_embedding_records_carry_the_pair_summaries(tmp_path):
    model_config = {"handler": {"audit_log": str(tmp_path / "embed.jsonl")}}
    handler, context = initialised(EmbeddingHandler, tmp_path, model_config, name="effnet_lite0_embed")
    try:
        mirrored = Image.open(SAMPLES / PHOTOS[0]).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        mirrored.save(buffer, format="PNG")
        (answer,) = handle(handler, context, [{"image": photo_bytes(PHOTOS[0]), "reference": buffer.getvalue()}])
    finally:
        handler.audit.close()
    (record,) = records(tmp_path / "embed.jsonl")
    query, reference = record["summaries"]
    assert (query["target"], reference["target"]) == ("query", "reference")
    # a photograph and its mirror: the maps' centroids mirror each other
    assert query["centroid"][0] == pytest.approx(1 - reference["centroid"][0], abs=0.05)
    assert json.loads(answer)["similarity"] > 0.9
