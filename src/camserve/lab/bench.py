"""``camserve bench``: what an explanation costs, as a ratio to plain inference in the same run.

For batch sizes 1, 8, 32 every case (camserve's methods, and the peers people would use instead:
pytorch-grad-cam, Captum LayerGradCam + a separate predict, Captum IG with 15 steps = TorchServe's
stock ``explain``) is timed in interleaved repetitions (round r runs every case once, in order), and
the median is divided by the median of plain ``torch.inference_mode`` inference of the same batch.
Every case returns the prediction too (camserve's come from the explanation's own forward; the
peers' need their own). FAM: a batch of 8 query/reference pairs versus the plain embedding of the
same 16 images. Peak memory: one subprocess per case (CPU: ``VmHWM`` minus the RSS before the call;
GPU: ``torch.cuda.max_memory_allocated``), as a ratio to plain inference's.
The model is the bundled EfficientNet-Lite0 unless the model-spec flags name another (any spec
``camserve archive`` accepts); the head CAMs run at ``--head-layer`` (default: the model's default
CAM layer), the shallow ones at ``--shallow-layer`` (default ``stage2``: ``_blocks.2`` of
EfficientNet-Lite0), module paths or stage aliases. An ``embed`` spec has no classifier: only the
FAM cases run. Writes ``cost.json`` and ``cost.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from camserve.lab.image_folders import default_data_dir, load_images
from camserve.commands.local_model import LocalModel, load_local_model
from camserve.commands.machine import machine_description
from camserve.commands.model_args import add_model_arguments, model_argv
from camserve.engine import ExplainSpec
from camserve.engine.methods.similarity.fam import FamExplainer, FamSpec
from camserve.engine import Explainer


def case_targets(head: str, shallow: str) -> Dict[str, float]:
    """Target ratios at batch 8 (issue 2 and 3) of the cases at these layers; the FAM family's
    (issue 21): the last map ≤ 1.10× the plain embedding of the pair, a shallow map ≤ 3×."""
    return {
        "camserve fam sfam weights (pooled), 8 pairs": 1.1, "camserve fam jacobian weights (last map), 8 pairs": 1.1,
        f"camserve fam @{shallow} (relevance route), 8 pairs": 3.0,
        f"camserve fam sfam weights @{shallow} (relevance route), 8 pairs": 3.0,
        f"camserve gradcam @{head}": 1.3, f"camserve layercam @{head}": 1.3,
        f"camserve shallowcam[grad] @{shallow}": 3.0, f"camserve shallowcam[rel] @{shallow}": 3.0,
        f"camserve shallowcam[grad+refine] @{shallow}": 3.0, f"camserve shallowcam[rel+refine] @{shallow}": 3.0,
        "camserve fam (pooled), 8 pairs": 1.1,
    }


SHALLOW_VARIANTS = {"grad": {"spatial": "gradient", "refine": False}, "rel": {"spatial": "relevance", "refine": False},
                    "grad+refine": {"spatial": "gradient", "refine": True},
                    "rel+refine": {"spatial": "relevance", "refine": True}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list (default 1,8,32)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per case (median)")
    parser.add_argument("--ig-max-batch", type=int, default=1, help="largest batch for the IG cases (slow)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: batch 1 and 2, few cases, 2 reps")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory subprocesses")
    parser.add_argument("--no-fam", action="store_true", help="skip the FAM pair cost")
    parser.add_argument("--fam-only", action="store_true",
                        help="only the FAM pair cost (the embedding cases); writes cost_fam.json/.md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time per call: wall clock, or this process's CPU time (use with --threads 1 "
                             "on a CPU shared with other work)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=8, help="batch of the memory measurement")
    parser.add_argument("--head-layer", default=None,
                        help="layer of the head CAMs (module path or stage alias; default: the model's default layer)")
    parser.add_argument("--shallow-layer", default=None,
                        help="layer of the shallow CAMs (default stage2: _blocks.2 of EfficientNet-Lite0; "
                             "stage1 for a one-stage model)")
    parser.add_argument("--data", default=None, help="images to time on: a folder with LABELS.tsv or one "
                        "sub-folder per class (default ../shared/data/imagenet-samples)")
    add_model_arguments(parser)


# -- cases ------------------------------------------------------------------------------------------
def classifier_cases(model, explainer, quick: bool, ig_max_batch: int = 1, head: str = "_conv_head",
                     shallow: str = "_blocks.2") -> Dict[str, Tuple[Callable, int]]:
    """``name → (fn(batch) → predictions, largest batch size)``; each returns the predicted classes;
    head CAMs at ``head``, shallow ones at ``shallow`` (module paths)."""

    def plain(x):
        return explainer.predict(x).argmax(1)

    def camserve(method, layer, options=None):
        def fn(x):
            result = explainer.explain(x, [ExplainSpec(method, layer=layer, options=options or {})] * x.shape[0])
            return result.logits.argmax(1)
        return fn

    def pgc(cls_name, layer):
        import pytorch_grad_cam

        cls = getattr(pytorch_grad_cam, cls_name)
        module = model.get_submodule(layer)

        def fn(x):
            with cls(model=model, target_layers=[module]) as cam:
                cam(input_tensor=x, targets=None)  # argmax targets from its own forward
                return cam.outputs.argmax(1)
        return fn

    def captum_layer_gradcam(x):
        from captum.attr import LayerAttribution, LayerGradCam

        with torch.no_grad():  # not inference_mode: Captum's autograd must be able to save the targets
            predicted = model(x).argmax(1)
        attribution = LayerGradCam(model, model.get_submodule(head)).attribute(x, target=predicted, relu_attributions=True)
        LayerAttribution.interpolate(attribution, x.shape[-2:], interpolate_mode="bilinear")
        return predicted

    def captum_ig(x):
        from captum.attr import IntegratedGradients

        with torch.no_grad():  # not inference_mode: Captum's autograd must be able to save the targets
            predicted = model(x).argmax(1)
        IntegratedGradients(model).attribute(x.clone().requires_grad_(), target=predicted, n_steps=15)
        return predicted

    big = 1 << 30
    cases = {"plain inference": (plain, big),
             f"camserve gradcam @{head}": (camserve("gradcam", head), big),
             f"camserve shallowcam[grad] @{shallow}": (camserve("shallowcam", shallow, SHALLOW_VARIANTS["grad"]), big),
             f"pytorch-grad-cam GradCAM @{head}": (pgc("GradCAM", head), big)}
    if quick:
        return cases
    cases.update({
        f"camserve layercam @{head}": (camserve("layercam", head), big),
        f"camserve gradcampp @{head}": (camserve("gradcampp", head), big),
        f"camserve relevancecam @{head}": (camserve("relevancecam", head), big),
        f"camserve layercam @{shallow}": (camserve("layercam", shallow), big),
    })
    for variant in ("rel", "grad+refine", "rel+refine"):
        cases[f"camserve shallowcam[{variant}] @{shallow}"] = (camserve("shallowcam", shallow, SHALLOW_VARIANTS[variant]), big)
    cases.update({
        f"pytorch-grad-cam LayerCAM @{shallow}": (pgc("LayerCAM", shallow), big),
        f"captum LayerGradCam @{head} + predict": (captum_layer_gradcam, big),
        "camserve captum.integrated_gradients (15 steps)": (
            camserve("captum.integrated_gradients", None, {"steps": 15}), ig_max_batch),
        "captum IG 15 steps + predict (TorchServe stock explain)": (captum_ig, ig_max_batch),
    })
    return cases


def fam_cases(local: LocalModel, images: torch.Tensor, shallow: Optional[str] = None) -> Dict[str, Callable]:
    """8 query/reference pairs (16 images) — plain embedding vs FAM routes (the pooled one only where
    the embedding is the pooled map), the FAM family's weightings (``sfam`` where the embedding is
    the pooled map, ``jacobian``) at the last map and, with ``shallow``, the relevance route at that
    layer. ``neighbour`` weights need a labelled gallery: not timed here."""

    embedding, _route = local.embedding()
    fam = FamExplainer(embedding, input_size=local.profile.input_size)
    queries, references = images[:8], images[8:16]

    def plain(_):
        return fam.embed(torch.cat([queries, references]))

    def route(method, route_name, **options):
        def fn(_):
            return fam.explain(queries, [FamSpec(reference_image=r, method=method, route=route_name, **options)
                                         for r in references])
        return fn

    cases = {"plain embedding of the 16 images": plain}
    if embedding.pooled_route:
        cases["camserve fam (pooled), 8 pairs"] = route("fam", "pooled")
    cases.update({"camserve fam (jacobian route), 8 pairs": route("fam", "jacobian"),
                  "camserve gradcam_similarity, 8 pairs": route("gradcam_similarity", "auto")})
    if embedding.pooled_route:
        cases["camserve fam sfam weights (pooled), 8 pairs"] = route("fam", "auto", weights="sfam")
    cases["camserve fam jacobian weights (last map), 8 pairs"] = route("fam", "auto", weights="jacobian")
    if shallow:
        cases[f"camserve fam @{shallow} (relevance route), 8 pairs"] = route("fam", "auto", layer=shallow)
        if embedding.pooled_route:
            cases[f"camserve fam sfam weights @{shallow} (relevance route), 8 pairs"] = route(
                "fam", "auto", layer=shallow, weights="sfam")
    return cases


# -- timing -----------------------------------------------------------------------------------------
def timed(fn: Callable, x, device: torch.device) -> Tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def interleaved(cases: Dict[str, Callable], x, reps: int, device, clock: str = "wall",
                warm: bool = True) -> Dict[str, List[float]]:
    """One warm-up call per case, then ``reps`` rounds of every case once; seconds per call on
    ``clock`` (``wall``, or ``cpu`` = this process's CPU time, robust to other processes sharing
    the cores). The other clock's samples are kept under ``name + " [wall]"``/``" [cpu]"``."""
    samples: Dict[str, List[float]] = {}
    if warm:
        for fn in cases.values():
            fn(x)
    for _ in range(reps):
        for name, fn in cases.items():
            wall, cpu = timed(fn, x, device)
            samples.setdefault(name, []).append(cpu if clock == "cpu" else wall)
            samples.setdefault(name + (" [wall]" if clock == "cpu" else " [cpu]"), []).append(wall if clock == "cpu" else cpu)
    return samples


