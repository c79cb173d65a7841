"""The batch report renders in headless Chromium: every image loads, the filters work, the overlay
colours are on the screenshot. Chromium comes from Debian (``scripts/install_chromium.sh``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.cli.main import main

from conftest import SAMPLES

PHOTOS = 6
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium not found: run scripts/install_chromium.sh (Debian package 'chromium')")
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("report")
    folder = root / "in"
    folder.mkdir()
    for row in samples[:PHOTOS]:
        shutil.copy(SAMPLES / row["file"], folder / row["file"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = root / "out"
    assert main(["batch", str(folder), "--out", str(out), "--model", "effnet_lite0", "--method", "gradcam",
                 "--layer", "_conv_head", "--batch-size", "3", "--quiet"]) == 0
    return out


def run_chromium(out: Path, tmp_path: Path, *mode: str, fragment: str = "") -> subprocess.CompletedProcess:
    url = (out / "report.html").resolve().as_uri() + fragment
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def body_attributes(dom: str) -> dict:
    start = dom.index("<body")
    tag = dom[start:dom.index(">", start)]
    attrs = {}
    for part in tag.split()[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            attrs[key] = value.strip('"')
    return attrs


def test_report_loads_every_image(report_dir, tmp_path):
    done = [json.loads(line) for line in (report_dir / "records.jsonl").read_text().splitlines()]
    done = [r for r in done if r["status"] == "done"]
    assert len(done) == PHOTOS
    result = run_chromium(report_dir, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    attrs = body_attributes(result.stdout)
    assert attrs["data-images"] == str(2 * PHOTOS)       # thumbnail + overlay per photo
    assert attrs["data-loaded"] == attrs["data-images"]  # each one decoded (naturalWidth > 0)
    assert attrs["data-broken"] == "0"
    assert attrs["data-shown"] == str(PHOTOS)
    assert "broken.jpg" in result.stdout                 # the failed input is listed


def test_report_filters(report_dir, tmp_path):
    done = [json.loads(line) for line in (report_dir / "records.jsonl").read_text().splitlines()]
    done = [r for r in done if r["status"] == "done"]
    confident = sum(r["topk"][0]["score"] >= 0.5 for r in done)
    result = run_chromium(report_dir, tmp_path, "--dump-dom", fragment="#minconf=50")
    assert body_attributes(result.stdout)["data-shown"] == str(confident)
    top1 = done[0]["topk"][0]["label"]
    same_class = sum(r["topk"][0]["label"] == top1 for r in done)
    result = run_chromium(report_dir, tmp_path, "--dump-dom", fragment=f"#cls={top1}")
    assert body_attributes(result.stdout)["data-shown"] == str(same_class)


def test_report_screenshot_shows_the_overlays(report_dir, tmp_path):
    shot = tmp_path / "report.png"
    result = run_chromium(report_dir, tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape == (900, 1280, 3)
    assert pixels.std() > 30  # not a blank page
    r, b = pixels[..., 0], pixels[..., 2]
    # jet's cold end blended at α = 0.5 over photographs: strongly blue pixels; the page's own blue
    # (the probability bars) covers well under 0.5 % of this window
    bluish = ((b - r > 60) & (b > 120)).mean()
    assert bluish > 0.015, f"only {bluish:.2%} overlay-blue pixels"
    warm = ((r > 180) & (b < 90)).mean()  # jet's hot end (the attended region)
    assert warm > 0.001, f"only {warm:.2%} overlay-warm pixels"
