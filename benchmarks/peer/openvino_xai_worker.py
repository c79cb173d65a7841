"""OpenVINO XAI (openvino-xai 1.1.0, openvino 2024.4) half of the camserve-vs-OpenVINO-XAI benchmark.

Runs in the PEER environment (``scripts/setup_openvino_xai_env.sh`` makes ``.venv-ovxai/``):

    .venv-ovxai/bin/python benchmarks/peer/openvino_xai_worker.py --model /tmp/ovxai/effnet_lite0.xml \
        --inputs /tmp/ovxai/inputs --threads 1 --rounds 20 --batch 1 8 --maps-out /tmp/ovxai/maps

Variants, each at every ``--batch``: ``plain`` (the compiled model, no XAI), ``reciprocam`` and
``activationmap`` (``openvino_xai.insert_xai``: the saliency map is an extra output, ``saliency_map``,
of the same inference as the logits). Every variant runs on OpenVINO's CPU plugin with
``INFERENCE_NUM_THREADS=threads``, ``INFERENCE_PRECISION_HINT=f32`` (this CPU has avx512_bf16 and
OpenVINO would otherwise silently run in bf16: logits off by ~0.2) and ``PERFORMANCE_HINT=LATENCY``.
Each (variant, batch) gets its own model reshaped to a static batch and compiled (``--shapes dynamic``
keeps the exported ``?`` batch instead). A (variant, batch) that OpenVINO refuses (ReciproCAM at
batch 8) is recorded with the refusal's message and timed as ``batch`` calls of its batch-1 model.

Timing: one round = every (variant, batch) once over all the images (batch 1: one call per image;
batch 8: one call per 8 images), the order rotated each round; ``--warmup`` rounds are discarded;
the figure is the median over rounds of the round's time divided by the number of images, in ms per
image (each call's outputs, logits and map, are read back). One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_xai as xai

METHODS = {"reciprocam": xai.Method.RECIPROCAM, "activationmap": xai.Method.ACTIVATIONMAP}
PROPERTIES = ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS",
              "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE")


def first_line(error: BaseException) -> str:
    """The informative lines of an OpenVINO exception, joined (they come as a stack of 'Exception from')."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: " + " | ".join(lines)[:1200]


def compiled_properties(cm) -> dict:
    props = {}
    for k in PROPERTIES:
        try:
            value = cm.get_property(k)
        except Exception:  # noqa: BLE001 - not every property exists in every version
            continue
        props[k] = value.get_type_name() if isinstance(value, ov.Type) else str(value)
    return props


