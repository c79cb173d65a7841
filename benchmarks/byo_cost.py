"""What an explanation costs on a user's own model, as a ratio to plain inference in the same run.

Two bring-your-own models loaded through model specs (as ``camserve archive`` would): the pretrained
CIFAR-10 ResNet-20 (eager ``examples/cifar_resnet/model.py``, 32×32 CIFAR-10 JPEGs) and a
torchvision ResNet-18 (random weights, 224×224 ImageNet photographs). Per model, at batch 8: plain
``inference_mode`` inference, Grad-CAM and LayerCAM at the discovered default (head) layer, and
Shallow-CAM (served default options) and LayerCAM at the shallowest stage (``stage1``) and at
``stage2``; median of interleaved repetitions on the chosen clock, divided by plain's. Peak memory:
one subprocess per case: the RSS high-water mark above the state before the case's first call
(CUDA: allocated peak; on a CPU it includes one-time set-up and the allocator's page behaviour,
which make small models' ratios noisy), and on the CPU also the peak of the bytes torch's
allocator holds during a second call (profiler memory timeline: every tensor's creation and
destruction) and the bytes live when the forward ends (the autograd graph and captured layers the
backward passes must read: the floor without recomputation), each as a ratio to plain's. Targets (issue 11): head CAMs ≤ 1.3×, Shallow-CAM at stage1 ≤ 3.0×,
memory ≤ 2×. Layer discovery's cost (the explainer's probe forwards at load) is timed too.

    .venv/bin/python benchmarks/byo_cost.py --threads 1 --clock cpu --reps 15 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))
TARGETS = {"gradcam @default": 1.3, "layercam @default": 1.3, "shallowcam @stage1": 3.0,
           "shallowcam @stage1, graph_rows 4": 3.0}
MODELS = {
    "cifar_resnet20": {"source": "eager", "model_file": str(REPO / "examples/cifar_resnet/model.py"),
                       "class_name": "CifarResNet", "kwargs": {"depth": 20}, "preprocess": {"crop": 32},
                       "weights": str(SHARED / "models/cifar-resnet/resnet20-12fca82f.th")},
    "tv_resnet18": {"source": "torchvision", "arch": "resnet18"},
}
CASES = [("plain", None, None), ("gradcam @default", "gradcam", None), ("layercam @default", "layercam", None),
         ("shallowcam @stage1", "shallowcam", "stage1"), ("layercam @stage1", "layercam", "stage1"),
         ("shallowcam @stage2", "shallowcam", "stage2"),
         # the batch of 8 explained as two chunks of 4 graphs (Explainer(graph_rows=4), handler.graph_rows)
         ("shallowcam @stage1, graph_rows 4", "shallowcam", "stage1"),
         # the reading documented for few-class ResNet-like models (shallowcam_variants.md § 8, 10):
         # the softmax start at T = 4 with β from l+1 (reads l+1's activations and relevance too)
         ("shallowcam T4+above @stage1", "shallowcam", "stage1"), ("shallowcam T4+above @stage2", "shallowcam", "stage2")]
GRAPH_ROWS = {"shallowcam @stage1, graph_rows 4": 4}
CASE_OPTIONS = {label: {"temperature": 4, "beta_from": "above"}
                for label in ("shallowcam T4+above @stage1", "shallowcam T4+above @stage2")}


def load(name: str, device: torch.device):
    """The model, its explainer (timed: discovery's probe forwards) and a batch of 8 real images."""
    from camserve.engine import Explainer
    from camserve.engine.models import ModelSpec, load_spec, profile_with_layers

    torch.manual_seed(0)
    loaded = load_spec(ModelSpec.from_mapping(MODELS[name]), str(REPO), device)
    start = time.perf_counter()
    explainer = Explainer(loaded.module, loaded.profile.input_size)
    load_seconds = time.perf_counter() - start
    profile = profile_with_layers(loaded.profile, explainer.catalog)
    if name == "cifar_resnet20":
        files = [p for c in sorted((SHARED / "data/cifar10-test").iterdir()) for p in sorted(c.glob("*.jpg"))[:1]][:8]
    else:
        files = sorted((SHARED / "data/imagenet-samples").glob("*.JPEG"))[:8]
    from PIL import Image
    import numpy as np

    images = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).contiguous() for f in files]
    batch, _ = profile.model_input(images, device)
    return explainer, profile, batch, load_seconds


def case_fn(explainer, method, layer, graph_rows=None, options=None):
    from camserve.engine import Explainer, ExplainSpec

    if graph_rows:
        explainer = Explainer(explainer.model, explainer.input_size, graph_rows=graph_rows)
    if method is None:
        return lambda x: explainer.predict(x)
    return lambda x: explainer.explain(x, [ExplainSpec(method, layer=layer, options=dict(options or {}))] * x.shape[0])


def memory_child(name: str, case: str, device: torch.device) -> dict:
    from camserve.lab.bench import status_kib

    explainer, _profile, batch, _ = load(name, device)
    label, method, layer = next(c for c in CASES if c[0] == case)
    fn = case_fn(explainer, method, layer, GRAPH_ROWS.get(label), CASE_OPTIONS.get(label))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(batch)
        torch.cuda.synchronize(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, "kind": "cuda allocated"}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    fn(batch)  # the case's first call: the RSS also holds one-time costs (autograd engine, kernel set-up)
    rss = (status_kib("VmHWM") - before) / 1024
    # then the tensors' own bytes on a second call (a warm RSS delta would hide them: freed pages stay resident)
    peak, graph = allocator_peak(fn, batch)
    return {"peak_mib": rss, "kind": "RSS high-water mark delta (first call)", "allocated_peak_mib": peak,
            "graph_mib": graph}


