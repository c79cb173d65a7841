"""`python -m camserve.lab.evaluate_depthwise` (issue 25, item 2): the report-half table of fixed
readings against LayerCAM on the real EfficientNet-Lite0 and ImageNet sample photographs."""

from __future__ import annotations

import json
import math

from camserve.lab import evaluate_depthwise
from conftest import SHARED


def test_depthwise_table_on_two_stages_run_apart_and_merged(tmp_path):
    data = SHARED / "data" / "imagenet-samples"
    for stage in ("stage8", "stage1"):      # two runs over disjoint stages, as on a shared machine
        assert evaluate_depthwise.main(["--models", "effnet_lite0", "--layers", stage, "--readings",
                                        "layercam,fgcam", "--max-images", "16", "--report-images", "4", "--data",
                                        str(data), "--threads", "2", "--quiet", "--out", str(tmp_path / stage)]) == 0
    assert evaluate_depthwise.main(["--merge", *(str(tmp_path / s / "depthwise_effnet_lite0.json")
                                                 for s in ("stage8", "stage1")), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "depthwise_effnet_lite0.json").read_text())
    assert list(result["records"]) == ["_blocks.0", "_conv_head"]   # depth order, whatever the runs' order
    rows = {(r["stage"], r["reading"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("stage1", "stage8") for m in ("layercam", "fgcam")}
    assert rows["stage1", "fgcam"]["layer"] == "_blocks.0" and rows["stage8", "fgcam"]["layer"] == "_conv_head"
    assert len(result["meta"]["images"]) == 4 and result["meta"]["stage_paths"][0] == "_blocks.0"
    for (stage, name), row in rows.items():
        assert row["n"] == 4 and -1 <= row["rho12"] <= 1
        base = rows[stage, "layercam"]
        for key in ("overall0", "overallB"):   # the paired difference is the difference of the means
            assert math.isclose(row[f"d_{key}"], row[key] - base[key], abs_tol=1e-9)
        assert row["goal"] == (name != "layercam" and row["d_overall0"] >= 0.01 and row["d_overallB"] >= 0.01
                               and row["rho12"] <= base["rho12"] + 1e-12)
    assert evaluate_depthwise.main(["--render", str(tmp_path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "depthwise.md").read_text()
    assert "## effnet_lite0 (224×224)" in text and "| stage1 (`_blocks.0`) | `fgcam` |" in text
    assert "the first 4 of the report half" in text and "../shared/data/imagenet-samples" in text
