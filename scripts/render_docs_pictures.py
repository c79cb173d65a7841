"""Renders the documentation's pictures into docs/images/: real heatmaps of the bundled pretrained
EfficientNet-Lite0 on the freely licensed photographs of docs/photos/ (CC0 / public-domain sample
images of scikit-image, see docs/photos/SOURCES.md). The pictures are committed, so they must never be
made from the ImageNet samples in ../shared/data/ (research and testing only, not redistributed).

* ``heatmaps.png`` (README front page, docs/index.md): three photographs (rows: the cat ``chelsea``,
  the ``coffee`` cup, the ``rocket`` on its launch pad); the model's 224×224 crop with its top-1 label, then
  Grad-CAM at the last feature map (``_conv_head``), LayerCAM and Shallow-CAM at a shallow stage
  (``_blocks.4``), all for the top-1 class.
* ``methods-by-layer.jpg`` (docs/gallery.md): one photograph (``chelsea``); rows the methods (CAM,
  Grad-CAM, Grad-CAM++, LayerCAM, Shallow-CAM, Relevance-CAM and Captum's Guided Grad-CAM), columns the stages
  ``_blocks.2`` (56×56), ``_blocks.4`` (28×28), ``_blocks.10`` (14×14), ``_conv_head`` (7×7), all for
  the top-1 class; a cell a method cannot do at that layer (the engine's own validation refuses it)
  is an empty, labelled cell.
* ``fam-pairs.png`` (docs/gallery.md): FAM of the bundled embedding model (``effnet_lite0_embed``:
  the pooled 1280-channel features, L2-normalised) for three (query, reference) pairs — the same
  photograph and its horizontal mirror, then two photographs of other subjects — query and reference
  map side by side, the cosine similarity in the title. The query is ``chelsea``; the references are
  its mirror image, ``coffee`` and ``rocket``.

Every map of one picture's method set comes from one batched engine call (``Explainer.explain`` or
``FamExplainer.explain``). Only the engine's public API is used: ``camserve.engine`` (explainers),
``camserve.engine.models`` (model, profile, labels; the embedding model is built as the embedding
handler builds it: ``load_spec`` + ``embedding_model_for``) and the profile's own preprocessing
(``ModelProfile.model_input``: resize the shorter side, centre crop, normalise, on the device).

    .venv/bin/python scripts/render_docs_pictures.py [--photos DIR] [--out-dir docs/images]
                                                      [--only heatmaps|methods|fam ...]

``--photos`` (default docs/photos) is any folder holding photographs of the names below.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO_DIR = REPO / "docs" / "photos"  # committed, CC0 / public domain (docs/photos/SOURCES.md)
MAX_BYTES = 250_000
JPEG_QUALITY = 85

# -- heatmaps.png -------------------------------------------------------------------------------------
PHOTOS = ("chelsea.jpg", "coffee.jpg", "rocket.jpg")
SHALLOW = "_blocks.4"
COLUMNS = (  # (title, method, layer)
    ("Grad-CAM\n_conv_head (last map)", "gradcam", "_conv_head"),
    (f"LayerCAM\n{SHALLOW}", "layercam", SHALLOW),
    (f"Shallow-CAM\n{SHALLOW}", "shallowcam", SHALLOW),
)

# -- methods-by-layer.jpg -----------------------------------------------------------------------------
GRID_PHOTO = "chelsea.jpg"
GRID_LAYERS = ("_blocks.2", "_blocks.4", "_blocks.10", "_conv_head")  # stages 2, 3, 5, 8 of the profile
GRID_METHODS = (  # (row title, method)
    ("CAM", "cam"),
    ("Grad-CAM", "gradcam"),
    ("Grad-CAM++", "gradcampp"),
    ("LayerCAM", "layercam"),
    ("Shallow-CAM", "shallowcam"),
    ("Relevance-CAM", "relevancecam"),
    ("Captum Guided Grad-CAM", "captum.guided_gradcam"),
)

# -- fam-pairs.png ------------------------------------------------------------------------------------
FAM_QUERY = "chelsea.jpg"
FAM_PAIRS = (  # (pair title, reference photograph, mirrored?)
    ("same photograph, mirrored", FAM_QUERY, True),
    ("another photograph: a coffee cup", "coffee.jpg", False),
    ("another photograph: a rocket on its pad", "rocket.jpg", False),
)

#: what the docs/photos photographs show (titles); a folder's LABELS.tsv (file, name) takes precedence
DESCRIPTIONS = {"chelsea.jpg": "cat", "coffee.jpg": "coffee cup", "rocket.jpg": "rocket on its pad"}

PICTURES = ("heatmaps", "methods", "fam")
FILES = {"heatmaps": "heatmaps.png", "methods": "methods-by-layer.jpg", "fam": "fam-pairs.png"}


def needed_photos(which) -> list:
    names = []
    if "heatmaps" in which:
        names += PHOTOS
    if "methods" in which:
        names.append(GRID_PHOTO)
    if "fam" in which:
        names += [FAM_QUERY] + [ref for _t, ref, _m in FAM_PAIRS]
    return sorted(set(names))


def read_labels(folder: Path) -> dict:
    labels_file = folder / "LABELS.tsv"
    if not labels_file.is_file():
        return {}
    with open(labels_file) as f:
        return {row["file"]: row["name"] for row in csv.DictReader(f, delimiter="\t")}


def load_photo(folder: Path, name: str):
    """A photograph as the RGB ``uint8 (3, H, W)`` tensor the engine's preprocessing takes."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(folder / name) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def model_input(profile, images):
    """The profile's preprocessing (``ModelProfile.model_input``): the normalised batch and the [0, 1]
    crops as ``(N, 224, 224, 3)`` numpy for the overlays."""
    import torch

    batch, crops = profile.model_input(images, torch.device("cpu"))
    return batch, crops.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()  # antialiasing overshoots by ~1e-7


