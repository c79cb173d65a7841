"""Renders the documentation's picture, docs/images/heatmaps.png: real heatmaps of the bundled
pretrained EfficientNet-Lite0 on three photographs of ../shared/data/imagenet-samples/.

Rows: the photographs. Columns: the model's 224×224 crop with its top-1 label, then Grad-CAM at the
last feature map (``_conv_head``), LayerCAM and Shallow-CAM at a shallow stage (``_blocks.4``), all
for the top-1 class and all from ONE batched ``Explainer.explain`` call per method set.

Uses only the engine's public names (``camserve.engine``, ``camserve.engine.models``); the
preprocessing (resize the shorter side, centre crop, normalise with the model profile's mean/std)
is redone here with PIL so that this script does not depend on internal module paths.

    .venv/bin/python scripts/render_docs_pictures.py [--photos DIR] [--out docs/images/heatmaps.png]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared")) / "data" / "imagenet-samples"
PHOTOS = ("n01833805_hummingbird.JPEG", "n02510455_giant_panda.JPEG", "n02088364_beagle.JPEG")
SHALLOW = "_blocks.4"
COLUMNS = (  # (title, method, layer)
    ("Grad-CAM\n_conv_head (last map)", "gradcam", "_conv_head"),
    (f"LayerCAM\n{SHALLOW}", "layercam", SHALLOW),
    (f"Shallow-CAM\n{SHALLOW}", "shallowcam", SHALLOW),
)
MAX_BYTES = 250_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=SAMPLES, help="folder with the sample photographs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "heatmaps.png")
    args = parser.parse_args()

    missing = [name for name in PHOTOS if not (args.photos / name).is_file()]
    if missing:
        sys.exit(f"render_docs_pictures: photographs not found in {args.photos}: {', '.join(missing)}\n"
                 f"(the shared data set ../shared/data/imagenet-samples/ is needed; set CAMSERVE_SHARED "
                 f"or --photos to its location)")
    truth = {}
    labels_file = args.photos / "LABELS.tsv"
    if labels_file.is_file():
        with open(labels_file) as f:
            truth = {row["file"]: row["name"] for row in csv.DictReader(f, delimiter="\t")}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from PIL import Image

    from camserve.engine import Explainer, ExplainSpec
    from camserve.engine.models import EFFNET_LITE0 as profile, imagenet_class_names, load_effnet_lite0

    torch.manual_seed(0)
    names = imagenet_class_names()

    # the profile's preprocessing: shorter side → resize, centre crop, normalise
    crops = []
    for name in PHOTOS:
        image = Image.open(args.photos / name).convert("RGB")
        w, h = image.size
        scale = profile.resize / min(w, h)
        image = image.resize((max(profile.crop, round(w * scale)), max(profile.crop, round(h * scale))),
                             Image.BILINEAR)
        left, top = (image.width - profile.crop) // 2, (image.height - profile.crop) // 2
        crops.append(np.asarray(image.crop((left, top, left + profile.crop, top + profile.crop)),
                                dtype=np.float32) / 255.0)
    crops_np = np.stack(crops)                                              # (N, 224, 224, 3) in [0, 1]
    mean = np.asarray(profile.mean, dtype=np.float32)
    std = np.asarray(profile.std, dtype=np.float32)
    batch = torch.from_numpy((crops_np - mean) / std).permute(0, 3, 1, 2).contiguous()

    explainer = Explainer(load_effnet_lite0(), default_layer="_conv_head")
    maps, logits = [], None
    for _title, method, layer in COLUMNS:
        result = explainer.explain(batch, [ExplainSpec(method, layer=layer)] * len(PHOTOS))
        logits = result.logits if logits is None else logits
        maps.append([e.maps[0].float().cpu().numpy() for e in result.explanations])
    probs = torch.softmax(logits.float(), dim=1)
    top = probs.argmax(dim=1).tolist()

    rows, cols = len(PHOTOS), 1 + len(COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(9.0, 2.35 * rows + 0.45), dpi=100, squeeze=False)
    for r, name in enumerate(PHOTOS):
        predicted = names[top[r]].replace("_", " ")
        axes[r][0].imshow(crops_np[r])
        axes[r][0].set_ylabel(f"{predicted}\np = {probs[r, top[r]]:.2f}", fontsize=10)
        for c in range(1, cols):
            axes[r][c].imshow(crops_np[r])
            axes[r][c].imshow(maps[c - 1][r], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        for c in range(cols):
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        if truth.get(name) and truth[name] != names[top[r]]:
            print(f"note: {name} predicted {names[top[r]]!r}, labelled {truth[name]!r}")
    for c, title in enumerate(["photo (model crop)\ntop-1 prediction"] + [t for t, _m, _l in COLUMNS]):
        axes[0][c].set_title(title, fontsize=10)
    fig.suptitle("camserve · EfficientNet-Lite0 (pretrained) · maps for the top-1 class", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    rgb = Image.open(buffer).convert("RGB")
    # a 256-colour palette (median cut, no dithering: dithered, the PNG grows past the size budget)
    picture = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, format="PNG", optimize=True)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({picture.width}×{picture.height}, {size:,} bytes)")
    if size > MAX_BYTES:
        print(f"warning: over {MAX_BYTES:,} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
