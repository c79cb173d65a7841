"""Quick mode of `camserve evaluate-embedding` (similarity deletion/insertion, FAM vs baselines) end to end."""

from __future__ import annotations

import csv
import json

import torch

from camserve.cli.evaluate_embedding import DifferentiableEmbedding
from camserve.cli.main import main
from camserve.engine.similarity.embedding import load_effnet_lite0_embedding


def test_differentiable_embedding_equals_the_embedding_model(effnet, effnet_batch):
    model = load_effnet_lite0_embedding(backbone=effnet)
    images = effnet_batch[0][:2]
    with torch.no_grad():
        assert torch.allclose(DifferentiableEmbedding(model)(images), model(images), atol=1e-6)
    x = images.clone().requires_grad_()
    DifferentiableEmbedding(model)(x)[:, 0].sum().backward()
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
