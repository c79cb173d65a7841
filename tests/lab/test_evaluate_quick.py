"""Quick modes of `camserve evaluate` and `camserve bench` run end to end and write their files,
on the bundled EfficientNet-Lite0 and on user model specs (the flags of `camserve archive`)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from camserve.cli.main import main
from conftest import REPO, SHARED, sample_rows

CIFAR = SHARED / "data" / "cifar10-test"
RESNET20 = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR_RESNET20 = ["--source", "eager", "--model-file", str(REPO / "examples" / "cifar_resnet" / "model.py"),
                  "--class-name", "CifarResNet", "--kwargs", '{"depth": 20}', "--weights", str(RESNET20),
                  "--preprocess", "crop=32"]


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
    from camserve.lab.evaluate_faithfulness import main as evaluate_faithfulness

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


def test_image_rows_interleave_class_folders():
    """A class-folder data set is read class-interleaved (a balanced sample for --stride/--limit),
    class index = sorted folder position; a LABELS.tsv folder keeps its rows."""
    from camserve.lab.image_folders import default_data_dir, image_rows

    rows = image_rows(CIFAR, stride=1, limit=20)
    assert [r["file"] for r in rows[:10]] == [f"{c}/0000.jpg" for c in CIFAR_CLASSES]
    assert [r["file"] for r in rows[10:]] == [f"{c}/0002.jpg" for c in CIFAR_CLASSES]
    assert [int(r["class_index"]) for r in rows[:10]] == list(range(10))
    assert [r["file"] for r in image_rows(CIFAR, stride=10, limit=3)] == [
        "airplane/0000.jpg", "airplane/0002.jpg", "airplane/0004.jpg"]
    imagenet = image_rows(default_data_dir(), stride=5, limit=3)
    assert imagenet == sample_rows()[::5][:3] and imagenet[1]["class_index"] == "10"


def test_evaluate_user_model_cifar_resnet20_stage_aliases(tmp_path):
    """`camserve evaluate` on the pretrained CIFAR ResNet-20 (eager source, 32×32, class folders):
    the stage aliases resolve to module paths, the weights and preprocessing are the spec's (most of
    10 CIFAR test images right, one per class), every score is a finite AUC."""
    out = tmp_path / "cifar"
    code = main(["evaluate", *CIFAR_RESNET20, "--data", str(CIFAR), "--limit", "10", "--stride", "1",
                 "--steps", "8", "--layers", "stage1,stage2", "--methods", "layercam,gradcam,random",
                 "--batch-size", "64", "--no-progress", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "faithfulness.json").read_text())
    meta = data["meta"]
    assert meta["complete"] and meta["model"] == "eager CifarResNet(depth=20)"
    assert meta["spec"]["source"] == "eager" and meta["spec"]["kwargs"] == {"depth": 20}
    assert meta["input_size"] == [32, 32] and meta["preprocess"]["crop"] == 32
    assert meta["layers"] == ["layer1", "layer2"]
    assert meta["stages"] == {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}
    assert meta["images"] == 10 and {f.split("/")[0] for f in meta["files"]} == set(CIFAR_CLASSES)
    assert meta["top1_accuracy_on_these_images"] >= 0.5  # pretrained (79.5 % on 1,000); random weights ≈ 0.1
    rows = list(csv.DictReader(open(out / "faithfulness.csv")))
    assert {(r["layer"], r["method"]) for r in rows} == {
        (l, m) for l in ("layer1", "layer2") for m in ("layercam", "gradcam", "random")}
    for r in rows:
        assert int(r["n"]) == 10
        values = [float(r[k]) for k in ("deletion_auc", "insertion_auc", "overall")]
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= values[0] <= 1.0 and 0.0 <= values[1] <= 1.0
        assert values[2] == pytest.approx(values[1] - values[0], abs=1e-6)
    assert all(len(m["mean_deletion_curve"]) == 9 for m in data["per_map"])
    # the layer maps differ between the stages (each was computed at its own layer)
    per = {(m["layer"], m["method"]): m for m in data["per_map"]}
    assert per[("layer1", "layercam")]["deletion_auc"] != per[("layer2", "layercam")]["deletion_auc"]
    text = (out / "faithfulness.md").read_text()
    assert "| layer1 |" in text and "| layer2 |" in text and "eager CifarResNet(depth=20)" in text


def test_evaluate_unknown_stage_alias_lists_the_stages(tmp_path):
    with pytest.raises(SystemExit, match="3 stages.*stage1 = 'layer1'"):
        main(["evaluate", *CIFAR_RESNET20, "--data", str(CIFAR), "--limit", "2", "--layers", "stage9",
              "--no-progress", "--out", str(tmp_path)])


def test_bench_quick_user_model_torchvision(tmp_path):
    """`camserve bench --quick` on a torchvision ResNet-18 (random weights, 32×32): the head CAMs at
    its discovered default layer (layer3: layer4's map is 1×1 at this size), the shallow ones at a
    stage alias, the FAM pair on its pooled map (memory children: see the next test)."""
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "10",
                 "--preprocess", "crop=32", "--shallow-layer", "stage3", "--no-memory", "--out", str(out)]) == 0
    data = json.loads((out / "cost_quick.json").read_text())
    meta = data["meta"]
    assert meta["model"] == "torchvision resnet18 (random weights), 32×32, real photographs"
    assert meta["spec"] == {"source": "torchvision", "arch": "resnet18", "num_classes": 10, "task": "classify",
                            "preprocess": {"crop": 32}}
    assert meta["layers"] == {"head": "layer3", "shallow": "layer2"} and meta["stages"]["stage3"] == "layer2"
    cases = {(r["case"], r["batch"]): r for r in data["timings"]}
    for batch in (1, 2):
        for name in ("plain inference", "camserve gradcam @layer3", "camserve shallowcam[grad] @layer2",
                     "pytorch-grad-cam GradCAM @layer3"):
            assert (name, batch) in cases
    assert ("camserve fam (pooled), 8 pairs", 8) in cases
    bases = {(r["group"], r["batch"]): r for r in data["timings"] if r["case"].startswith("plain ")}
    for r in data["timings"]:
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        assert r["ratio"] == pytest.approx(r["median_s"] / bases[(r["group"], r["batch"])]["median_s"], rel=1e-9)
    assert data["memory"] == {}
    text = (out / "cost_quick.md").read_text()
    assert "torchvision resnet18 32×32" in text and "| camserve gradcam @layer3 |" in text and "≤ 1.3×" in text


def test_bench_memory_child_gets_the_same_model():
    """A memory child's command line parses back to the parent's spec, layers, images and threads."""
    import argparse

    from camserve.lab import bench
    from camserve.commands.model_args import spec_from_args

    def parse(argv):
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        return parser.parse_args(argv)

    parent = parse([*CIFAR_RESNET20, "--preprocess", "resize=36", "--shallow-layer", "stage1", "--data", str(CIFAR),
                    "--threads", "1", "--device", "cpu"])
    command = bench.memory_command("camserve shallowcam[grad] @layer1", 8, parent)
    assert command[1:5] == ["-m", "camserve.cli.main", "bench", "--memory-child"]
    child = parse(command[4:])
    assert child.memory_child == "camserve shallowcam[grad] @layer1" and child.memory_batch == 8
    assert spec_from_args(child)[0] == spec_from_args(parent)[0]
    assert spec_from_args(child)[0].preprocess == {"crop": 32, "resize": 36}
    assert (child.shallow_layer, child.head_layer, child.data, child.threads, child.device) == \
        ("stage1", None, str(CIFAR), 1, "cpu")


def test_bench_fam_family_cases_explain_at_their_layers():
    """`camserve bench`'s FAM cases (issue 21's cost targets): the family's weightings at the last map
    and the relevance route at the shallow layer each explain the 8 pairs at the layer they name."""
    import argparse

    import torch

    from camserve.lab import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    local, _, _, shallow = bench.bench_model(args, torch.device("cpu"))
    x = bench.load_batch(16, local.profile, torch.device("cpu"), None)
    cases = bench.fam_cases(local, x, shallow)
    assert shallow == "_blocks.2"
    expected = {"camserve fam sfam weights (pooled), 8 pairs": (None, (7, 7)),
                "camserve fam jacobian weights (last map), 8 pairs": (None, (7, 7)),
                "camserve fam @_blocks.2 (relevance route), 8 pairs": ("_blocks.2", (56, 56)),
                "camserve fam sfam weights @_blocks.2 (relevance route), 8 pairs": ("_blocks.2", (56, 56))}
    targets = bench.case_targets("_conv_head", shallow)
    for name, (layer, shape) in expected.items():
        answers = cases[name](x).items
        assert len(answers) == 8 and name in targets
        assert {(a.layer, tuple(a.layer_shape)) for a in answers} == {(layer, shape)}
        assert all(torch.isfinite(a.query_map).all() and a.query_map.max() > 0 for a in answers)
    assert targets["camserve fam @_blocks.2 (relevance route), 8 pairs"] == 3.0
