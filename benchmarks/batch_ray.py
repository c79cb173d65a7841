"""Images per second of ``camserve batch --ray`` (1 and 2 workers) vs the local run, in one run.

    .venv/bin/python benchmarks/batch_ray.py --images 64 --out benchmarks/results/batch_ray

Every configuration explains the same ``--images`` shared photographs into a fresh output folder
(nothing skipped), as a separate ``camserve batch`` process, one after the other, ``--repeat`` times
each (interleaved). From each run's summary line it takes the images/s of the whole run (with Ray,
that includes starting the local cluster), ``ray.init``'s seconds (the start-up cost) and the
pipeline's seconds (actors loading the model included); it reports the medians and every ratio to
the local run. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from camserve.commands.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared")) / "data" / "imagenet-samples"
SUMMARY = re.compile(r"done (\d+), skipped (\d+) .*? in ([\d.]+) s \(([\d.]+) images/s")
RAY = re.compile(r"Ray start-up ([\d.]+) s, pipeline ([\d.]+) s, shutdown ([\d.]+) s")


def configurations(threads: int):
    return {
        "local": [],
        f"ray, 1 worker × {threads} CPUs": ["--ray", "--workers", "1", "--cpus-per-worker", str(threads)],
        "ray, 1 worker × 1 CPU": ["--ray", "--workers", "1", "--cpus-per-worker", "1"],
        "ray, 2 workers × 1 CPU": ["--ray", "--workers", "2", "--cpus-per-worker", "1"],
    }


def machine() -> dict:
    import ray
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def steady_state(records_path: Path, batch_size: int) -> dict:
    """Images/s between the first and the last record (``finished_at``), not counting the first
    block: the rate once the model is loaded and the pipeline is full; plus the first record's delay."""
    from datetime import datetime

    times = sorted(datetime.fromisoformat(json.loads(line)["finished_at"]).timestamp()
                   for line in records_path.read_text().splitlines())
    span = times[-1] - times[0]
    rate = (len(times) - batch_size) / span if span > 0 and len(times) > batch_size else None
    return {"steady_images_per_s": round(rate, 3) if rate else None, "first_to_last_record_s": round(span, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--method", default="shallowcam")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batch_ray")
    parser.add_argument("--markdown-from", type=Path, default=None,
                        help="re-render the .md of a saved RESULT.json (measures nothing)")
    args = parser.parse_args()
    if args.markdown_from:
        write_markdown(json.loads(args.markdown_from.read_text()), args.markdown_from.with_suffix(".md"))
        return 0

    import torch

    with open(SAMPLES / "LABELS.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[: args.images]
    info = machine()
    configs = configurations(torch.get_num_threads())
    runs = {name: [] for name in configs}
    camserve = [sys.executable, "-m", "camserve.cli.main", "batch"]
    with tempfile.TemporaryDirectory(prefix="camserve-bench-ray-") as tmp:
        listing = Path(tmp) / "photos.txt"
        listing.write_text("".join(str(SAMPLES / r["file"]) + "\n" for r in rows))
        for rep in range(args.repeat):
            for name, extra in configs.items():
                out = Path(tmp) / f"out-{rep}-{len(runs[name])}-{abs(hash(name))}"
                cmd = [*camserve, str(listing), "--out", str(out), "--method", args.method,
                       "--batch-size", str(args.batch_size), "--quiet", "--no-report", *extra]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    raise SystemExit(f"{name}: exit {done.returncode}")
                m = SUMMARY.search(done.stdout)
                r = RAY.search(done.stdout)
                run = {"done": int(m.group(1)), "seconds": float(m.group(3)), "images_per_s": float(m.group(4)),
                       "process_wall_s": round(wall, 2)}
                run.update(steady_state(out / "records.jsonl", args.batch_size))
                if r:
                    run.update(ray_init_s=float(r.group(1)), pipeline_s=float(r.group(2)),
                               ray_shutdown_s=float(r.group(3)),
                               images_per_s_after_init=round(run["done"] / float(r.group(2)), 3))
                if r:  # from ray.init's end to the first record: actors start, load the model, first block
                    run["to_first_record_s"] = round(run["pipeline_s"] - run["first_to_last_record_s"], 2)
                assert run["done"] == len(rows), done.stdout
                runs[name].append(run)
                print(f"{name:28s} {run}", flush=True)

    summary = {}
    for name, values in runs.items():
        s = {"images_per_s": statistics.median(v["images_per_s"] for v in values),
             "seconds": statistics.median(v["seconds"] for v in values),
             "process_wall_s": statistics.median(v["process_wall_s"] for v in values),
             "steady_images_per_s": statistics.median(v["steady_images_per_s"] or 0.0 for v in values)}
        if "ray_init_s" in values[0]:
            s["ray_init_s"] = statistics.median(v["ray_init_s"] for v in values)
            s["pipeline_s"] = statistics.median(v["pipeline_s"] for v in values)
            s["images_per_s_after_init"] = statistics.median(v["images_per_s_after_init"] for v in values)
            s["to_first_record_s"] = statistics.median(v["to_first_record_s"] for v in values)
            s["ray_shutdown_s"] = statistics.median(v["ray_shutdown_s"] for v in values)
        summary[name] = s
    base = summary["local"]["images_per_s"]
    for s in summary.values():
        s["ratio_to_local"] = round(s["images_per_s"] / base, 3)
        s["steady_ratio_to_local"] = round(s["steady_images_per_s"] / summary["local"]["steady_images_per_s"], 3)
        if "images_per_s_after_init" in s:
            s["ratio_to_local_after_init"] = round(s["images_per_s_after_init"] / base, 3)
    command = (f".venv/bin/python benchmarks/batch_ray.py --images {args.images} --batch-size {args.batch_size} "
               f"--repeat {args.repeat} --method {args.method}")
    result = {"command": command, "images": len(rows), "batch_size": args.batch_size, "method": args.method,
              "model": "effnet_lite0 (bundled)", "machine": info, "runs": runs, "summary": summary,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    write_markdown(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return 0


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_markdown(result: dict, path: Path) -> None:
    """The table of ``result`` (also ``--markdown-from RESULT.json``: re-render, measure nothing)."""
    info, summary, command = result["machine"], result["summary"], result["command"]
    repeat = len(next(iter(result["runs"].values())))
    lines = [f"# `camserve batch --ray` vs the local run ({result['images']} photographs, {result['method']}, "
             "EfficientNet-Lite0)",
             "",
             f"Command: `{command}` (finished {result['measured_at']}).",
             "",
             f"Machine: {info['cpus']} CPUs ({info['cpu_model'] or 'unknown model'}), {info['memory_gib']} GiB, no GPU; "
             f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads in the local run), "
             f"Ray {info['ray']}. **The CPU is shared with other agents working at the same time** (load average "
             f"{', '.join(map(str, info['load_average_at_start']))} at the start, on 2 cores), so absolute numbers "
             f"are noisy; the configurations ran one after the other, {repeat}× each, interleaved; medians "
             "(of two runs: their mean). Every run's numbers are in the JSON next to this file.",
             "",
             "Each run is a fresh `camserve batch` process into an empty `--out` (all images new), "
             f"`--batch-size {result['batch_size']} --quiet --no-report`. *images/s* is the run's own summary "
             "(with `--ray`: from before `ray.init` to the last record, so it includes the start-up cost); "
             "*Ray start-up* is `ray.init` of a local cluster; *pipeline* is the rest up to the last record "
             "(actors starting and loading the model, decoding, explaining, rendering, the driver writing), "
             "*until the 1st record* the part of it before the first record; *steady* is the rate between the "
             "first and the last record's `finished_at`, the first block not counted (model loaded, pipeline "
             "full). With Ray the decode tasks run ahead while the actors load the model, so its steady window "
             "holds less decoding than the local run's: steady ratios flatter Ray. *Ray shutdown* comes after "
             "the last record and is not in images/s; *process wall* is the whole process, imports included.",
             "",
             "| configuration | images/s | ratio to local | Ray start-up (s) | pipeline (s) | of which until the 1st record (s) "
             "| images/s after start-up | ratio after start-up | steady images/s | steady ratio | Ray shutdown (s) "
             "| process wall (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {fmt(s['images_per_s'])} | {fmt(s['ratio_to_local'])} | "
                     f"{fmt(s.get('ray_init_s'), 1)} | {fmt(s.get('pipeline_s'), 1)} | {fmt(s.get('to_first_record_s'), 1)} | "
                     f"{fmt(s.get('images_per_s_after_init'))} | {fmt(s.get('ratio_to_local_after_init'))} | "
                     f"{fmt(s['steady_images_per_s'])} | {fmt(s['steady_ratio_to_local'])} | "
                     f"{fmt(s.get('ray_shutdown_s'), 1)} | {fmt(s['process_wall_s'], 1)} |")
    lines += ["", "On one machine the fixed costs dominate: starting the local cluster, then worker processes that "
              "import torch and load the model before the first record; a run pays them once, however many "
              "images it has. Whether more actors raise the steady rate needs more cores or GPUs than this "
              "shared 2-core machine has: here 2 workers × 1 CPU share the same 2 cores (and the decode tasks)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
