"""Quick modes of `camserve evaluate` and `camserve bench` run end to end and write their files."""

from __future__ import annotations

import csv
import json

from camserve.cli.main import main


def test_evaluate_quick_writes_every_output(tmp_path):
    out = tmp_path / "eval"
    code = main(["evaluate", "--limit", "2", "--steps", "8", "--layers", "_blocks.2", "--methods",
                 "shallowcam,layercam,random", "--batch-size", "28", "--no-progress", "--out", str(out)])
    assert code == 0
    for name in ("faithfulness.csv", "faithfulness.json", "faithfulness.md", "faithfulness_bars.png",
                 "faithfulness_curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "faithfulness.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {"shallowcam[grad]", "shallowcam[grad+refine]", "shallowcam[rel]", "shallowcam[rel+refine]",
                       "layercam", "random"}
    assert all(r["layer"] == "_blocks.2" and int(r["n"]) == 2 for r in rows)
    for r in rows:
        assert 0.0 <= float(r["deletion_auc"]) <= 1.0 and 0.0 <= float(r["insertion_auc"]) <= 1.0
        assert abs(float(r["overall"]) - (float(r["insertion_auc"]) - float(r["deletion_auc"]))) < 1e-6
    data = json.loads((out / "faithfulness.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["steps"] == 8
    assert all(len(m["mean_deletion_curve"]) == 9 for m in data["per_map"])
    assert "| _blocks.2 |" in (out / "faithfulness.md").read_text()


def test_bench_quick_writes_ratios(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "cost_quick.json").read_text())
    cases = {(r["case"], r["batch"]): r for r in data["timings"]}
    assert cases[("plain inference", 1)]["ratio"] == 1.0
    assert ("camserve shallowcam[grad] @_blocks.2", 2) in cases
    assert ("camserve fam (pooled), 8 pairs", 8) in cases
    assert all(r["median_s"] > 0 and r["ratio"] > 0 for r in data["timings"])
    assert data["memory"]["plain inference"]["peak_mib"] > 0
    assert "ratio" in data["memory"]["camserve shallowcam[grad] @_blocks.2"]
    assert "plain inference" in (out / "cost_quick.md").read_text()
