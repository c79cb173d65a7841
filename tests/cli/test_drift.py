"""``camserve drift`` on the committed fixture of REAL maps (tests/fixtures/drift, written once by its
make_fixture.py: the bundled EfficientNet-Lite0, Grad-CAM at ``_conv_head``, on the shared ImageNet
photographs): the no-shift pair passes, the corner-patch pair fails; the JSON, the self-contained
HTML; bad input (torn lines, another model, an empty window, a malformed span) gives a clear
message and loses nothing; the statistics match their definitions; the online RollingDrift."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import false_discovery_control

from camserve.cli.main import main
from camserve.ops.drift import (ALPHA, MIN_SAMPLES, DriftSettings, RollingDrift, benjamini_hochberg, compare_window,
                                median_bandwidth, permutation_mmd, squared_distances)
from camserve.ops.drift_records import read_rows

from conftest import SAMPLES, sample_rows

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "drift"
REFERENCE, SAME, SHIFTED = (FIXTURE / f"{n}.jsonl" for n in ("reference", "current_same", "current_shifted"))


def drift(*args) -> int:
    return main(["drift", *[str(a) for a in args], "--quiet"])


def read_json(folder: Path) -> dict:
    return json.loads((folder / "drift.json").read_text())


def test_fixture_is_small_and_real():
    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert total < 1_000_000
    for path in (REFERENCE, SAME, SHIFTED):
        rows = read_rows(path)
        assert len(rows) == 200 and set(rows.method) == {"gradcam"} and set(rows.layer) == {"_conv_head"}
        assert rows.grids.shape == (200, 16, 16) and 0 <= rows.grids.min() and rows.grids.max() <= 1


def test_no_shift_pair_passes(tmp_path):
    assert drift("--reference", REFERENCE, "--current", SAME, "--out", tmp_path) == 0
    body = read_json(tmp_path)
    assert body["verdict"] == "no drift" and body["exit_code"] == 0
    (window,) = body["streams"][0]["windows"]
    groups = {g["name"]: g for g in window["groups"]}
    assert groups["overall"]["status"] == "no drift" and groups["overall"]["q"] > ALPHA
    # one photograph per ImageNet class: every class is below the minimum and reported, not tested
    classes = [g for name, g in groups.items() if name != "overall"]
    assert len(classes) > 100 and {g["status"] for g in classes} == {"too few"}
    assert body["settings"]["min_samples"] == MIN_SAMPLES


def test_shifted_pair_fails_with_a_self_contained_report(tmp_path):
    assert drift("--reference", REFERENCE, "--current", SHIFTED, "--out", tmp_path) == 1
    body = read_json(tmp_path)
    assert body["verdict"] == "drift" and body["exit_code"] == 1
    window = body["streams"][0]["windows"][0]
    overall = next(g for g in window["groups"] if g["name"] == "overall")
    assert overall["status"] == "drift" and overall["q"] <= ALPHA
    assert overall["p_mmd"] <= 0.01 and overall["p_statistics"] <= 0.01
    assert set(overall["statistics"]) >= {"centroid_x", "border_mass", "entropy"}
    assert "prediction_drift" in window and "confidence_drift" in window
    page = (tmp_path / "drift.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) >= 4 + 6
    assert not re.search(r'(src|href)="(https?:|//|/)', page) and "<script" not in page
    assert "reference mean" in page and "difference" in page and "Drift scores over time" in page


def test_per_class_groups_use_bh_over_tested_classes():
    """Real maps grouped into 3 coarse "classes" (predicted index mod 3): each class is tested, its q is
    the BH adjustment of the tested groups' p-values, and the verdict follows q ≤ α."""
    reference, current = read_rows(REFERENCE), read_rows(SHIFTED)
    reference.predicted, current.predicted = reference.predicted % 3, current.predicted % 3
    result = compare_window(reference, current, DriftSettings(permutations=300))
    tested = [g for g in result.groups if g.status != "too few"]
    assert [g.name for g in tested] == ["overall", "0", "1", "2"]
    assert np.allclose([g.q for g in tested], benjamini_hochberg([g.p for g in tested]))
    assert all((g.status == "drift") == (g.q <= ALPHA) for g in tested)
    assert result.verdict == "drift"
    few = compare_window(reference, current, DriftSettings(permutations=50, min_samples=1000))
    assert few.verdict == "too few" and all(g.status == "too few" for g in few.groups)