def load_batch(n: int, profile, device, data: Optional[str] = None) -> torch.Tensor:
    """``n`` real images (cycled if needed), preprocessed by ``profile``."""
    images, _ = load_images(Path(data) if data else default_data_dir(), min(n, 64), 1, profile, device)
    reps = (n + images.shape[0] - 1) // images.shape[0]
    return images.repeat(reps, 1, 1, 1)[:n].contiguous()


# -- memory -----------------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


FAM_CASE_PREFIXES = ("camserve fam", "camserve gradcam_sim", "plain embedding")


def bench_model(args, device: torch.device):
    """``(LocalModel, Explainer or None, head layer, shallow layer)`` of the spec flags; an ``embed``
    spec gets no explainer (no classifier cases)."""

    local = load_local_model(args, device)
    head = local.resolve_layers([args.head_layer or local.profile.default_layer], "--head-layer")[0]
    shallow = local.resolve_layers([args.shallow_layer or ("stage2" if len(local.profile.stages) > 1 else "stage1")],
                                   "--shallow-layer")[0]
    explainer = None
    if local.spec.task == "classify":
        explainer = Explainer.for_profile(local.module, local.profile)
    return local, explainer, head, shallow


def memory_child(case: str, batch: int, args) -> dict:
    """Run ``case`` once on a fresh process; peak memory above the state before the call (MiB)."""
    device = torch.device(args.device)
    local, explainer, head, shallow = bench_model(args, device)
    x = load_batch(16 if case.startswith(FAM_CASE_PREFIXES) else batch, local.profile, device, args.data)
    cases = {}
    if explainer is not None:
        cases = {k: v[0] for k, v in classifier_cases(local.module, explainer, False, 1, head, shallow).items()}
    if case not in cases:
        cases.update(fam_cases(local, x, shallow))
    fn = cases[case]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(x)
        torch.cuda.synchronize(device)
        return {"case": case, "peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, "kind": "cuda allocated"}
    try:  # reset VmHWM to the current RSS (Linux ≥ 4.0, own process, no privilege needed)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status_kib("VmRSS")
    fn(x)
    return {"case": case, "peak_mib": (status_kib("VmHWM") - before) / 1024, "kind": "RSS high-water mark delta",
            "hwm_before_mib": before / 1024}


def memory_command(case: str, batch: int, args) -> List[str]:
    """The child process measuring ``case``: the same model spec, layers, images and threads."""
    command = [sys.executable, "-m", "camserve.cli.main", "bench", "--memory-child", case,
               "--memory-batch", str(batch), "--device", args.device, *model_argv(args)]
    for flag, value in (("--head-layer", args.head_layer), ("--shallow-layer", args.shallow_layer),
                        ("--data", args.data)):
        if value:
            command += [flag, value]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def measure_memory(cases: List[str], batch: int, args) -> Dict[str, dict]:
    results = {}
    for case in cases:
        done = subprocess.run(memory_command(case, batch, args), capture_output=True, text=True)
        if done.returncode != 0:
            results[case] = {"case": case, "error": done.stderr.strip().splitlines()[-1:]}
            continue
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# -- main -------------------------------------------------------------------------------------------
def summarise_samples(group: str, samples: Dict[str, List[float]], base_name: str, batch: int, images: int) -> List[dict]:
    """Median, images/s and ratio to ``base_name`` per case, on the chosen clock and the other one."""
    rows = []
    other = next(k for k in samples if k.startswith(base_name + " ["))
    suffix = other[len(base_name):]
    base, base_other = statistics.median(samples[base_name]), statistics.median(samples[other])
    for name, values in samples.items():
        if name.endswith(suffix):
            continue
        median, median_other = statistics.median(values), statistics.median(samples[name + suffix])
        rows.append({"group": group, "case": name, "batch": batch, "median_s": median, "images_per_s": images / median,
                     "ratio": median / base, "samples_s": values,
                     "ratio" + suffix.replace(" ", "_").replace("[", "").replace("]", ""): median_other / base_other,
                     "median" + suffix.replace(" ", "_").replace("[", "").replace("]", "") + "_s": median_other})
    return rows


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_batch, args)))
        return 0
    device = torch.device(args.device)
    batch_sizes = [1, 2] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    reps = 2 if args.quick else args.reps
    started = time.time()
    local, explainer, head, shallow = bench_model(args, device)
    profile = local.profile
    cases = (classifier_cases(local.module, explainer, args.quick, args.ig_max_batch, head, shallow)
             if explainer and not args.fam_only else {})
    rows = []
    for batch in batch_sizes if cases else []:
        x = load_batch(batch, profile, device, args.data)
        active = {name: fn for name, (fn, limit) in cases.items() if batch <= limit}
        samples = interleaved(active, x, reps, device, args.clock, warm=batch == batch_sizes[0] or args.quick)
        rows += summarise_samples("classifier", samples, "plain inference", batch, batch)
        print(f"batch {batch}: " + ", ".join(f"{r['case']} {r['ratio']:.2f}×" for r in rows if r["batch"] == batch),
              flush=True)
    if not args.no_fam or not cases:
        x16 = load_batch(16, profile, device, args.data)
        fam = fam_cases(local, x16, shallow)
        if args.quick:  # the pooled route when the embedding has one, else the Jacobian route
            keep = ("camserve fam (pooled), 8 pairs" if "camserve fam (pooled), 8 pairs" in fam
                    else "camserve fam (jacobian route), 8 pairs")
            fam = {k: v for k, v in fam.items() if k in ("plain embedding of the 16 images", keep)}
        samples = interleaved(fam, x16, reps, device, args.clock)
        rows += summarise_samples("embedding", samples, "plain embedding of the 16 images", 8, 16)
    memory = {}
    if not args.no_memory:
        memory_batch = 2 if args.quick else 8
        names = ["plain inference"] if cases else []
        names += [r["case"] for r in rows if r["batch"] == memory_batch and r["group"] == "classifier"
                  and r["case"] != "plain inference" and "integrated" not in r["case"] and "IG" not in r["case"]]
        names += [r["case"] for r in rows if r["group"] == "embedding"]
        if args.quick:  # one subprocess per case: keep the quick mode quick
            names = [n for n in names if n == "plain inference" or n.startswith("camserve shallowcam")] if cases else \
                [n for n in names if n.startswith(("plain embedding", "camserve fam"))]
        memory = measure_memory(list(dict.fromkeys(names)), memory_batch, args)
        plain_peak = memory.get("plain inference", {}).get("peak_mib")
        embed_peak = memory.get("plain embedding of the 16 images", {}).get("peak_mib")
        for name, m in memory.items():
            base = embed_peak if name.startswith(FAM_CASE_PREFIXES) else plain_peak
            if "peak_mib" in m and base:
                m["ratio"] = m["peak_mib"] / base
    weights = "pretrained" if local.bundled else (f"weights {local.spec.weights}" if local.spec.weights else "random weights")
    meta = {
        "command": "camserve bench " + " ".join(a for a in sys.argv[2:] if sys.argv[1:2] == ["bench"]) if sys.argv[1:2] == ["bench"]
        else "camserve bench " + " ".join(sys.argv[1:]),
        "device": str(device), "machine": machine_description(device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "reps": reps, "clock": args.clock, "batch_sizes": batch_sizes,
        "load_average_at_end": os.getloadavg(), "wall_seconds": round(time.time() - started, 1),
        "model": f"{local.name} ({weights}), {profile.crop}×{profile.crop}, real photographs",
        "title": f"{'EfficientNet-Lite0' if local.bundled else local.name} {profile.crop}×{profile.crop}",
        "spec": local.spec.to_mapping(), "layers": {"head": head, "shallow": shallow}, "stages": local.stage_aliases,
    }
    if not cases:
        meta["notes"] = ["--fam-only: only the FAM cases ran" if args.fam_only
                         else "an embed spec has no classifier: only the FAM cases ran"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cost_quick" if args.quick else "cost_fam" if args.fam_only else "cost"
    targets = case_targets(head, shallow)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "timings": rows, "memory": memory}, indent=1))
    (out / f"{name}.md").write_text(markdown(meta, rows, memory, batch_sizes, targets))
    print(markdown(meta, rows, memory, batch_sizes, targets))
    return 0


