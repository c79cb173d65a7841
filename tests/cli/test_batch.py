"""``camserve batch`` on real photographs: outputs, a corrupt file, interruption and resume without redo."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from camserve.cli.batch_steps import placed_overlay
from camserve.cli.main import main
from camserve.cli.records import RecordStore

from conftest import SAMPLES

PHOTOS = 10
SETTINGS = ["--model", "effnet_lite0", "--method", "gradcam", "--layer", "_conv_head", "--quiet"]


@pytest.fixture()
def photo_folder(tmp_path, samples):
    """10 shared photographs and one truncated JPEG (sorted last), copied to a temporary folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for row in samples[:PHOTOS]:
        shutil.copy(SAMPLES / row["file"], folder / row["file"])
    data = (SAMPLES / samples[0]["file"]).read_bytes()
    (folder / "zz_corrupt.jpg").write_bytes(data[: len(data) // 3])
    return folder


def read_lines(path: Path):
    return path.read_text().splitlines()


def output_mtimes(out: Path):
    return {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}


def test_batch_resumes_without_redoing_work(photo_folder, tmp_path, capsys):
    out = tmp_path / "out"
    # 1) a run cut short after 5 images (the first two batches of 4 and 1)
    assert main(["batch", str(photo_folder), "--out", str(out), "--batch-size", "4", "--limit", "5", *SETTINGS]) == 0
    first = [json.loads(line) for line in read_lines(out / "records.jsonl")]
    assert len(first) == 5 and all(r["status"] == "done" for r in first)
    for r in first:
        assert r["model"]["name"] == "effnet_lite0" and r["model"]["version"].startswith("efficientnet-lite0")
        assert (r["method"], r["layer"], r["target"]) == ("gradcam", "_conv_head", "top1")
        assert r["targets"] == [r["topk"][0]["index"]] and len(r["topk"]) == 5
        # the servers' vocabulary: {index, label, score}, best first, labels from ImageNet's names
        assert all(set(p) == {"index", "label", "score"} for p in r["topk"])
        assert r["topk"][0]["label"] == r["target_names"][0] and 0 < r["topk"][0]["score"] <= 1
        assert [p["score"] for p in r["topk"]] == sorted((p["score"] for p in r["topk"]), reverse=True)
        assert r["sha256"] == __import__("hashlib").sha256(Path(r["input"]).read_bytes()).hexdigest()
        for rel in r["heatmaps"] + r["overlays"] + [r["thumbnail"]]:
            assert (out / rel).stat().st_size > 0
        assert r["seconds"]["per_image"] > 0
        (summary,) = r["summaries"]  # the map's summary, for `camserve drift`
        assert (summary["method"], summary["layer"], summary["target"]) == ("gradcam", "_conv_head", r["targets"][0])
        assert len(summary["grid"]) == 344 and 0 < summary["entropy"] <= 1
    mtimes = output_mtimes(out)
    capsys.readouterr()

    # 2) the resumed run does the other 5, records the corrupt file as failed and keeps going
    assert main(["batch", str(photo_folder), "--out", str(out), "--batch-size", "4", *SETTINGS]) == 0
    summary = capsys.readouterr().out
    assert "done 5, skipped 5" in summary and "failed 1" in summary
    lines = read_lines(out / "records.jsonl")
    assert len(lines) == PHOTOS + 1
    assert [json.loads(line) for line in lines[:5]] == first  # earlier records untouched
    new_mtimes = output_mtimes(out)
    assert all(new_mtimes[name] == t for name, t in mtimes.items())  # earlier images not rewritten
    records = [json.loads(line) for line in lines]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["input"].endswith("zz_corrupt.jpg")
    assert "not a decodable image" in failed[0]["error"] and "truncated" in failed[0]["error"]
    assert len({r["key"] for r in records}) == PHOTOS + 1

    # 3) nothing left to do; the report lists every photo and the failure
    assert main(["batch", str(photo_folder), "--out", str(out), *SETTINGS]) == 0
    assert "done 0, skipped 11" in capsys.readouterr().out
    assert read_lines(out / "records.jsonl") == lines
    report = (out / "report.html").read_text()
    assert report.count('class="card"') == PHOTOS and "zz_corrupt.jpg" in report

    # 4) other settings are other work: a different layer redoes the photos under a new settings id
    assert main(["batch", str(photo_folder), "--out", str(out), "--limit", "2",
                 *[s if s != "_conv_head" else "_blocks.15" for s in SETTINGS]]) == 0
    assert "done 2, skipped 0" in capsys.readouterr().out


def test_interrupted_run_keeps_finished_batches(photo_folder, tmp_path):
    """SIGTERM (handled like Ctrl-C) right after the first batch is recorded: finished batches stay
    recorded, the resume does the rest, once. (SIGINT would be ignored in a background job.)"""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "camserve.cli.main", "batch", str(photo_folder), "--out", str(out),
           "--batch-size", "2", *SETTINGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    records = out / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.stat().st_size > 0:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=120)
    lines = read_lines(records)
    assert all(json.loads(line)["key"] for line in lines)  # whole lines only
    # 4 more batches were left when the signal came: the run must have stopped early
    assert proc.returncode == 130 and "INTERRUPTED" in output, output
    assert 2 <= len(lines) < PHOTOS + 1
    before = len(lines)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = read_lines(records)
    keys = [json.loads(line)["key"] for line in lines]
    assert len(lines) == PHOTOS + 1 and len(set(keys)) == len(keys)
    assert f"skipped {before}" in resumed.stdout


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path)
    store.append([{"key": "a", "status": "done"}, {"key": "b", "status": "failed"}])
    with open(path, "a") as f:
        f.write('{"key": "c", "sta')  # a crash in the middle of a write
    reopened = RecordStore(path)
    assert [r["key"] for r in reopened.records] == ["a", "b"] and reopened.dropped_lines == 1
    reopened.append([{"key": "c", "status": "done"}])
    assert [json.loads(line)["key"] for line in read_lines(path)] == ["a", "b", "c"]


