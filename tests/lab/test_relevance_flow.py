"""``python -m camserve.lab.relevance_flow`` (issue 25's measured reason): on a real photograph and the
pretrained EfficientNet-Lite1, the net relevance is kept down the head and the last block's pointwise
layers and first lost at its depthwise convolution, on empty z⁺ windows among other places."""

from __future__ import annotations

import json

from camserve.lab import relevance_flow


def test_relevance_is_lost_at_the_depthwise_convolution(tmp_path):
    assert relevance_flow.main(["--model", "effnet-lite1", "--images", "1", "--blocks", "20", "--out",
                                str(tmp_path)]) == 0
    result = json.loads((tmp_path / "relevance_flow_effnet-lite1_epsilon_plus_none.json").read_text())
    rows = {r["layer"]: r for r in result["rows"]}
    assert result["meta"]["model"] == "effnet-lite1" and "--model effnet-lite1" in result["meta"]["command"]
    assert rows["_conv_head"]["net_over_logit"] > 0.99 and rows["_blocks.20._bn1"]["net_over_logit"] > 0.99
    depthwise = rows["_blocks.20._depthwise_conv"]
    assert depthwise["net_over_logit"] < 0.9 * rows["_blocks.20._bn1"]["net_over_logit"]
    assert 0 < depthwise["on_empty_windows_over_logit"] < 1
    assert "# Relevance flow through EfficientNet-Lite1" in (
        tmp_path / "relevance_flow_effnet-lite1_epsilon_plus_none.md").read_text()
