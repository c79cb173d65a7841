"""camserve beside OpenVINO XAI on the same model, photographs and threads, in one run.

    ./scripts/setup_openvino_xai_env.sh                      # the peer's own environment (numpy 1.x)
    PYTHONPATH=src .venv/bin/python benchmarks/openvino_peer.py --out benchmarks/results/openvino_peer

The peer (``benchmarks/peer/openvino_xai_worker.py`` in ``.venv-ovxai``: openvino 2024.4, openvino-xai
1.1) and camserve (this process: the serving runtime of ``handler.runtime`` defaults) take turns, in
``--blocks`` alternating blocks of ``--rounds`` rounds each, so both see the same machine load; every
figure is the median over all rounds of ms per image (16 photographs, camserve's own preprocessing,
exported once by ``benchmarks/peer/export_model.py``). On both sides: float32, ``--threads`` threads,
batch 1 (16 calls) and batch 8 (2 calls).

camserve's variants: ``eager_plain`` (the engine as it served before the runtime: contiguous memory,
PyTorch forward), ``plain`` (the served runtime: fast path on OpenVINO 2026), ``cam`` / ``gradcam`` /
``layercam`` at the last feature map (fast path: maps from the runtime's map, Grad-CAM's gradient from
the head), ``shallowcam`` at ``_blocks.4`` (eager engine, memory format chosen by the load probe). The
engine call is timed as a worker makes it (``explain(..., layer_resolution=True)``: maps at layer
resolution, normalised, no PNG), which is what the peer's saliency output is too.

A second part measures ``precision: bfloat16`` on the fast path: time, top-1 agreement and the maps'
difference from float32's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.models.bundled import load_effnet_lite0
from camserve.engine.runtime import RuntimeSettings, build_fast_path, choose_memory_format

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-ovxai" / "bin" / "python"
SIZE = (224, 224)
SHALLOW = "_blocks.4"
SPECS = {"eager_plain": None, "plain": None, "cam": ExplainSpec("cam"), "gradcam": ExplainSpec("gradcam"),
         "layercam": ExplainSpec("layercam"), "shallowcam": ExplainSpec("shallowcam", layer=SHALLOW)}


def export(work: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "peer" / "export_model.py"), "--out", str(work)],
                   check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src"), "CI": "true"})  # CI: no OpenVINO telemetry
    return work


def inputs_of(work: Path) -> torch.Tensor:
    files = sorted((work / "inputs").glob("batch8_*.npy"))
    return torch.from_numpy(np.concatenate([np.load(f) for f in files]))


def peer_block(work: Path, threads: int, rounds: int) -> dict:
    out = subprocess.run([str(PEER_PYTHON), str(REPO / "benchmarks" / "peer" / "openvino_xai_worker.py"),
                          "--model", str(work / "effnet_lite0.xml"), "--inputs", str(work / "inputs"),
                          "--threads", str(threads), "--rounds", str(rounds), "--batch", "1", "8"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


class Camserve:
    """The explainers a worker would build: one eager (before), one with the served runtime (after)."""

    def __init__(self, precision: str = "float32"):
        self.eager_model = load_effnet_lite0()
        self.eager = Explainer(self.eager_model, SIZE)
        model = load_effnet_lite0()
        self.layout = choose_memory_format(model, SIZE, "auto")
        self.served = Explainer(model, SIZE)
        fast, why = build_fast_path(model, self.served.default_layer, SIZE, RuntimeSettings(precision=precision),
                                    torch.device("cpu"))
        if fast is None:
            raise SystemExit(f"no fast path: {why}")
        self.fast_description = why
        self.served.use_fast_path(fast)

    def call(self, variant: str, images: torch.Tensor):
        explainer = self.eager if variant == "eager_plain" else self.served
        return explainer.explain(images, [SPECS[variant]] * images.shape[0], layer_resolution=True)

    def round(self, images: torch.Tensor, order) -> dict:
        """Each (variant, batch) once over all images; ms per image."""
        out = {}
        for variant, batch in order:
            start = time.perf_counter()
            for begin in range(0, images.shape[0], batch):
                self.call(variant, images[begin:begin + batch])
            out[f"{variant}_b{batch}"] = (time.perf_counter() - start) * 1000 / images.shape[0]
        return out


def camserve_block(camserve: Camserve, images: torch.Tensor, rounds: int, series: dict) -> None:
    keys = [(v, b) for v in SPECS for b in (1, 8)]
    camserve.round(images, keys)  # warm-up
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key, ms in camserve.round(images, order).items():
            series.setdefault(key, []).append(ms)


def bf16_effect(images: torch.Tensor) -> dict:
    """The fast path at bfloat16 against float32: top-1 agreement, map difference, time."""
    f32, bf16 = Camserve("float32"), Camserve("bfloat16")
    specs = [ExplainSpec("gradcam")] * images.shape[0]
    a = f32.served.explain(images, specs, layer_resolution=True)
    b = bf16.served.explain(images, specs, layer_resolution=True)
    diffs = [float((x.maps - y.maps).abs().max()) for x, y in zip(a.explanations, b.explanations)]
    spearman = []
    for x, y in zip(a.explanations, b.explanations):
        rx, ry = (t.flatten().argsort().argsort().double() for t in (x.maps, y.maps))
        spearman.append(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]))
    times = {}
    for name, side in (("float32", f32), ("bfloat16", bf16)):
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for begin in range(0, images.shape[0], 8):
                side.served.explain(images[begin:begin + 8], specs[:8], layer_resolution=True)
            runs.append((time.perf_counter() - start) * 1000 / images.shape[0])
        times[name] = statistics.median(runs)
    return {"top1_agreement": float((a.logits.argmax(1) == b.logits.argmax(1)).float().mean()),
            "max_abs_map_difference": max(diffs), "median_max_abs_map_difference": statistics.median(diffs),
            "min_spearman": min(spearman), "median_spearman": statistics.median(spearman),
            "gradcam_b8_ms_per_image": times, "bf16_description": bf16.fast_description}


def table(camserve: dict, peer: dict) -> str:
    rows = ["| ms per image (median) | batch 1 | batch 8 |", "|---|---:|---:|"]
    for name in ("plain", "reciprocam", "activationmap"):
        rows.append(f"| OpenVINO XAI {name} | {peer[name + '_b1']:.2f} | {peer[name + '_b8']:.2f} |")
    for name in SPECS:
        rows.append(f"| camserve {name} | {camserve[name + '_b1']:.2f} | {camserve[name + '_b8']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per block per side")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per side")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    if not PEER_PYTHON.exists():
        raise SystemExit("the peer's environment is missing: run ./scripts/setup_openvino_xai_env.sh")
    torch.set_num_threads(args.threads)
    work = export(Path(tempfile.mkdtemp(prefix="openvino-peer-")))
    images = inputs_of(work)
    camserve = Camserve()
    load_start = os.getloadavg()[0]
    ours: dict = {}
    theirs: dict = {}
    peer_meta = None
    for _ in range(args.blocks):
        block = peer_block(work, args.threads, args.rounds)
        peer_meta = block
        for key, value in block["variants"].items():
            theirs.setdefault(key, []).extend(value.get("rounds_ms", [value["ms_per_image"]]))
        camserve_block(camserve, images, args.rounds, ours)
    med_ours = {k: statistics.median(v) for k, v in ours.items()}
    med_theirs = {k: statistics.median(v) for k, v in theirs.items()}
    ratios = {}
    for b in (1, 8):
        ratios[f"gradcam_vs_reciprocam_b{b}"] = med_ours[f"gradcam_b{b}"] / med_theirs[f"reciprocam_b{b}"]
        ratios[f"cam_vs_activationmap_b{b}"] = med_ours[f"cam_b{b}"] / med_theirs[f"activationmap_b{b}"]
        ratios[f"plain_vs_openvino_plain_b{b}"] = med_ours[f"plain_b{b}"] / med_theirs[f"plain_b{b}"]
        ratios[f"plain_vs_eager_plain_b{b}"] = med_ours[f"plain_b{b}"] / med_ours[f"eager_plain_b{b}"]
        ratios[f"shallowcam_vs_eager_plain_b{b}"] = med_ours[f"shallowcam_b{b}"] / med_ours[f"eager_plain_b{b}"]
        ratios[f"shallowcam_vs_plain_b{b}"] = med_ours[f"shallowcam_b{b}"] / med_ours[f"plain_b{b}"]
    bf16 = bf16_effect(images)
    result = {"machine": f"{os.cpu_count()} CPU cores (shared), load {load_start:.2f} → {os.getloadavg()[0]:.2f}",
              "threads": args.threads, "rounds_per_side": args.rounds * args.blocks, "images": int(images.shape[0]),
              "camserve_ms_per_image": med_ours, "peer_ms_per_image": med_theirs, "ratios": ratios,
              "camserve_runtime": {"memory_format": camserve.layout.describe(), "fast_path": camserve.fast_description},
              "peer_versions": peer_meta["versions"], "peer_refusals": peer_meta.get("refusals"),
              "bfloat16": bf16, "torch": torch.__version__}
    text = table(med_ours, med_theirs)
    print(text)
    print(json.dumps({"ratios": ratios, "bfloat16": bf16}, indent=1))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"# camserve beside OpenVINO XAI ({result['machine']}, {args.threads} thread(s), float32)", "",
                 text, "", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
