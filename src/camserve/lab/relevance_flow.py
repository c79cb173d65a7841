"""Where does the relevance go? Net relevance at every module output between the logits and a stage.

``python -m camserve.lab.relevance_flow --images 8 --blocks 11-15 --out benchmarks/results``

For each module output ``t`` listed (every convolution and BatchNorm of the chosen MBConv blocks,
each block's output, ``_conv_head``/``_bn1``), the relevance ``R_t = t ⊙ g_t`` of the served
Shallow-CAM backward (the composite and canonizer asked for; the plain start, 1 on the target
logit) is summed over channels and positions: ``ΣR_t / R_logit``. A conservative chain keeps this at
1 all the way down; the step where it falls says which module absorbs relevance, and why is read
off the module type:

* a convolution under z⁺ loses ``R_y · b⁺ / z⁺`` to a positive bias and *all* of ``R_y`` at outputs
  whose window holds no positive contribution (``z⁺ = 0``; the stabiliser turns ``y / z⁺`` into 0);
* a BatchNorm under the pass rule keeps ``R_x = R_y`` — but its shift makes ``y ≠ 0`` where the
  convolution before it produced ``x = 0``, so relevance arrives at convolution outputs whose
  windows are empty (the previous bullet): the shift absorbs it one step later.

The second number per row, ``ΣR_t(z⁺ window empty)``, is the relevance arriving at a convolution
output whose positive pre-activation ``z⁺`` is zero: exactly what that convolution destroys.
A diagnostic of the rules, not a faithfulness score: it runs on the first ``--images`` photographs of
the choose half (the even rows of the shared samples).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from camserve.engine import ExplainSpec
from camserve.engine.lrp.composites import get_composite
from camserve.engine.lrp.starts import START_OPTION_CHOICES, RelevanceStartOptions, relevance_seed
from camserve.engine.methods import REGISTRY, CamMethod
from camserve.engine.models import EFFNET_LITE0, EFFNET_LITE1, EFFNET_LITE2, load_effnet_lite
from camserve.engine.pipeline import Explainer
from camserve.lab.image_folders import default_data_dir, load_images


PROFILES = {"effnet-lite0": EFFNET_LITE0, "effnet-lite1": EFFNET_LITE1, "effnet-lite2": EFFNET_LITE2}


def block_modules(model: nn.Module, blocks: List[int]) -> List[str]:
    """Module paths, deep to shallow: the head's BN and conv, then per block (last first) its output,
    ``_bn2``, ``_project_conv``, ``_bn1``, ``_depthwise_conv``, ``_bn0``, ``_expand_conv`` (those it has)."""
    names = dict(model.named_modules())
    paths = ["_bn1", "_conv_head"]
    for b in sorted(blocks, reverse=True):
        paths.append(f"_blocks.{b}")
        for part in ("_bn2", "_project_conv", "_bn1", "_depthwise_conv", "_bn0", "_expand_conv"):
            if f"_blocks.{b}.{part}" in names:
                paths.append(f"_blocks.{b}.{part}")
    return paths


def flow(model: nn.Module, images: torch.Tensor, paths: List[str], composite: str, canonizer) -> List[Dict]:
    """``ΣR / R_logit`` (mean over images) at each path, and the part of it on empty z⁺ windows."""
    sums: List[torch.Tensor] = []
    modules = dict(model.named_modules())

    class Probe(RelevanceStartOptions, CamMethod):
        name = "_relevance_flow_probe"
        needs_relevance = True
        option_choices = dict(START_OPTION_CHOICES)

        def compute(self, layer, captured, options):
            r = captured.relevance(layer).double()
            logits = captured.logits.double()
            seed = relevance_seed(logits, captured.targets, ["target"] * len(logits))
            initial = (logits * seed).sum(1)
            empty = torch.zeros_like(initial)
            module = modules[layer]
            if isinstance(module, nn.Conv2d) and layer in self.inputs:
                x = self.inputs[layer]
                with torch.no_grad():
                    w = module.weight.clamp(min=0)
                    z_pos = module._conv_forward(x.clamp(min=0), w, None) if hasattr(module, "_conv_forward") \
                        else None
                    if z_pos is not None and z_pos.shape == r.shape:
                        z_neg_in = module._conv_forward(x.clamp(max=0), module.weight.clamp(max=0), None)
                        empty = (r * ((z_pos + z_neg_in) <= 0)).flatten(1).sum(1)
            sums.append(torch.stack([r.flatten(1).sum(1), empty, initial], 1))
            return captured.activations[layer].sum(1)

    probe = Probe()
    probe.inputs = {}
    registry = REGISTRY.extended(probe)
    explainer = Explainer(model, tuple(images.shape[-2:]), composite=get_composite(composite), canonizer=canonizer,
                          registry=registry)
    rows = []
    for path in paths:
        sums.clear()
        module = modules[path]
        handle = None
        if isinstance(module, nn.Conv2d):
            def keep_input(mod, args, _path=path):
                x = args[0]
                pad = getattr(mod, "static_padding", None)
                probe.inputs[_path] = (pad(x) if pad is not None else x).detach()
            handle = module.register_forward_pre_hook(keep_input)
        try:
            explainer.explain(images, [ExplainSpec(Probe.name, layer=path, options={"start": "target"})] * images.shape[0])
        finally:
            if handle is not None:
                handle.remove()
            probe.inputs.clear()
        s = torch.cat(sums)
        rows.append({"layer": path, "type": type(module).__name__,
                     "net_over_logit": float((s[:, 0] / s[:, 2]).mean()),
                     "on_empty_windows_over_logit": float((s[:, 1] / s[:, 2]).mean()), "n": int(len(s))})
    return rows


def render(rows: List[Dict], meta: Dict) -> str:
    name = {"effnet-lite0": "EfficientNet-Lite0", "effnet-lite1": "EfficientNet-Lite1",
            "effnet-lite2": "EfficientNet-Lite2"}.get(meta.get("model", "effnet-lite0"), meta.get("model"))
    lines = [f"# Relevance flow through {name} ({meta['composite']}, canonizer {meta['canonizer']})", "",
             f"Command: `{meta['command']}`; {meta['machine']}, torch threads {meta['threads']}, "
             f"{meta['images']} photographs, {meta['seconds']:.0f} s.", "",
             "ΣR_t / R_logit: the served Shallow-CAM backward's net relevance at each module output, relative to "
             "the target logit's (mean over images); on empty windows: the part of it at convolution outputs "
             "whose positive pre-activation z⁺ is 0 (destroyed by that convolution under z⁺).", "",
             "| module output | type | ΣR / R_logit | of which on empty z⁺ windows |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['layer']}` | {r['type']} | {r['net_over_logit']:.4f} | "
                     f"{r['on_empty_windows_over_logit']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--model", choices=tuple(PROFILES), default="effnet-lite0",
                        help="the bundled EfficientNet-Lite (default effnet-lite0)")
    parser.add_argument("--blocks", default="11-15", help="MBConv blocks to open, e.g. 11-15 or 0,4,10 ('all': every one)")
    parser.add_argument("--composite", default="epsilon_plus")
    parser.add_argument("--canonizer", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_effnet_lite(args.model.replace("effnet-", "efficientnet-"))
    blocks: List[int] = []
    for part in args.blocks.split(",") if args.blocks != "all" else [f"0-{len(model._blocks) - 1}"]:
        low, _, high = part.partition("-")
        blocks += list(range(int(low), int(high or low) + 1))
    images, _rows = load_images(default_data_dir(), args.images, 2, PROFILES[args.model], torch.device("cpu"))  # even rows
    start = time.perf_counter()
    rows = flow(model, images, block_modules(model, blocks), args.composite, args.canonizer)
    meta = {"model": args.model, "composite": args.composite, "canonizer": args.canonizer, "images": int(images.shape[0]),
            "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "seconds": time.perf_counter() - start,
            "command": "python -m camserve.lab.relevance_flow " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = render(rows, meta)
    print(text)
    if args.out:
        stem = f"relevance_flow_{args.model}_{args.composite}_{args.canonizer or 'none'}"
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
