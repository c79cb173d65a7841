"""``camserve batch --task embed --gallery``: an embedding model's gallery matches explained over a
folder, locally and on a real local Ray cluster, with the bundled EfficientNet-Lite0 features and a
gallery written by ``camserve gallery`` from the shared photographs."""

from __future__ import annotations

import shutil

import pytest
import torch

from camserve.cli.main import main
from camserve.cli.records import RecordStore

from conftest import SAMPLES
from test_batch_ray import no_leftover_ray, records  # noqa: F401  (a fixture, used by name)

GALLERY_ITEMS = 4
QUERIES = 6


@pytest.fixture(scope="module")
def gallery_file(tmp_path_factory):
    """A 4-item retrieval gallery (embeddings, labels, float16 maps) of evenly spaced shared photographs."""
    path = tmp_path_factory.mktemp("gallery") / "gallery.npz"
    assert main(["gallery", str(SAMPLES), str(path), "--count", str(GALLERY_ITEMS)]) == 0
    return path


@pytest.fixture()
def query_folder(tmp_path, samples):
    """Six photographs (the first is the gallery's first item itself) and a truncated JPEG."""
    folder = tmp_path / "in"
    folder.mkdir()
    for row in samples[:QUERIES]:
        shutil.copy(SAMPLES / row["file"], folder / row["file"])
    data = (SAMPLES / samples[1]["file"]).read_bytes()
    (folder / "zz_corrupt.jpg").write_bytes(data[: len(data) // 3])
    return folder


def run(*argv):
    return main(["batch", *map(str, argv), "--quiet"])


def test_gallery_matches_explained_and_resumed(gallery_file, query_folder, tmp_path, samples, capsys):
    out = tmp_path / "out"
    assert run(query_folder, "--out", out, "--task", "embed", "--gallery", gallery_file, "--target", "top2",
               "--batch-size", "4") == 0
    summary = capsys.readouterr().out
    assert f"done {QUERIES}, skipped 0" in summary and "failed 1" in summary
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in RecordStore(out / "records.jsonl").records}
    assert rows["zz_corrupt.jpg"]["status"] == "failed" and rows["zz_corrupt.jpg"]["error"]
    gallery_labels = {samples[i]["name"] for i in range(0, len(samples), len(samples) // GALLERY_ITEMS)}
    for name, r in rows.items():
        if r["status"] != "done":
            continue
        assert (r["method"], r["layer"], r["target"]) == ("fam", "", "top2")
        assert r["model"]["version"].startswith("efficientnet-lite0") and "+gallery:" in r["model"]["version"]
        # the matches in the servers' vocabulary: {index: gallery item, label, score: similarity}, best first
        assert len(r["topk"]) == 2 and r["targets"] == [m["index"] for m in r["topk"]]
        assert [m["label"] for m in r["topk"]] == r["target_names"] and set(r["target_names"]) <= gallery_labels
        assert r["topk"][0]["score"] >= r["topk"][1]["score"]
        assert len(r["heatmaps"]) == len(r["overlays"]) == 2
        for rel in r["heatmaps"] + r["overlays"] + [r["thumbnail"]]:
            assert (out / rel).stat().st_size > 0
        assert r["layer"] == "" and r["summaries"]
    # the gallery's first photograph finds itself first, with cosine ≈ 1
    own = rows[samples[0]["file"]]
    assert own["targets"][0] == 0 and own["topk"][0]["score"] > 0.999
    assert (out / "report.html").read_text().count('class="card"') == QUERIES

    # a second run redoes nothing; a different gallery is a different settings id (new work)
    assert run(query_folder, "--out", out, "--task", "embed", "--gallery", gallery_file, "--target", "top2") == 0
    assert f"done 0, skipped {QUERIES + 1}" in capsys.readouterr().out
    other = tmp_path / "other.npz"
    assert main(["gallery", str(SAMPLES), str(other), "--count", "3"]) == 0
    capsys.readouterr()
    assert run(query_folder, "--out", out, "--gallery", other, "--target", "top1", "--limit", "2") == 0
    assert "done 2, skipped 0" in capsys.readouterr().out  # --gallery alone means an embedding run


def test_fam_at_a_shallow_layer_and_gradcam_similarity(gallery_file, query_folder, tmp_path):
    out = tmp_path / "shallow"
    assert run(query_folder, "--out", out, "--gallery", gallery_file, "--layer", "stage3", "--limit", "2") == 0
    done = [r for r in RecordStore(out / "records.jsonl").records if r["status"] == "done"]
    assert len(done) == 2 and {r["layer"] for r in done} == {"_blocks.4"}  # stage3, resolved
    heat = (out / done[0]["heatmaps"][0]).read_bytes()
    assert heat[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "grad"
    assert run(query_folder, "--out", out, "--gallery", gallery_file, "--method", "gradcam_similarity",
               "--option", "similarity=dot", "--limit", "1") == 0
    (r,) = [r for r in RecordStore(out / "records.jsonl").records if r["status"] == "done"]
    assert r["method"] == "gradcam_similarity" and r["options"] == {"similarity": "dot"}


def test_fewshot_prototypes_classify_each_image_against_the_gallery(gallery_file, query_folder, tmp_path, samples):
    """``--method prototypes``: the gallery's labels are the classes (one shot each here); every image's
    ``topk`` ranks them by nearest-centroid score, its map is the query's against the winning prototype."""
    out = tmp_path / "fewshot"
    assert run(query_folder, "--out", out, "--gallery", gallery_file, "--method", "prototypes", "--target", "top3",
               "--batch-size", "4") == 0
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in RecordStore(out / "records.jsonl").records}
    gallery_labels = [samples[i]["name"] for i in range(0, len(samples), len(samples) // GALLERY_ITEMS)][:GALLERY_ITEMS]
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == QUERIES and rows["zz_corrupt.jpg"]["status"] == "failed"
    for r in done:
        assert r["method"] == "prototypes" and len(r["topk"]) == 3 and len(r["heatmaps"]) == 1
        assert r["targets"] == [r["topk"][0]["index"]] and r["target_names"] == [r["topk"][0]["label"]]
        assert [m["label"] for m in r["topk"]] == [gallery_labels[m["index"]] for m in r["topk"]]
        assert r["topk"][0]["score"] >= r["topk"][1]["score"] >= r["topk"][2]["score"]
    # the gallery's first photograph is its class's only shot: it is classified as that class
    assert rows[samples[0]["file"]]["target_names"] == [gallery_labels[0]]
    # --layer: the same classes and scores, the map against the winning prototype at that stage
    deep = tmp_path / "fewshot-deep"
    assert run(query_folder, "--out", deep, "--gallery", gallery_file, "--method", "prototypes", "--target", "top3",
               "--layer", "stage3", "--limit", "2") == 0
    deeper = [r for r in RecordStore(deep / "records.jsonl").records if r["status"] == "done"]
    assert len(deeper) == 2
    for r in deeper:
        mine = rows[r["input"].rsplit("/", 1)[-1]]
        assert r["layer"] == "_blocks.4" and r["topk"] == mine["topk"]
        assert (deep / r["heatmaps"][0]).read_bytes() != (out / mine["heatmaps"][0]).read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--task", "embed"], "give --gallery"),
    (["--gallery", "GALLERY", "--target", "3"], "--target must be topK"),
    (["--gallery", "GALLERY", "--option", "alpha=2"], "not a FAM option"),
    (["--gallery", "GALLERY", "--method", "shallowcam"], "not an embedding method"),
    (["--gallery", "GALLERY", "--scores"], "--scores"),
    (["--gallery", "GALLERY", "--layer", "no.such.layer"], "no.such.layer"),
    (["--gallery", "GALLERY", "--target", "top9"], "9"),
    (["--gallery", "GALLERY", "--method", "prototypes", "--option", "similarity=dot"], "drop --option"),
    (["--gallery", "GALLERY", "--method", "prototypes", "--layer", "stage99"], "stage99"),
])
def test_refusals_name_the_problem(gallery_file, query_folder, tmp_path, extra, message):
    extra = [str(gallery_file) if x == "GALLERY" else x for x in extra]
    with pytest.raises(SystemExit) as stopped:
        run(query_folder, "--out", tmp_path / "o", *extra)
    assert message in str(stopped.value)


def test_ray_gives_the_local_runs_matches(gallery_file, query_folder, tmp_path, capsys, no_leftover_ray):  # noqa: F811
    settings = ["--gallery", gallery_file, "--target", "top2", "--batch-size", "4"]
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert run(query_folder, "--out", local, *settings) == 0
    threads = str(torch.get_num_threads())
    assert run(query_folder, "--out", distributed, *settings, "--ray", "--workers", "1",
               "--cpus-per-worker", threads) == 0
    assert f"done {QUERIES}, skipped 0" in capsys.readouterr().out
    mine, theirs = ({r["key"]: r for r in records(out)} for out in (local, distributed))
    assert mine.keys() == theirs.keys() and len(mine) == QUERIES + 1
    for key, a in mine.items():
        b = theirs[key]
        assert b["backend"].startswith("ray:") and a["status"] == b["status"]
        assert a.get("targets") == b.get("targets") and a.get("target_names") == b.get("target_names")
        for x, y in zip(a.get("topk", []), b.get("topk", [])):
            assert abs(x["score"] - y["score"]) < 1e-4


def test_ray_gives_the_local_runs_prototypes(gallery_file, query_folder, tmp_path, capsys, no_leftover_ray):  # noqa: F811
    """``--method prototypes`` on a real local Ray cluster: the same classes, scores and targets as local."""
    settings = ["--gallery", gallery_file, "--method", "prototypes", "--target", "top2", "--limit", "3"]
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert run(query_folder, "--out", local, *settings) == 0
    assert run(query_folder, "--out", distributed, *settings, "--ray", "--workers", "1", "--cpus-per-worker",
               str(torch.get_num_threads())) == 0
    mine, theirs = ({r["key"]: r for r in records(out)} for out in (local, distributed))
    assert mine.keys() == theirs.keys() and len(mine) == 3
    for key, a in mine.items():
        b = theirs[key]
        assert b["backend"].startswith("ray:") and a["status"] == b["status"] == "done"
        assert a["target_names"] == b["target_names"] and [m["label"] for m in a["topk"]] == [m["label"] for m in b["topk"]]
        assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a["topk"], b["topk"]))
