"""What explanation monitoring costs (issue 22): map summaries on an explained request, and sampled
monitoring of plain traffic — ratios measured in one run, the arms interleaved request by request.

The real classifier handler in-process (the bundled EfficientNet-Lite0, a TorchServe context, one
request per ``handle`` call, as a lightly loaded worker sees them), real photographs:

- **summaries**: an explained request (``explain=gradcam``, ``_conv_head``; and ``shallowcam`` at its
  default ``_blocks.4``) by a handler whose answers carry their maps' summaries vs one whose answers
  do not (the same handler class; only ``summarising`` differs; no audit log, so the log's own cost
  is not counted);
- **monitoring**: plain requests by a handler with ``handler.monitor.fraction`` 0.01 and 1.0 vs one
  without monitoring (the monitored handlers' audit logs on; the unmonitored one's too, so only the
  monitoring differs).

Prints the mean per request of each arm and the ratios. Targets: summaries ≤ 1.02, monitoring at
1 % ≤ 1.02.

    .venv/bin/python benchmarks/monitor_cost.py [--rounds 300] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import REPO, SAMPLES  # noqa: E402
from handlerkit import handle, initialised  # noqa: E402

from camserve.engine.imaging.summary import summarise  # noqa: E402
from camserve.serving.classifier import ImageClassifierHandler  # noqa: E402


class Summarising(ImageClassifierHandler):
    """The handler whose answers carry summaries without an audit log (isolates the summaries' cost)."""

    summarising = True


class NotSummarising(ImageClassifierHandler):
    summarising = False


def handler(cls, work: Path, **settings):
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    config["handler"].update(settings)
    return initialised(cls, work, config, batch_size=1)


def timed(h, context, row) -> float:
    start = time.perf_counter()
    handle(h, context, [dict(row)])
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="requests per arm for the plain arms (default 300)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="monitor-cost-"))
    photos = [p.read_bytes() for p in sorted(SAMPLES.glob("*.JPEG"))[:20]]
    results = {}

    arms = {"without summaries": handler(NotSummarising, work), "with summaries": handler(Summarising, work)}
    for method in ("gradcam", "shallowcam"):
        row_options = {"explain": method} if method != "gradcam" else {"explain": method, "layer": "_conv_head"}
        times = {name: [] for name in arms}
        for i in range(args.rounds + 3):
            for name, (h, context) in arms.items():
                t = timed(h, context, {"data": photos[i % len(photos)], **row_options})
                if i >= 3:  # warm-up
                    times[name].append(t)
        means = {name: statistics.mean(t) for name, t in times.items()}
        # the summary's own time on a map of this method's layer, in the same run (less noisy than the
        # difference of the two arms' means on a shared CPU)
        side = 7 if method == "gradcam" else 28
        maps = torch.rand(1, side, side)
        start = time.perf_counter()
        for _ in range(500):
            summarise(maps)
        own = (time.perf_counter() - start) / 500
        results[f"explained {method}"] = {
            "mean_s": means, "ratio": means["with summaries"] / means["without summaries"],
            "summary_s": own, "ratio_from_summary_time": (means["without summaries"] + own) / means["without summaries"]}

    arms = {"no monitoring": handler(ImageClassifierHandler, work, audit_log=str(work / "c.jsonl")),
            "monitor 1 %": handler(ImageClassifierHandler, work, audit_log=str(work / "d.jsonl"),
                                   monitor={"fraction": 0.01}),
            "monitor 100 %": handler(ImageClassifierHandler, work, audit_log=str(work / "e.jsonl"),
                                     monitor={"fraction": 1.0})}
    times = {name: [] for name in arms}
    for i in range(args.rounds + 3):
        for name, (h, context) in arms.items():
            t = timed(h, context, {"data": photos[i % len(photos)]})
            if i >= 3:
                times[name].append(t)
    means = {name: statistics.mean(t) for name, t in times.items()}
    monitored = sum(1 for line in (work / "d.jsonl").read_text().splitlines() if '"monitor"' in line) \
        if (work / "d.jsonl").exists() else 0
    results["plain"] = {"mean_s": means, "ratio_1pct": means["monitor 1 %"] / means["no monitoring"],
                        "ratio_100pct": means["monitor 100 %"] / means["no monitoring"],
                        "monitored_at_1pct": monitored, "requests": len(times["monitor 1 %"]) + 3}
    for name, (h, _) in arms.items():
        h.audit.close()

    print(f"in-process handler, bundled EfficientNet-Lite0, 1 thread, one request per handle(); {args.rounds} plain rounds")
    for key, value in results.items():
        means = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in value["mean_s"].items())
        if "summary_s" in value:
            means += f"; summarise() alone {value['summary_s'] * 1000:.3f} ms"
        ratios = {k: round(v, 4) for k, v in value.items() if k.startswith("ratio")}
        print(f"  {key}: {means}; {ratios}")
    print(f"  monitored at 1 %: {results['plain']['monitored_at_1pct']} of {results['plain']['requests']} plain requests")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
