"""``scripts/render_docs_pictures.py``: the FAM pairs picture rendered from the committed CC0 /
public-domain photographs of docs/photos/ (a non-blank PNG of the expected size, under the size
budget, the mirrored pair the most similar); the committed pictures are small and every one of them
is shown in docs/gallery.md; every committed photograph has its source and licence in
docs/photos/SOURCES.md (the ImageNet samples of ../shared are never used for committed pictures)."""

from __future__ import annotations

import importlib.util

import numpy as np
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "scripts" / "render_docs_pictures.py"
PHOTOS = REPO / "docs" / "photos"


def load_script():
    spec = importlib.util.spec_from_file_location("render_docs_pictures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fam_pairs_picture_renders(tmp_path, capsys):
    script = load_script()
    assert script.PHOTO_DIR == PHOTOS  # the default: the committed photographs
    assert script.main(["--photos", str(PHOTOS), "--out-dir", str(tmp_path), "--only", "fam"]) == 0
    out = tmp_path / script.FILES["fam"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # only the picture asked for
    assert 10_000 < out.stat().st_size <= script.MAX_BYTES
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1080, 285)  # 10.8 × 2.85 inches at 100 dpi
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 30  # not blank: photographs under jet overlays
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    printed = capsys.readouterr().out
    cosines = [float(line.split("cosine ")[1].split()[0]) for line in printed.splitlines()
               if line.startswith("FAM pair")]
    assert len(cosines) == 3
    # the cat and its mirror image (measured 0.985) ≫ the cat and a coffee cup (0.084) or a rocket (0.115)
    assert cosines[0] > 0.9 and cosines[0] > max(cosines[1:])
    assert max(cosines[1:]) < 0.5


def test_committed_pictures_are_small_and_in_the_gallery():
    script = load_script()
    gallery = (REPO / "docs" / "gallery.md").read_text()
    for name in script.FILES.values():
        path = REPO / "docs" / "images" / name
        assert path.is_file(), name
        assert path.stat().st_size <= script.MAX_BYTES, name
        assert f"images/{name}" in gallery, name


def test_committed_photographs_have_their_sources():
    script = load_script()
    sources = (PHOTOS / "SOURCES.md").read_text()
    committed = sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert set(script.needed_photos(script.PICTURES)) <= set(committed)
    for name in committed:
        assert f"`{name}`" in sources, name
        assert (PHOTOS / name).stat().st_size <= 100_000, name