def allocator_peak(fn, batch):
    """``(peak, graph)``: the peak of the bytes torch's CPU allocator holds during one call, above
    the start (the profiler's memory timeline: every tensor's creation and destruction), and the
    bytes live when the forward has ended and the backward passes begin (the autograd graph and
    the captured layers: what the backward must read), in MiB (``graph`` is ``None`` for plain
    inference) — what the tensors cost, without the RSS's allocator caching and page effects."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from camserve.engine.pipeline import Explainer

    marks = []
    rounds = Explainer._backward_rounds

    def marked(self, *args, **kwargs):  # this child process only: the time the forward ended
        marks.append(time.time_ns())
        return rounds(self, *args, **kwargs)
    Explainer._backward_rounds = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn(batch)
    finally:
        Explainer._backward_rounds = rounds
    current = peak = 0
    graph = None
    for stamp, action, _key, size in prof._memory_profile().timeline:
        if marks and graph is None and stamp >= marks[0]:
            graph = current
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2 ** 20, (graph / 2 ** 20 if graph is not None else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for byo_cost.json / byo_cost.md")
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, device)))
        return 0
    from camserve.lab.bench import interleaved

    results = {}
    for name in MODELS:
        explainer, profile, batch, load_seconds = load(name, device)
        cases = {label: case_fn(explainer, method, layer, GRAPH_ROWS.get(label), CASE_OPTIONS.get(label))
                 for label, method, layer in CASES}
        samples = interleaved(cases, batch, args.reps, device, clock=args.clock)
        plain = statistics.median(samples["plain"])
        rows = {}
        for label, _method, _layer in CASES:
            median = statistics.median(samples[label])
            rows[label] = {"median_s": median, "ratio": median / plain, "target": TARGETS.get(label)}
        for label, _method, _layer in CASES:
            command = [sys.executable, __file__, "--memory-child", name, label, "--device", args.device,
                       "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            child = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
            rows[label]["peak_mib"] = child.get("peak_mib")
            rows[label]["allocated_peak_mib"] = child.get("allocated_peak_mib")
            rows[label]["graph_mib"] = child.get("graph_mib")
        base_mem = rows["plain"]["peak_mib"]
        base_alloc = rows["plain"]["allocated_peak_mib"]
        for row in rows.values():
            row["memory_ratio"] = (row["peak_mib"] / base_mem) if row["peak_mib"] and base_mem else None
            row["allocated_ratio"] = (row["allocated_peak_mib"] / base_alloc) \
                if row["allocated_peak_mib"] and base_alloc else None
            row["graph_ratio"] = (row["graph_mib"] / base_alloc) if row.get("graph_mib") and base_alloc else None
        stages = {f"stage{i + 1}": s for i, s in enumerate(profile.stages)}
        results[name] = {"input": list(batch.shape), "default_layer": profile.default_layer,
                         "stage1": stages.get("stage1"), "stage2": stages.get("stage2"),
                         "explainer_load_s": load_seconds, "cases": rows}
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared with other work), torch "
                       f"{torch.__version__}, {args.threads} thread(s), device {device}",
            "clock": args.clock, "reps": args.reps, "batch": 8,
            "command": "benchmarks/byo_cost.py " + " ".join(sys.argv[1:])}
    text = markdown(meta, results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "byo_cost.json").write_text(json.dumps({"meta": meta, "models": results}, indent=2))
        (out / "byo_cost.md").write_text(text)
    return 0


def markdown(meta, results) -> str:
    lines = [f"# Explanation cost on bring-your-own models (batch {meta['batch']})", "",
             f"Machine: {meta['machine']}; median {meta['clock']} time of {meta['reps']} interleaved repetitions; "
             f"ratios to plain inference measured in the same run. Command: `{meta['command']}`.", ""]
    for name, r in results.items():
        lines += [f"## {name} — input {tuple(r['input'])}, default layer `{r['default_layer']}`, "
                  f"stage1 `{r['stage1']}`, stage2 `{r['stage2']}`", "",
                  f"Explainer construction (layer discovery + lean-gradient geometry probes): {r['explainer_load_s']:.3f} s", "",
                  "| case | median (s) | × plain | target | RSS peak, 1st call (MiB) | RSS × plain | torch allocated peak (MiB) "
                  "| allocated × plain (target ≤ 2×) | live after the forward (MiB, × plain) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, row in r["cases"].items():
            target = f"≤ {row['target']}×" + (" ✓" if row["ratio"] <= row["target"] else " ✗") if row["target"] else ""
            mem = f"{row['peak_mib']:.1f}" if row["peak_mib"] is not None else "n/a"
            mem_ratio = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else "n/a"
            alloc = row.get("allocated_peak_mib")
            alloc_ratio = row.get("allocated_ratio")
            alloc_text = f"{alloc:.1f}" if alloc is not None else "n/a"
            alloc_ratio_text = (f"{alloc_ratio:.2f}" + (" ✓" if alloc_ratio <= 2.0 else " ✗")) if alloc_ratio else "n/a"
            graph = row.get("graph_mib")
            graph_text = f"{graph:.1f} ({row['graph_ratio']:.2f})" if graph is not None and row.get("graph_ratio") else ""
            lines.append(f"| {label} | {row['median_s']:.4f} | {row['ratio']:.2f} | {target} | {mem} | {mem_ratio} "
                         f"| {alloc_text} | {alloc_ratio_text} | {graph_text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