def load_inputs(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    images = np.concatenate([np.load(folder / name) for name in manifest["batches"]]).astype(np.float32)
    torch_logits = np.load(folder / "torch_logits.npy") if (folder / "torch_logits.npy").exists() else None
    return manifest, np.ascontiguousarray(images), torch_logits


def build(core: ov.Core, path: Path, variant: str, embed_scaling: bool = True) -> ov.Model:
    model = core.read_model(str(path))
    if variant == "plain":
        return model
    return xai.insert_xai(model, task=xai.Task.CLASSIFICATION, explain_method=METHODS[variant],
                          embed_scaling=embed_scaling)


def with_batch(model: ov.Model, batch: int) -> ov.Model:
    model = model.clone()
    shape = model.input(0).get_partial_shape()
    shape[0] = batch
    model.reshape({model.input(0): shape})
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="OpenVINO IR .xml (or ONNX) of the model")
    parser.add_argument("--inputs", type=Path, required=True, help="folder of export_model.py's inputs/")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], choices=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["plain", "reciprocam", "activationmap"],
                        choices=["plain", "reciprocam", "activationmap"])
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                        help="INFERENCE_PRECISION_HINT (f32 unless you want to see what bf16 does)")
    parser.add_argument("--pinning", default="default", choices=["default", "on", "off"],
                        help="ENABLE_CPU_PINNING (OpenVINO's default with LATENCY on Linux: on)")
    parser.add_argument("--shapes", default="static", choices=["static", "dynamic"])
    parser.add_argument("--maps-out", type=Path, help="save the first image's saliency maps here (.npy)")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": args.precision,
              "PERFORMANCE_HINT": "LATENCY"}
    if args.pinning != "default":
        config["ENABLE_CPU_PINNING"] = args.pinning == "on"
    manifest, images, torch_logits = load_inputs(args.inputs)
    n = len(images)
    if n % 8:
        raise SystemExit(f"{n} images: a multiple of 8 is needed")

    result = {
        "peer": "openvino_xai", "device": "CPU",
        "versions": {"openvino": ov.__version__, "openvino_xai": getattr(xai, "__version__", None) or
                     __import__("importlib.metadata").metadata.version("openvino-xai"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "threads": args.threads, "precision_hint": args.precision, "performance_hint": "LATENCY",
        "shapes": args.shapes, "pinning": args.pinning, "rounds": args.rounds, "warmup_rounds": args.warmup,
        "images": n,
        "files": manifest.get("files"), "unit": "ms per image, median over rounds",
        "cpu": {"model": platform.processor() or None, "optimization_capabilities":
                list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), "os_cpu_count": os.cpu_count()},
        "variants": {}, "refusals": {}, "saliency_map_shapes": {}, "checks": {},
    }
    cpu_name = core.get_property("CPU", "FULL_DEVICE_NAME")
    result["cpu"]["model"] = cpu_name

    # ---- build and compile every (variant, batch); a refused batch falls back to batch-1 calls
    runners = {}  # key -> (callable over all images, description)
    base_models = {v: build(core, args.model, v) for v in args.variants}
    for variant in args.variants:
        base = base_models[variant]
        if variant != "plain":
            from openvino_xai.inserter.model_parser import IRParserCls, ModelType
            target = IRParserCls.get_target_node(core.read_model(str(args.model)), ModelType.CNN)
            result["checks"][f"{variant}_target_node"] = target.get_friendly_name()
            result["checks"][f"{variant}_target_shape"] = str(target.get_output_partial_shape(0))
            result["checks"][f"{variant}_saliency_output"] = str(base.output("saliency_map").get_partial_shape()) + \
                " " + str(base.output("saliency_map").get_element_type().get_type_name())
        compiled = {}
        for batch in sorted(set([1] + args.batch)):
            key = f"{variant}_b{batch}"
            try:
                model = base if args.shapes == "dynamic" else with_batch(base, batch)
                cm = core.compile_model(model, "CPU", config)
                request = cm.create_infer_request()
                request.infer({0: images[:batch]})  # a refusal at run time (dynamic shapes) shows here
                compiled[batch] = (cm, request)
            except Exception as error:  # noqa: BLE001 - the message is the result
                result["refusals"][key] = {"stage": "reshape/compile/infer", "message": first_line(error)}
        if 1 not in compiled:
            raise SystemExit(f"{variant}: batch 1 refused: {result['refusals'].get(variant + '_b1')}")
        if variant == "reciprocam" and 8 in args.batch:
            # the refusal as a user of the dynamic-batch model meets it: at inference, batch 8
            try:
                cm = core.compile_model(base, "CPU", config)
                cm.create_infer_request().infer({0: images[:8]})
                result["checks"]["reciprocam_dynamic_batch8_infer"] = "ok"
            except Exception as error:  # noqa: BLE001
                result["checks"]["reciprocam_dynamic_batch8_infer"] = first_line(error)
        for batch in args.batch:
            key = f"{variant}_b{batch}"
            if batch in compiled:
                request = compiled[batch][1]
                runners[key] = (lambda req=request, b=batch: [req.infer({0: images[i:i + b]})
                                                             for i in range(0, n, b)],
                                f"{n // batch} call(s) of batch {batch}")
            else:
                request = compiled[1][1]
                runners[key] = (lambda req=request: [req.infer({0: images[i:i + 1]}) for i in range(n)],
                                f"REFUSED at batch {batch}: timed as {n} batch-1 calls ({batch} per batch of {batch})")
            props = compiled_properties(compiled.get(batch, compiled[1])[0])
            seen = result.setdefault("compiled_properties", props)
            if props != seen:
                result["checks"][f"{key}_compiled_properties_differ"] = props

    # ---- correctness checks (outside the timing): logits vs torch, map shapes, batch-8 map scaling
    first_maps = {}
    for key, (run, _) in runners.items():
        outs = run()
        logits = np.concatenate([o["logits"] for o in outs])
        if torch_logits is not None:
            result["checks"][f"{key}_max_abs_logit_diff_vs_torch"] = float(np.abs(logits - torch_logits).max())
            result["checks"][f"{key}_top1_agrees_with_torch"] = int((logits.argmax(1) == torch_logits.argmax(1)).sum())
        if "saliency_map" in outs[0]:
            result["saliency_map_shapes"][key] = {"per_call": list(outs[0]["saliency_map"].shape),
                                                  "dtype": str(outs[0]["saliency_map"].dtype),
                                                  "calls": len(outs)}
            first_maps[key] = outs[0]["saliency_map"]
    if "activationmap_b1" in first_maps and "activationmap_b8" in first_maps:
        b1, b8 = first_maps["activationmap_b1"][0].astype(int), first_maps["activationmap_b8"][0].astype(int)
        result["checks"]["activationmap_image0_b8_vs_b1_max_abs_diff_u8"] = int(np.abs(b1 - b8).max())
        result["checks"]["activationmap_b8_note"] = (
            "embed_scaling min-max scales over the whole batch (reduce over axes 0,1,2), not per image"
            if np.abs(b1 - b8).max() > 1 else "b8 map of image 0 equals its b1 map")

    if args.maps_out:
        args.maps_out.mkdir(parents=True, exist_ok=True)
        saved = {}
        top1 = int(torch_logits[0].argmax()) if torch_logits is not None else None
        for key, maps in first_maps.items():
            np.save(args.maps_out / f"{key}_u8.npy", maps[:1] if maps.ndim == 3 else maps)
            saved[f"{key}_u8.npy"] = list((maps[:1] if maps.ndim == 3 else maps).shape)
        for variant in args.variants:  # unscaled float maps too (embed_scaling=False), batch 1
            if variant == "plain":
                continue
            cm = core.compile_model(with_batch(build(core, args.model, variant, embed_scaling=False), 1), "CPU", config)
            raw = cm.create_infer_request().infer({0: images[:1]})["saliency_map"]
            np.save(args.maps_out / f"{variant}_b1_raw.npy", raw)
            saved[f"{variant}_b1_raw.npy"] = list(raw.shape)
        meta = {"image": manifest.get("files", [None])[0], "torch_top1": top1, "saved": saved,
                "note": "reciprocam: (1, 1000, 7, 7), per class, u8 min-max per class; activationmap: (1, 7, 7), "
                        "mean over channels, u8 min-max per batch; *_raw.npy: embed_scaling=False (float32). "
                        "Target node: " + str(result["checks"].get("reciprocam_target_node")
                                              or result["checks"].get("activationmap_target_node"))}
        (args.maps_out / "maps.json").write_text(json.dumps(meta, indent=2) + "\n")
        result["maps_out"] = str(args.maps_out)

    # ---- timing: interleaved rounds, order rotated each round
    keys = list(runners)
    times = {k: [] for k in keys}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            run = runners[key][0]
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[key].append(dt * 1000.0 / n)
    wall = time.perf_counter() - t_start
    for key in keys:
        ts = times[key]
        result["variants"][key] = {"ms_per_image": round(statistics.median(ts), 3),
                                   "min": round(min(ts), 3), "max": round(max(ts), 3),
                                   "how": runners[key][1], "rounds_ms": [round(t, 3) for t in ts]}
    for batch in args.batch:
        plain = result["variants"].get(f"plain_b{batch}", {}).get("ms_per_image")
        for variant in args.variants:
            v = result["variants"].get(f"{variant}_b{batch}")
            if plain and v and variant != "plain":
                v["ratio_to_plain_same_batch"] = round(v["ms_per_image"] / plain, 3)
    result["timing_wall_s"] = round(wall, 1)
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