def pretty(name: str) -> str:
    return name.replace("_", " ")


def describe(ctx, name: str) -> str:
    """What photograph ``name`` shows: its LABELS.tsv name if the folder has one, else DESCRIPTIONS, else
    the file name without its suffix."""
    return pretty(ctx["truth"].get(name) or DESCRIPTIONS.get(name) or name.rsplit(".", 1)[0])


def overlay(ax, crop, heat=None) -> None:
    ax.imshow(crop)
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def save_picture(fig, out: Path) -> int:
    """Save ``fig`` by ``out``'s suffix: ``.png`` as a 256-colour PNG (median cut, no dithering:
    dithered, the PNG grows past the size budget), ``.jpg`` as a progressive JPEG of quality 85 (for
    the many-photograph grid, where a palette posterises the photograph and a full-colour PNG is
    over budget); returns the file's size in bytes."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    picture = Image.open(buffer).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    else:
        picture = picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        picture.save(out, format="PNG", optimize=True)
    size = out.stat().st_size
    print(f"wrote {out} ({picture.width}×{picture.height}, {size:,} bytes)")
    return size


# -- the pictures ---------------------------------------------------------------------------------------
def render_heatmaps(ctx, out: Path) -> int:
    """3 photographs × (crop, Grad-CAM at _conv_head, LayerCAM and Shallow-CAM at _blocks.4)."""
    import matplotlib.pyplot as plt
    import torch

    from camserve.engine import ExplainSpec

    explainer, profile, names = ctx["explainer"], ctx["profile"], ctx["names"]
    batch, crops = model_input(profile, [ctx["photos"][name] for name in PHOTOS])
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
        overlay(axes[r][0], crops[r])
        axes[r][0].set_ylabel(f"{pretty(names[top[r]])}\np = {probs[r, top[r]]:.2f}", fontsize=10)
        for c in range(1, cols):
            overlay(axes[r][c], crops[r], maps[c - 1][r])
        truth = ctx["truth"].get(name)
        if truth and truth != names[top[r]]:
            print(f"note: {name} predicted {names[top[r]]!r}, labelled {truth!r}")
    for c, title in enumerate(["photo (model crop)\ntop-1 prediction"] + [t for t, _m, _l in COLUMNS]):
        axes[0][c].set_title(title, fontsize=10)
    fig.suptitle("camserve · EfficientNet-Lite0 (pretrained) · maps for the top-1 class", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_picture(fig, out)


def render_methods_by_layer(ctx, out: Path) -> int:
    """One photograph: methods (rows) × stages (columns); what the engine refuses is an empty cell.
    Every possible cell is one row of ONE batched ``Explainer.explain`` call (the photograph repeated)."""
    import warnings

    import matplotlib.pyplot as plt
    import torch

    from camserve.engine import ExplainSpec, ExplanationInputError

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # Captum's guided backprop

    explainer, profile, names = ctx["explainer"], ctx["profile"], ctx["names"]
    batch, crops = model_input(profile, [ctx["photos"][GRID_PHOTO]])
    cells, refused = [], {}
    for r, (_title, method) in enumerate(GRID_METHODS):
        for c, layer in enumerate(GRID_LAYERS):
            spec = ExplainSpec(method, layer=layer)
            try:
                explainer.validate(spec)
            except ExplanationInputError as error:
                refused[(r, c)] = error
                continue
            cells.append(((r, c), spec))
    result = explainer.explain(batch.expand(len(cells), -1, -1, -1).contiguous(), [s for _rc, s in cells])
    maps = {rc: e for (rc, _s), e in zip(cells, result.explanations)}
    probs = torch.softmax(result.logits[0].float(), dim=0)
    top = int(probs.argmax())
    shapes = {layer: explainer.catalog.feature_map(layer).map_shape[-2:] for layer in GRID_LAYERS}

    rows, cols = len(GRID_METHODS), len(GRID_LAYERS)
    fig, axes = plt.subplots(rows, cols, figsize=(1.95 * cols, 2.15 * rows + 0.5), dpi=90, squeeze=False)
    for r, (title, method) in enumerate(GRID_METHODS):
        for c, layer in enumerate(GRID_LAYERS):
            ax = axes[r][c]
            h, w = shapes[layer]
            if (r, c) in maps:
                overlay(ax, crops[0], maps[(r, c)].maps[0].float().cpu().numpy())
                ax.set_title(f"{title}\n{layer} ({h}×{w})", fontsize=8.5)
            else:
                ax.set(xticks=[], yticks=[], xlim=(0, crops.shape[2]), ylim=(crops.shape[1], 0), aspect="equal")
                ax.set_facecolor("#eeeeee")
                ax.set_title(f"{title}\n{layer} ({h}×{w})", fontsize=8.5, color="#777777")
                reason = "refused by the engine:\nCAM needs the map that\nfeeds pooling + classifier" \
                    if method == "cam" else "refused by the engine:\n" + str(refused[(r, c)])[:60]
                ax.text(0.5, 0.5, reason, ha="center", va="center", fontsize=7.5, color="#555555",
                        transform=ax.transAxes)
                for spine in ax.spines.values():
                    spine.set_color("#bbbbbb")
    fig.suptitle(f"EfficientNet-Lite0 · {describe(ctx, GRID_PHOTO)} photograph · "
                 f"maps for the top-1 class ({pretty(names[top])}, p = {float(probs[top]):.2f})\n"
                 f"rows: methods · columns: layers (feature-map size) · overlay at 224×224", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.975), h_pad=1.1, w_pad=0.4)
    print(f"methods × layers: {len(cells)} maps from one batched call ({len(refused)} cells refused), "
          f"{result.explanations[0].batch_seconds:.1f} s")
    return save_picture(fig, out)


def render_fam_pairs(ctx, out: Path) -> int:
    """FAM (pooled route, cosine) for 3 (query, reference) pairs, all from ONE ``FamExplainer.explain``."""
    import matplotlib.pyplot as plt
    import torch

    from camserve.engine import FamExplainer, FamSpec
    from camserve.engine.models import ModelSpec, embedding_model_for, load_spec

    loaded = load_spec(ModelSpec(task="embed"))  # the effnet_lite0_embed archive's default spec
    model, _route = embedding_model_for(loaded)  # "pooled" for the bundled model
    profile = loaded.profile
    fam = FamExplainer(model, input_size=profile.input_size)

    query = ctx["photos"][FAM_QUERY]
    references = [torch.flip(ctx["photos"][ref], dims=[-1]) if mirrored else ctx["photos"][ref]
                  for _t, ref, mirrored in FAM_PAIRS]
    n = len(FAM_PAIRS)
    batch, crops = model_input(profile, [query] * n + references)
    specs = [FamSpec(reference_image=batch[n + i], similarity="cosine") for i in range(n)]
    result = fam.explain(batch[:n], specs)
    items = result.items

    fig = plt.figure(figsize=(10.8, 2.85), dpi=100)
    # per pair two image columns, a narrow spacer column between pairs
    ratios = [w for i in range(n) for w in ((1, 1) if i == n - 1 else (1, 1, 0.22))]
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios, left=0.01, right=0.99, top=0.76, bottom=0.08,
                            wspace=0.06)
    query_label = describe(ctx, FAM_QUERY)
    for i, (title, ref, mirrored) in enumerate(FAM_PAIRS):
        item = items[i]
        left, right = fig.add_subplot(grid[0, 3 * i]), fig.add_subplot(grid[0, 3 * i + 1])
        overlay(left, crops[i], item.query_map.float().cpu().numpy())
        overlay(right, crops[n + i], item.reference_map.float().cpu().numpy())
        ref_label = describe(ctx, ref) + (", mirrored" if mirrored else "")
        left.set_title(f"query: {query_label}", fontsize=8.5)
        right.set_title(f"reference: {ref_label}", fontsize=8.5)
        middle = (left.get_position().x0 + right.get_position().x1) / 2
        fig.text(middle, 0.965, f"{title}\ncosine similarity {item.similarity:.3f}", ha="center", va="top",
                 fontsize=10)
        print(f"FAM pair {i}: {FAM_QUERY} vs {ref}{' mirrored' if mirrored else ''}: cosine {item.similarity:.4f} "
              f"(route {item.route})")
    fig.text(0.5, 0.015, "FAM (pooled route) · EfficientNet-Lite0 embedding: the last feature map (1280 × 7×7), pooled "
             "· one set of channel weights per pair, drawn on both photographs", ha="center",
             va="bottom", fontsize=8, color="#444444")
    return save_picture(fig, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTO_DIR,
                        help=f"folder with the photographs {', '.join(needed_photos(PICTURES))} "
                             f"(default docs/photos)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "images",
                        help="where the pictures go (default docs/images)")
    parser.add_argument("--only", choices=PICTURES, action="append",
                        help="render only this picture (repeatable; default: all)")
    args = parser.parse_args(argv)
    which = list(dict.fromkeys(args.only or PICTURES))

    missing = [name for name in needed_photos(which) if not (args.photos / name).is_file()]
    if missing:
        sys.exit(f"render_docs_pictures: photographs not found in {args.photos}: {', '.join(missing)}\n"
                 f"(the committed photographs are in docs/photos/; --photos names another folder)")

    started = time.perf_counter()
    import matplotlib
    matplotlib.use("Agg")
    import torch

    torch.manual_seed(0)
    ctx = {"photos": {name: load_photo(args.photos, name) for name in needed_photos(which)},
           "truth": read_labels(args.photos)}
    if "heatmaps" in which or "methods" in which:
        from camserve.engine import Explainer
        from camserve.engine.models import EFFNET_LITE0, imagenet_class_names, load_effnet_lite0

        ctx.update(profile=EFFNET_LITE0, names=imagenet_class_names(),
                   explainer=Explainer.for_profile(load_effnet_lite0(), EFFNET_LITE0))
    renderers = {"heatmaps": render_heatmaps, "methods": render_methods_by_layer, "fam": render_fam_pairs}
    over = []
    for picture in which:
        start = time.perf_counter()
        out = args.out_dir / FILES[picture]
        size = renderers[picture](ctx, out)
        print(f"  {picture}: {time.perf_counter() - start:.1f} s")
        if size > MAX_BYTES:
            over.append(f"{out} ({size:,} bytes)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    if over:
        print(f"warning: over {MAX_BYTES:,} bytes: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
