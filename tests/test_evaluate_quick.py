"""Quick modes of `camserve evaluate` and `camserve bench` run end to end and write their files."""

from __future__ import annotations

import csv
import json

import pytest

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
    bases = {(r["group"], r["batch"]): r for r in data["timings"] if r["case"].startswith("plain ")}
    assert ("classifier", 1) in bases and ("embedding", 8) in bases
    for r in data["timings"]:  # every ratio is its case's median over its group's plain run, same batch and run
        assert r["ratio"] == pytest.approx(r["median_s"] / bases[(r["group"], r["batch"])]["median_s"], rel=1e-9)
    assert ("camserve shallowcam[grad] @_blocks.2", 2) in cases
    assert ("camserve fam (pooled), 8 pairs", 8) in cases
    assert all(r["median_s"] > 0 and r["ratio"] > 0 for r in data["timings"])
    assert data["memory"]["plain inference"]["peak_mib"] > 0
    assert "ratio" in data["memory"]["camserve shallowcam[grad] @_blocks.2"]
    assert "plain inference" in (out / "cost_quick.md").read_text()


def test_evaluate_faithfulness_quick_cifar_resnet(tmp_path):
    """The issue-15 protocol end to end on the CIFAR ResNet-20, 6 images of the choose half: both
    deletion baselines, 16 steps, paired differences vs LayerCAM, the class-sensitivity checks and
    the model-randomisation test, for LayerCAM, two Shallow-CAM readings and the random floor."""
    from camserve.cli.evaluate_faithfulness import main as evaluate_faithfulness

    out = tmp_path / "faith"
    code = evaluate_faithfulness(["--model", "cifar-resnet", "--depth", "20", "--half", "choose", "--limit", "6",
                                  "--layers", "layer1,layer2", "--methods", "layercam,sc,sc[grad+one],sc[grad+pos],random",
                                  "--out", str(out), "--stem", "q"])
    assert code == 0
    data = json.loads((out / "q.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["steps"] == 16 and data["meta"]["images"] == 6
    assert "even positions = choose half" in data["meta"]["split"]
    rows = {(r["layer"], r["method"]): r for r in data["summary"]}
    assert len(rows) == 10
    for r in rows.values():
        assert r["n"] == 6
        assert -1.0 <= r["overall0"] <= 1.0 and -1.0 <= r["overallB"] <= 1.0
        assert -1.0 <= r["rho12"] <= 1.0 and -1.0 <= r["rho_rand_all"] <= 1.0
    per = {(r["layer"], r["method"]): r for r in data["per_image"]}
    for key, r in per.items():
        for i in range(6):  # overall = insertion − deletion, per image and per deletion baseline
            assert r["overall0"][i] == pytest.approx(r["ins"][i] - r["del0"][i], abs=1e-6)
            assert r["overallB"][i] == pytest.approx(r["ins"][i] - r["delB"][i], abs=1e-6)
        assert len(r["mean_curves"]["deletion_blur"]) == 17
    # β ≡ 1 with gradient spatial weights is LayerCAM exactly: the paired difference is 0, all ties
    for layer in ("layer1", "layer2"):
        assert per[(layer, "sc[grad+one]")]["overall0"] == pytest.approx(per[(layer, "layercam")]["overall0"], abs=1e-6)
        same = [c for c in data["paired"] if c["layer"] == layer and c["method"] == "sc[grad+one]"]
        assert all(c["ties"] == 6 for c in same)
        assert rows[(layer, "random")]["rho12"] < 0.2       # two independent random maps barely correlate
    assert "| layercam |" in (out / "q.md").read_text() and (out / "q.csv").stat().st_size > 0
