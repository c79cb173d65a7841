"""The mixed soak before and after the runtime, in one run: two real TorchServes on loopback serving the
same bundled archives, one with ``CAMSERVE_RUNTIME=fast_path=off,memory_format=contiguous`` in its
workers' environment (the forward as it served before: eager PyTorch, contiguous memory), one with the
archives' defaults (memory format measured at load, the OpenVINO fast path). The soak of
``tests/soakkit.py`` (every answer checked) runs against them in alternating blocks of ``--requests``
at each ``--concurrency``, so that both see the same machine.

    PYTHONPATH=src .venv/bin/python benchmarks/runtime_soak.py --out benchmarks/results/runtime_soak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import serverkit  # noqa: E402
from soakkit import Client, soak  # noqa: E402

BEFORE_ENV = "fast_path=off,memory_format=contiguous"


def start(runtime_env):
    previous = os.environ.get("CAMSERVE_RUNTIME")
    if runtime_env is None:
        os.environ.pop("CAMSERVE_RUNTIME", None)
    else:
        os.environ["CAMSERVE_RUNTIME"] = runtime_env  # the frontend hands its environment to its workers
    try:
        return serverkit.start_server(overrides={"token_expiration_min": "600"})
    finally:
        if previous is None:
            os.environ.pop("CAMSERVE_RUNTIME", None)
        else:
            os.environ["CAMSERVE_RUNTIME"] = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per server and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731
    servers = {"before": start(BEFORE_ENV), "after": start(None)}
    load_start = os.getloadavg()[0]
    results: dict = {}
    try:
        clients = {name: Client.of(server) for name, server in servers.items()}
        for concurrency in args.concurrency:
            for block in range(args.blocks):
                order = ("before", "after") if block % 2 == 0 else ("after", "before")
                for name in order:
                    r = soak(clients[name], args.requests, concurrency, photos=16, seed=block,
                             warmup=min(50, args.requests // 4))
                    bad = r["lost"] or r["unexpected"] or r["check_failures"] or not r["healthy_after"]
                    log(f"c={concurrency} block {block} {name}: {r['throughput_rps']} req/s, p50 {r['p50_s']} s, "
                        f"p99 {r['p99_s']} s, lost {r['lost']}, unexpected {r['unexpected']}, "
                        f"check failures {r['check_failures']}")
                    if bad:
                        for problem in r["problems"][:5]:
                            log("  " + problem[:300])
                    results.setdefault(str(concurrency), {}).setdefault(name, []).append(
                        {**{k: r[k] for k in ("throughput_rps", "p50_s", "p99_s", "lost", "unexpected",
                                              "check_failures", "healthy_after", "requests_done")},
                         "per_kind_p50_s": {kind: v["p50_s"] for kind, v in r["per_kind"].items()}})
    finally:
        for server in servers.values():
            server.stop()
    summary = {}
    for concurrency, sides in results.items():
        mean = {name: {k: statistics.mean(b[k] for b in blocks) for k in ("throughput_rps", "p50_s", "p99_s")}
                for name, blocks in sides.items()}
        for name, blocks in sides.items():  # per kind of request (both archives' kinds), mean of the blocks' p50
            kinds = sorted({k for b in blocks for k in b["per_kind_p50_s"]})
            mean[name]["per_kind_p50_s"] = {k: statistics.mean(b["per_kind_p50_s"][k] for b in blocks
                                                               if k in b["per_kind_p50_s"]) for k in kinds}
        summary[concurrency] = {"before": mean["before"], "after": mean["after"],
                                "throughput_ratio": mean["after"]["throughput_rps"] / mean["before"]["throughput_rps"],
                                "p99_ratio": mean["after"]["p99_s"] / mean["before"]["p99_s"]}
    out = {"machine": f"{os.cpu_count()} CPU cores (shared), load {load_start:.2f} → {os.getloadavg()[0]:.2f}",
           "requests_per_block": args.requests, "blocks": args.blocks, "before_env": BEFORE_ENV,
           "summary": summary, "blocks_detail": results}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        lines = [f"# The mixed soak before and after the runtime ({out['machine']})", "",
                 f"{args.blocks} alternating blocks of {args.requests} checked requests per server and concurrency; "
                 f"before: `CAMSERVE_RUNTIME={BEFORE_ENV}`; after: the archives' defaults.", "",
                 "| concurrency | before req/s | after req/s | ratio | before p99 s | after p99 s | p99 ratio |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for c, s in summary.items():
            lines.append(f"| {c} | {s['before']['throughput_rps']:.2f} | {s['after']['throughput_rps']:.2f} | "
                         f"{s['throughput_ratio']:.2f} | {s['before']['p99_s']:.2f} | {s['after']['p99_s']:.2f} | "
                         f"{s['p99_ratio']:.2f} |")
        for c, s in summary.items():
            lines += ["", f"p50 per kind of request at concurrency {c} (s): before → after", "",
                      "| kind | before | after |", "|---|---:|---:|"]
            for kind, before in s["before"]["per_kind_p50_s"].items():
                after = s["after"]["per_kind_p50_s"].get(kind, float("nan"))
                lines.append(f"| {kind} | {before:.3f} | {after:.3f} |")
        lines += ["", "Every answer checked as in the soak (`tests/soakkit.py`); lost, unexpected statuses and check "
                  "failures per block are in the .json."]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