def markdown(meta, rows, memory, batch_sizes, targets: Dict[str, float]) -> str:
    table = {(r["case"], r["batch"]): r for r in rows}
    lines = [f"Cost of an explanation on {meta['machine']} ({meta['device']}, torch {meta['torch']}, "
             f"{meta['torch_threads']} threads), {meta['title']}: median {meta['clock']} time of {meta['reps']} interleaved "
             f"repetitions, ratio to plain `inference_mode` prediction of the same batch in the same run "
             f"(every case also returns the prediction). Load average at the end: "
             f"{', '.join(f'{v:.1f}' for v in meta['load_average_at_end'])}."]
    names = list(dict.fromkeys(r["case"] for r in rows if r["group"] == "classifier"))
    if names:
        lines += ["", "| case | " + " | ".join(f"batch {b}: ratio (img/s)" for b in batch_sizes)
                  + " | target (batch 8) | peak memory vs plain |", "|---|" + "---:|" * len(batch_sizes) + "---|---:|"]
    for name in names:
        cells = []
        for b in batch_sizes:
            r = table.get((name, b))
            cells.append(f"{r['ratio']:.2f}× ({r['images_per_s']:.1f})" if r else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {target_cell(name, table.get((name, 8)), targets)} | {memory_cell(memory.get(name))} |")
    fam_rows = [r for r in rows if r["group"] == "embedding"]
    if fam_rows:
        lines += ["", "FAM: 8 query/reference pairs (one forward over the 16 images) vs plain embedding of the same 16 images:", "",
                  "| case | ratio | images/s | target | peak memory vs plain |", "|---|---:|---:|---|---:|"]
        for r in fam_rows:
            lines.append(f"| {r['case']} | {r['ratio']:.2f}× | {r['images_per_s']:.1f} | {target_cell(r['case'], r, targets)} | "
                         f"{memory_cell(memory.get(r['case']))} |")
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_seconds']} s)."]
    return "\n".join(lines) + "\n"


def target_cell(name: str, row: Optional[dict], targets: Dict[str, float]) -> str:
    if name not in targets:
        return ""
    if row is None:
        return f"≤ {targets[name]}×"
    return f"≤ {targets[name]}× {'met' if row['ratio'] <= targets[name] else '**missed**'}"


def memory_cell(m: Optional[dict]) -> str:
    if not m:
        return ""
    if "peak_mib" not in m:
        return "error"
    ratio = f" ({m['ratio']:.2f}×)" if "ratio" in m else ""
    return f"{m['peak_mib']:.0f} MiB{ratio}"
