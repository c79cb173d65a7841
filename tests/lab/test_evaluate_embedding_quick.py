"""Quick mode of `camserve evaluate-embedding` (similarity deletion/insertion, FAM vs baselines) end to end,
on the bundled EfficientNet-Lite0 and on user embedding specs (the flags of `camserve archive`)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from camserve.lab.evaluate_embedding import DifferentiableEmbedding
from camserve.cli.main import main
from camserve.engine.models.embedding import EmbeddingModel, load_effnet_lite0_embedding
from conftest import SAMPLES, load_uint8, sample_rows


def test_differentiable_embedding_equals_the_embedding_model(effnet, effnet_batch):
    model = load_effnet_lite0_embedding(backbone=effnet)
    images = effnet_batch[0][:2]
    with torch.no_grad():
        assert torch.allclose(DifferentiableEmbedding(model)(images), model(images), atol=1e-6)
    x = images.clone().requires_grad_()
    DifferentiableEmbedding(model)(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_differentiable_embedding_of_a_user_embedding_model_is_its_output():
    """The Jacobian route's embedding (the model's own output) with autograd, for Captum IG."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    embedding = EmbeddingModel.from_embedding_model(model, "1", normalize=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(DifferentiableEmbedding(embedding)(x), torch.nn.functional.normalize(model(x)), atol=1e-6)
    x.requires_grad_()
    DifferentiableEmbedding(embedding)(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_evaluate_embedding_quick_writes_every_output(tmp_path):
    out = tmp_path / "fam"
    code = main(["evaluate-embedding", "--limit", "2", "--pool-limit", "6", "--steps", "4", "--ig-steps", "4",
                 "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert code == 0
    for name in ("fam_faithfulness.csv", "fam_faithfulness.json", "fam_faithfulness.md",
                 "fam_faithfulness_bars.png", "fam_faithfulness_curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "fam_faithfulness.csv")))
    assert {(r["pairs"], r["method"]) for r in rows} == {
        (k, m) for k in ("flip", "zoom", "neighbour", "all")
        for m in ("fam", "gradcam_similarity", "captum.integrated_gradients", "random")}
    for r in rows:
        assert int(r["n"]) == (6 if r["pairs"] == "all" else 2)
        assert -1.0 <= float(r["deletion_auc"]) <= 1.0 and -1.0 <= float(r["insertion_auc"]) <= 1.0
        assert abs(float(r["overall"]) - (float(r["insertion_auc"]) - float(r["deletion_auc"]))) < 1e-6
    data = json.loads((out / "fam_faithfulness.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["steps"] == 4
    for kind in ("flip", "zoom"):  # positive pairs: the clean query matches its reference closely
        assert min(data["meta"]["pairs"][kind]["clean_similarity"]) > 0.8
    for r in data["per_map"]:
        assert len(r["mean_deletion_curve"]) == 5
        # step 0 of deletion and step S of insertion are the clean query: the same similarity
        assert abs(r["mean_deletion_curve"][0] - r["mean_insertion_curve"][-1]) < 1e-5
    assert "| flip |" in (out / "fam_faithfulness.md").read_text()


@pytest.fixture
def resnet18_embedding_weights(tmp_path):
    """A torchvision ResNet-18 with random weights (seeded), ``fc`` removed, saved as a state dict."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    path = tmp_path / "resnet18_embed.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_evaluate_embedding_user_model_torchvision_pooled(tmp_path, resnet18_embedding_weights):
    """`camserve evaluate-embedding` on a user ResNet-18 embedding (--task embed, --num-classes 0, 64×64):
    FAM's pooled route at the discovered layer4, the spec's weights and preprocessing (the clean flip
    similarity is the one this test computes itself), finite curves for every (pairs, method)."""
    model, weights = resnet18_embedding_weights
    out = tmp_path / "fam"
    code = main(["evaluate-embedding", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "0",
                 "--weights", str(weights), "--preprocess", "crop=64", "--limit", "2", "--pool-limit", "6",
                 "--steps", "4", "--ig-steps", "4", "--batch-size", "16", "--no-progress", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "fam_faithfulness.json").read_text())
    meta = data["meta"]
    assert meta["complete"] and meta["images"] == 2
    assert meta["model"] == "torchvision resnet18 embedding (GAP of layer4's map, L2-normalised, D=512)"
    assert meta["embedding"] == {"model": meta["model"], "route": "pooled", "feature_layer": "layer4", "dim": 512}
    assert meta["spec"]["task"] == "embed" and meta["spec"]["weights"] == str(weights)
    assert meta["input_size"] == [64, 64]
    assert meta["pairs"]["zoom"]["reference_files"][0].endswith("(resize 80, crop 64)")  # 1.25 × resize 64
    # the flip pairs' clean similarity, recomputed from the saved model with the spec's preprocessing
    from camserve.engine.imaging.preprocess import to_model_input

    rows = sample_rows()[::31][:2]
    assert meta["query_files"] == [r["file"] for r in rows]
    x, _ = to_model_input([load_uint8(SAMPLES / r["file"]) for r in rows], 64, 64, (0.485, 0.456, 0.406),
                          (0.229, 0.224, 0.225), torch.device("cpu"))
    with torch.no_grad():
        e, f = (torch.nn.functional.normalize(model(v)) for v in (x, x.flip(-1)))
    assert meta["pairs"]["flip"]["clean_similarity"] == pytest.approx((e * f).sum(1).tolist(), abs=1e-4)
    table = list(csv.DictReader(open(out / "fam_faithfulness.csv")))
    assert {(r["pairs"], r["method"]) for r in table} == {
        (k, m) for k in ("flip", "zoom", "neighbour", "all")
        for m in ("fam", "gradcam_similarity", "captum.integrated_gradients", "random")}
    for r in table:
        assert int(r["n"]) == (6 if r["pairs"] == "all" else 2)
        values = [float(r[k]) for k in ("deletion_auc", "insertion_auc", "overall")]
        assert all(math.isfinite(v) for v in values)
        assert values[2] == pytest.approx(values[1] - values[0], abs=1e-6)
    for r in data["per_map"]:
        assert len(r["mean_deletion_curve"]) == 5
        assert abs(r["mean_deletion_curve"][0] - r["mean_insertion_curve"][-1]) < 1e-5
    assert "torchvision resnet18 embedding" in (out / "fam_faithfulness.md").read_text()


def test_evaluate_embedding_user_model_jacobian_route(tmp_path):
    """A ResNet-18 whose ``fc`` is a 32-d projection (--embedding output): FAM's Jacobian route and
    Captum IG through the model's own output, at a stage alias given as --feature-layer."""
    out = tmp_path / "jac"
    code = main(["evaluate-embedding", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "32",
                 "--embedding", "output", "--feature-layer", "stage4", "--preprocess", "crop=64", "--limit", "2",
                 "--pairs", "flip", "--methods", "fam,captum.integrated_gradients,random", "--steps", "4",
                 "--ig-steps", "4", "--no-progress", "--out", str(out)])
    assert code == 0
    meta = json.loads((out / "fam_faithfulness.json").read_text())["meta"]
    assert meta["embedding"]["route"] == "jacobian" and meta["embedding"]["dim"] == 32
    assert meta["embedding"]["feature_layer"] == "layer3" == meta["stages"]["stage4"]
    table = {r["method"]: r for r in csv.DictReader(open(out / "fam_faithfulness.csv"))}
    assert set(table) == {"fam", "captum.integrated_gradients", "random"}
    assert all(math.isfinite(float(r["overall"])) and int(r["n"]) == 2 for r in table.values())
    assert float(table["captum.integrated_gradients"]["explain_seconds"]) > 0


def test_fam_family_benchmark_end_to_end_on_cifar(tmp_path):
    """`camserve.lab.evaluate_fam_family` at its smallest: the pooled ResNet-56, two tasks (flip and a 5-way
    5-shot episode), one query per half; the raw JSON and the rendered tables."""
    from pathlib import Path

    from camserve.lab.evaluate_fam_family import main as family, render

    assert family(["--models", "pooled", "--tasks", "flip,fewshot", "--pool", "200", "--choose", "1",
                   "--report", "1", "--steps", "4", "--ig-steps", "2", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "fam_family_raw.json").read_text())
    result = raw["results"]["pooled"]
    assert set(result["best"]) == {"product", "sfam", "neighbour"}
    report = result["report"]
    assert set(report) == {"flip", "fewshot"} and "prototype" in report["fewshot"]["methods"]
    assert "prototype" not in report["flip"]["methods"]
    for records in report.values():
        for method, rec in records["methods"].items():
            assert len(rec["overall"]) == 1 and all(math.isfinite(v) for v in rec["overall"])
            assert ("top20" in rec) == (not method.startswith("random@"))
    render([str(tmp_path / "fam_family_raw.json")], Path(tmp_path))
    text = (tmp_path / "fam_family.md").read_text()
    assert "## pooled" in text and "captum.ig" in text and "| prototype |" in text


def test_fam_family_benchmark_on_a_registry_backbone(tmp_path):
    """``--models lite0``: the pretrained EfficientNet-Lite0 on ImageNet photographs at 224² — product and
    sfam weightings, random maps at the last map's 7×7 and at IG's input resolution, the zoom pair at the
    centre ¾ of the photograph, and no few-shot task (one photograph per class: no episode has its shots)."""
    from camserve.lab.evaluate_fam_family import Data, main as family, transformed_copies

    assert family(["--models", "lite0", "--tasks", "zoom,fewshot", "--pool", "40", "--choose", "1", "--report", "1",
                   "--steps", "4", "--ig-steps", "2", "--layers", "last,stage2", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "fam_family_raw.json").read_text())
    result = raw["results"]["lite0"]
    assert set(result["best"]) == {"product", "sfam"} and set(result["report"]) == {"zoom"}
    assert any("fewshot left out" in line for line in raw["log"])
    methods = result["report"]["zoom"]["methods"]
    assert methods["captum.ig"]["resolution"] == 224 and methods["product@last"]["resolution"] == 7
    assert {"random@7", "random@224"} <= set(methods)
    assert all(math.isfinite(v) for rec in methods.values() for v in rec["overall"])
    assert "ImageNet sample photographs" in result["data"]

    class Args:
        pool, choose, report = 10, 1, 1
    data = Data(Args(), "efficientnet-lite0", "imagenet")
    assert data.size == (224, 224) and not data.episodes_possible()
    Args.pool = 200  # lite0-cifar: CIFAR-10 upsampled to Lite0's crop, where episodes exist
    upsampled = Data(Args(), "efficientnet-lite0", "cifar")
    assert upsampled.size == (224, 224) and upsampled.episodes_possible()
    assert -1.0 <= float(upsampled.images.min()) and float(upsampled.images.max()) <= 1.0  # Lite's (x − 0.5) / 0.5
    zoomed = transformed_copies("zoom", data.images[:1], 0, data.mean, data.std)
    expected = torch.nn.functional.interpolate(data.images[:1, :, 28:196, 28:196], size=(224, 224), mode="bilinear",
                                               align_corners=False)
    assert torch.equal(zoomed, expected)


def test_fam_family_sweeps_the_neighbour_count(tmp_path):
    """``--weightings neighbour1,neighbour3 --layers last``: K is a weighting chosen on the choose half like
    the others; each K's maps come from FamSpec(weights="neighbour", neighbours=K)."""
    from camserve.lab.evaluate_fam_family import main as family, split_neighbours

    assert split_neighbours("neighbour10") == ("neighbour", 10) and split_neighbours("sfam") == ("sfam", None)
    assert family(["--models", "pooled", "--tasks", "flip", "--pool", "200", "--choose", "1", "--report", "1",
                   "--steps", "4", "--ig-steps", "2", "--weightings", "neighbour1,neighbour3", "--layers", "last",
                   "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fam_family_raw.json").read_text())["results"]["pooled"]
    assert result["best"] == {"neighbour1": "neighbour1@last", "neighbour3": "neighbour3@last"}
    flip = result["report"]["flip"]["methods"]
    assert {"neighbour1@last", "neighbour3@last", "product@last", "captum.ig"} <= set(flip)
    assert flip["neighbour1@last"]["overall"] != flip["neighbour3@last"]["overall"]
    with pytest.raises(SystemExit):
        family(["--weightings", "nosuch", "--out", str(tmp_path / "x")])
