"""Export the bundled EfficientNet-Lite0 and the benchmark photographs for the OpenVINO XAI peer.

Runs in the MAIN environment (torch 2.14, openvino 2026.4):

    PYTHONPATH=src .venv/bin/python benchmarks/peer/export_model.py --out /tmp/ovxai

Writes to ``--out``:

- ``effnet_lite0.xml`` / ``.bin``: OpenVINO IR (f32 weights: ``compress_to_fp16=False``), input
  ``input`` ``[?, 3, 224, 224]`` (dynamic batch, NCHW), output ``logits`` ``[?, 1000]``. IR, not ONNX:
  both of torch 2.14's ONNX exporters need packages the main env does not have (the dynamo exporter
  ``onnxscript``, the legacy TorchScript one ``onnx``). openvino 2024.4 (the peer env) reads this IR;
  ``openvino_xai_worker.py`` checks its logits against ``inputs/torch_logits.npy``.
- ``inputs/batch8_0.npy``, ``inputs/batch8_1.npy``: the first 16 photographs (sorted names) of
  ``../shared/data/imagenet-samples/`` as float32 ``(8, 3, 224, 224)`` batches, preprocessed by
  camserve itself (``camserve.serving.images.decode_image`` then ``EFFNET_LITE0.model_input``:
  resize 256 antialiased bilinear, centre crop 224, mean = std = 0.5), so both sides see the same pixels.
- ``inputs/torch_logits.npy``: the PyTorch model's f32 logits of the 16 images (1 thread).
- ``inputs/manifest.json``: files, labels, shapes, versions and the IR-vs-torch check in openvino 2026.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from camserve.engine.models import EFFNET_LITE0
from camserve.engine.models.bundled import load_effnet_lite0
from camserve.serving.images import decode_image

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "imagenet-samples"


def photographs(folder: Path, count: int):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:count]
    if len(files) < count:
        raise SystemExit(f"{folder}: only {len(files)} photographs, {count} wanted")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--count", type=int, default=16, help="photographs (a multiple of 8)")
    args = parser.parse_args(argv)
    if args.count % 8:
        parser.error("--count must be a multiple of 8")

    import openvino as ov

    torch.set_num_threads(1)
    out, inputs = args.out, args.out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)

    # the photographs, through camserve's own decoding and preprocessing
    files = photographs(args.photos, args.count)
    images = [decode_image(f.read_bytes()) for f in files]
    batch, _ = EFFNET_LITE0.model_input(images, torch.device("cpu"))
    batch = batch.float().contiguous()

    model = load_effnet_lite0().float().eval()
    with torch.inference_mode():
        logits = model(batch).numpy()

    # OpenVINO IR with a dynamic batch dimension (ReciproCAM needs the batch of the logits dynamic)
    # ov.convert_model (OpenVINO XAI cannot insert its branch into the graph of the bare PyTorch frontend
    # that camserve's fast path uses: "Model references undeclared parameters"); it sends usage telemetry
    # unless CI=true, which benchmarks/openvino_peer.py sets for this process
    ov_model = ov.convert_model(model, example_input=batch[:1], input=[ov.PartialShape([-1, 3, 224, 224])])
    ov_model.inputs[0].get_tensor().set_names({"input"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    xml = out / "effnet_lite0.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)

    # sanity check in this env's openvino (the peer env's 2024.4 is checked by the worker)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    ov_logits = np.concatenate([compiled(batch[i:i + 8].numpy())[0] for i in range(0, len(batch), 8)])
    diff = float(np.abs(ov_logits - logits).max())

    names = []
    for i in range(0, len(batch), 8):
        name = f"batch8_{i // 8}.npy"
        np.save(inputs / name, batch[i:i + 8].numpy())
        names.append(name)
    np.save(inputs / "torch_logits.npy", logits)
    manifest = {
        "model": xml.name,
        "input_name": "input", "output_name": "logits", "input_shape": [-1, 3, 224, 224], "layout": "NCHW",
        "batches": names,
        "files": [f.name for f in files],
        "photos": str(args.photos),
        "torch_top1": [int(k) for k in logits.argmax(1)],
        "preprocessing": EFFNET_LITE0.preprocessing(),
        "export": {"torch": torch.__version__, "openvino": ov.__version__, "python": sys.version.split()[0],
                   "compress_to_fp16": False,
                   "max_abs_logit_diff_openvino_export_env_vs_torch": diff},
    }
    (inputs / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"model": str(xml), "inputs": str(inputs), "images": len(files),
                      "max_abs_logit_diff_vs_torch": diff, "openvino": ov.__version__}))
    if diff > 1e-4:
        print(f"WARNING: IR logits differ from torch by {diff:.2e} (> 1e-4)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