def test_overlay_places_the_map_in_the_crop_box():
    image = torch.full((3, 40, 60), 200, dtype=torch.uint8)
    heat = torch.ones(8, 8)  # maximal everywhere → the colormap's top colour inside the box
    out = placed_overlay(image, heat, [10, 5, 50, 35], "jet", 0.5, max_side=512)
    assert out.shape == (40, 60, 3)
    outside = out[0, 0]
    assert torch.allclose(outside, torch.full((3,), 0.55 * 200 / 255))
    inside = out[20, 30]
    assert inside[0] > inside[2] + 0.2  # jet's hot end is red
    small = placed_overlay(image, heat, [10, 5, 50, 35], "jet", 0.5, max_side=30)
    assert max(small.shape[:2]) == 30


def test_parquet_records(tmp_path):
    import pyarrow.parquet as pq  # requirements-extras.txt (run_tests.sh installs it): missing must fail, not skip

    store = RecordStore(tmp_path / "records.jsonl")
    store.append([{"key": "a", "status": "done", "target": "top1", "topk": [{"index": 1, "label": "b", "score": 0.5}]},
                  {"key": "b", "status": "failed", "target": 3, "error": "x"}])
    path = store.write_parquet()
    assert path is not None and path.exists(), "write_parquet wrote nothing although pyarrow imports"
    table = pq.read_table(path)
    assert table.num_rows == 2 and set(table.column_names) >= {"key", "status", "topk", "error"}
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["a"]["status"] == "done" and rows["b"]["error"] == "x" and rows["a"]["error"] is None
    assert json.loads(rows["a"]["topk"]) == [{"index": 1, "label": "b", "score": 0.5}]  # nested fields as JSON text
    assert {json.loads(rows["a"]["target"]), json.loads(rows["b"]["target"])} == {"top1", 3}  # mixed types too


def test_records_of_earlier_versions_are_read_in_the_servers_vocabulary(tmp_path):
    """A run resumed over a ``records.jsonl`` of an earlier version (top-k as ``{class, name, prob}``)
    reads those records as ``{index, label, score}``: the report and the Parquet file see one vocabulary."""
    from camserve.cli.report import render_report

    path = tmp_path / "records.jsonl"
    old = {"key": "old", "status": "done", "input": "/x/old.jpg", "thumbnail": "t.jpg", "overlays": ["o.png"],
           "topk": [{"class": 1, "name": "goldfish", "prob": 0.75}, {"class": 2, "name": "shark", "prob": 0.125}]}
    new = {"key": "new", "status": "done", "input": "/x/new.jpg", "thumbnail": "t.jpg", "overlays": ["o.png"],
           "topk": [{"index": 1, "label": "goldfish", "score": 0.5}]}
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    store = RecordStore(path)
    by_key = store.latest_by_key()
    assert by_key["old"]["topk"] == [{"index": 1, "label": "goldfish", "score": 0.75},
                                     {"index": 2, "label": "shark", "score": 0.125}]
    assert by_key["new"] == new  # already in the vocabulary: as it was
    assert json.loads(path.read_text().splitlines()[0]) == old  # the file itself is not rewritten
    html = render_report(store.records, {})
    assert 'data-cls="goldfish" data-conf="0.750000"' in html and 'data-conf="0.500000"' in html
    assert 'title="shark (class 2)"' in html and "12.5%" in html
    assert '<option value="goldfish">goldfish (2)</option>' in html  # both runs' records in one class


def test_scores(photo_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", str(photo_folder), "--out", str(out), "--limit", "2", "--scores",
                 "--score-steps", "4", *SETTINGS]) == 0
    records = [json.loads(line) for line in read_lines(out / "records.jsonl")]
    for r in records:
        s = r["scores"]
        assert 0 <= s["deletion_auc"] <= 1 and 0 <= s["insertion_auc"] <= 1 and s["steps"] == 4


def test_bad_layer_stops_the_run_with_the_engines_message(photo_folder, tmp_path):
    with pytest.raises(SystemExit, match="nope"):
        main(["batch", str(photo_folder), "--out", str(tmp_path / "o2"), "--model", "effnet_lite0",
              "--layer", "nope", "--quiet"])
