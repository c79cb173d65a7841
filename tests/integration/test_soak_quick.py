"""A quick soak (issue 12): a few hundred mixed requests against the session's real TorchServe.

The same code as ``benchmarks/soak.py`` (``tests/soakkit.py``, which both import): plain, Grad-CAM, LayerCAM,
Shallow-CAM at two layers, KServe v1/v2, FAM pairs, embeddings, gallery, malformed bodies and the
bring-your-own archives the session server serves, at concurrency 16. Every answer is checked —
status, decodable heatmaps, and each photo's top-1 / embedding / FAM similarity / gallery matches
equal to its own plain answer (no cross-talk inside batches) — and nothing may be lost.
"""

from __future__ import annotations

import pytest

import soakkit as soak  # the soak's client, kinds, checks and memory sampler (benchmarks/soak.py runs it too)

pytestmark = pytest.mark.server
REQUESTS, CONCURRENCY = 200, 16


def test_quick_soak_loses_nothing_and_mixes_nothing(torchserve_server):
    client = soak.Client.of(torchserve_server)
    pids_before = {m: client.workers(m) for m in ("effnet_lite0", "effnet_lite0_embed")}
    result = soak.soak(client, REQUESTS, CONCURRENCY, byo=True, photos=8, seed=1, max_seconds=600,
                       sample_every=2.0, warmup=REQUESTS // 4)
    summary = {k: result[k] for k in ("requests_done", "lost", "unexpected", "check_failures", "throughput_rps")}
    print(f"quick soak: {summary}; workers RSS {result['memory'].get('warm_workers_rss_mib')} → "
          f"{result['memory'].get('end_workers_rss_mib')} MiB")
    assert result["requests_done"] == REQUESTS, summary
    assert result["lost"] == 0, result["problems"]
    assert result["unexpected"] == 0, result["problems"]
    assert result["check_failures"] == 0, result["problems"]  # includes cross-talk: another photo's answer
    assert result["healthy_after"]
    assert {name for name in result["per_kind"]} >= {"plain", "gradcam", "layercam", "shallowcam@_blocks.4",
                                                      "shallowcam@_blocks.2", "kserve_v1", "kserve_v2", "fam_pair",
                                                      "embedding", "gallery", "malformed"}
    assert result["per_kind"]["malformed"]["requests"] > 0
    # every worker sampled throughout, none restarted (a crash would show as a new pid)
    assert result["worker_restarts"] == 0, result["worker_pids"]
    assert {m: client.workers(m) for m in pids_before} == pids_before
    assert len(result["samples"]) >= 2 and all(s["workers_rss_kib"] > 0 for s in result["samples"])