def test_torn_and_non_json_lines_are_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "audit.jsonl"
    lines = SAME.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:100]) + "not json at all\n" + "".join(lines[100:]) + lines[0][: len(lines[0]) // 2])
    assert drift("--reference", REFERENCE, "--current", log, "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "skipped 2 torn or non-JSON line(s)" in err
    current = read_json(tmp_path / "out")["inputs"][1]
    assert current["records"] == 200 and current["rows"] == 200  # every complete record was read
    assert current["skipped"]["torn_or_not_json_lines"] == 2


def test_another_model_is_a_clear_error(tmp_path, capsys):
    assert drift("--reference", REFERENCE, "--current", SAME, "--model", "resnet50") == 2
    err = capsys.readouterr().err
    assert "no record of model 'resnet50'" in err and "'effnet_lite0' (200 records)" in err

    mixed = tmp_path / "mixed.jsonl"
    other = [json.loads(line) for line in SAME.read_text().splitlines()[:30]]
    mixed.write_text(SAME.read_text() + "".join(json.dumps(dict(r, model="cifar_resnet20")) + "\n" for r in other))
    assert drift("--reference", REFERENCE, "--current", mixed) == 0  # the reference's model is chosen
    assert drift("--reference", mixed, "--current", SAME) == 2
    assert "several models" in capsys.readouterr().err
    assert drift("--reference", mixed, "--current", SAME, "--model", "effnet_lite0") == 0


def test_empty_window_and_bad_spans_are_clear_errors(tmp_path, capsys):
    assert drift("--reference", REFERENCE, "--reference-window", "500") == 2
    assert "current window is empty" in capsys.readouterr().err
    assert drift("--reference", REFERENCE, "--reference-window", "30d") == 2
    assert "current window is empty" in capsys.readouterr().err
    assert drift("--reference", REFERENCE) == 2
    assert "needs --reference-window" in capsys.readouterr().err
    assert drift("--reference", REFERENCE, "--current", SAME, "--window", "5x") == 2
    assert "give a duration like" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert drift("--reference", REFERENCE, "--current", empty) == 2
    assert "no JSON record" in capsys.readouterr().err
    assert drift("--reference", REFERENCE, "--current", tmp_path / "missing") == 2


def test_one_log_cut_into_reference_and_windows(tmp_path):
    """One audit log: the reference week, then the shifted records a week later in two count windows."""
    log = tmp_path / "audit.jsonl"
    log.write_text(REFERENCE.read_text() + SHIFTED.read_text())
    assert drift("--reference", log, "--reference-window", "3d", "--window", "100", "--out", tmp_path / "o") == 1
    windows = read_json(tmp_path / "o")["streams"][0]["windows"]
    assert [w["n_current"] for w in windows] == [100, 100] and all(w["n_reference"] == 200 for w in windows)
    assert windows[0]["start"].startswith("2026-01-12") and all(w["verdict"] == "drift" for w in windows)


def test_batch_records_are_read(tmp_path):
    """A ``camserve batch`` output folder (records.jsonl with model {name, version}, finished_at, status):
    failed records are counted, not compared."""
    out = tmp_path / "run"
    out.mkdir()
    lines = []
    for line in SHIFTED.read_text().splitlines():
        r = json.loads(line)
        lines.append({"key": "k", "finished_at": r["time"], "model": {"name": r["model"], "version": "1.0"},
                      "settings_id": r["settings_id"], "status": "done", "topk": r["topk"], "method": "gradcam",
                      "layer": "_conv_head", "summaries": r["summaries"]})
    lines.append({"key": "bad", "finished_at": lines[0]["finished_at"], "model": lines[0]["model"], "status": "failed",
                  "error": "cannot decode"})
    (out / "images").mkdir()
    with Image.open(SAMPLES / sample_rows()[0]["file"]) as photo:  # a real photograph as every record's overlay
        photo.convert("RGB").resize((128, 96)).save(out / "images" / "overlay.png")
    for r in lines[:-1]:
        r["overlays"] = ["images/overlay.png"]
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert drift("--reference", REFERENCE, "--current", out, "--out", tmp_path / "o") == 1
    current = read_json(tmp_path / "o")["inputs"][1]
    assert current["rows"] == 200 and current["skipped"]["failed_records"] == 1
    page = (tmp_path / "o" / "drift.html").read_text()
    assert page.count('alt="image"') == 6  # the moved records shown with their overlay beside the grid


def test_mmd_and_bh_match_their_definitions():
    rows = read_rows(REFERENCE)
    x, y = rows.grids[:60].reshape(60, -1), rows.grids[60:110].reshape(50, -1)
    sigma2 = median_bandwidth(x)
    kernel = lambda a, b: np.exp(-squared_distances(a, b) / (2 * sigma2))  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (50 * 49) - 2 * kxy.mean())
    result = permutation_mmd(x, y, np.random.default_rng(0), permutations=200)
    assert result["mmd2"] == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert 1 / 201 <= result["p"] <= 1
    same = np.repeat(rows.grids[:1].reshape(1, -1), 80, axis=0)  # one image requested 80 times
    assert permutation_mmd(same[:50], same[50:], np.random.default_rng(0), permutations=200)["p"] == 1.0
    p = np.random.default_rng(1).random(30) ** 3
    assert np.allclose(benjamini_hochberg(p), false_discovery_control(p))


def test_rolling_drift_scores_same_low_and_shifted_high():
    reference = read_rows(REFERENCE).grids
    rolling = RollingDrift(reference, window=200, permutations=200)
    assert np.isnan(rolling.score())
    for grid in read_rows(SAME).grids:  # the photographs are in class order: a whole window mixes like the reference
        rolling.add(grid)
    same = rolling.score()
    for grid in read_rows(SHIFTED).grids:
        rolling.add(grid)
    assert len(rolling) == 200
    shifted = rolling.score()
    assert 0.0 <= same < 0.95 <= shifted <= 1.0 and rolling.p_value == pytest.approx(1 - shifted)


def test_embedding_records_compare_the_query_maps(tmp_path):
    """Embedding audit records (``topk`` null, a ``query`` and a ``reference`` map, a similarity): the
    query maps are compared overall; no class, no prediction or confidence test; the JSON is valid."""
    def embedding_log(source: Path, name: str) -> Path:
        path = tmp_path / name
        lines = []
        for line in source.read_text().splitlines():
            r = json.loads(line)
            query = dict(r["summaries"][0], method="fam", layer="pooled", target="query")
            lines.append(dict(r, kind="embedding", topk=None, similarity=0.5,
                              summaries=[query, dict(query, target="reference")]))
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return path

    reference, shifted = embedding_log(REFERENCE, "ref.jsonl"), embedding_log(SHIFTED, "cur.jsonl")
    assert drift("--reference", reference, "--current", shifted, "--out", tmp_path / "o") == 1
    body = read_json(tmp_path / "o")
    assert body["inputs"][1]["rows"] == 200 and body["inputs"][1]["skipped"]["maps_of_other_targets"] == 200
    (window,) = body["streams"][0]["windows"]
    assert [g["name"] for g in window["groups"]] == ["overall"] and window["groups"][0]["status"] == "drift"
    assert window["prediction_drift"]["p"] is None and window["confidence_drift"]["p"] is None
