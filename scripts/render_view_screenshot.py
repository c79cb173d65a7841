"""Renders docs/images/view.png: a full-page screenshot of ``camserve view`` — the in-process view of the
bundled EfficientNet-Lite0 (``camserve view --model-config configs/effnet_lite0.yaml`` on a free loopback
port) in headless Chromium, driven over the Chrome DevTools Protocol exactly as
tests/integration/test_view.py drives it (its ``View``, ``DevTools`` and Chromium flags are reused): the
committed CC0 photograph docs/photos/chelsea.jpg (a cat; docs/photos/SOURCES.md) set on the file input,
Grad-CAM and Shallow-CAM ticked at ``_blocks.4`` and ``_conv_head``, the four maps loaded, the overlay
opacity at 80 %. The screenshot is committed, so it is never made from the ImageNet samples in
../shared/data/ (research and testing only, not redistributed). Saved as a 256-colour PNG.

    .venv/bin/python scripts/render_view_screenshot.py [--photo docs/photos/chelsea.jpg]
                                                       [--out docs/images/view.png] [--width 1000]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))
import requests  # noqa: E402
from PIL import Image  # noqa: E402
from serverkit import free_port, stop_process  # noqa: E402
from test_view import CHROMIUM_FLAGS, LAYERS, METHODS, DevTools, heatmap_colours, running  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

PHOTO = REPO / "docs" / "photos" / "chelsea.jpg"
MAX_BYTES = 200_000


def start_chromium(profile: Path, width: int):
    """Headless Chromium with a DevTools port; returns (process, the first page's WebSocket URL)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        sys.exit("render_view_screenshot: chromium not found (scripts/install_chromium.sh)")
    port = free_port()
    process = subprocess.Popen([path, *CHROMIUM_FLAGS, "--hide-scrollbars", f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", f"--window-size={width},1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            target = next((p for p in pages if p.get("type") == "page"), None)
            if target is not None:
                return process, target["webSocketDebuggerUrl"]
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.25)
    stop_process(process)
    raise TimeoutError("headless Chromium offered no page over the DevTools protocol")


def screenshot(view_url: str, websocket_url: str, photo: Path, width: int) -> bytes:
    """The view's page after one explanation of ``photo``: a full-page PNG, ``width`` pixels wide."""
    with connect(websocket_url, max_size=None, open_timeout=30) as websocket:
        page = DevTools(websocket)
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=1000, deviceScaleFactor=1, mobile=False)
        page.call("Page.enable")
        page.call("Page.navigate", url=view_url + "/")
        page.wait_for("document.body && document.body.dataset.ready === '1'", 60)
        root = page.call("DOM.getDocument")["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
        page.call("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
        page.evaluate(f"""(() => {{
            for (const box of document.querySelectorAll('input[name=method]')) box.checked = {json.dumps(METHODS)}.includes(box.value);
            for (const box of document.querySelectorAll('input[name=layer]')) box.checked = {json.dumps(LAYERS)}.includes(box.value);
            document.querySelector('#run').click();
        }})()""")
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                              180)
        if state != "done":
            raise RuntimeError(page.evaluate("document.querySelector('#error').textContent"))
        maps = page.evaluate("[...document.querySelectorAll('img.map')].map(i => [i.complete, i.naturalWidth])")
        if len(maps) != 4 or not all(done and width > 0 for done, width in maps):
            raise RuntimeError(f"maps not loaded: {maps}")
        page.evaluate("(() => { const s = document.querySelector('#opacity'); s.value = 80;"
                      " s.dispatchEvent(new Event('input')); })()")
        top = page.evaluate("[...document.querySelectorAll('#topk li .label')].map(e => e.textContent)")
        print(f"top-{len(top)}: {', '.join(top)}")
        time.sleep(0.5)  # let the opacity repaint
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=PHOTO, help="the photograph (default docs/photos/chelsea.jpg)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "view.png")
    parser.add_argument("--width", type=int, default=1000, help="page width in pixels (default 1000)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="view-screenshot-"))
    with running(["--model-config", "configs/effnet_lite0.yaml", "--device", "cpu"], work / "view.log") as view:
        process, websocket_url = start_chromium(work / "profile", args.width)
        try:
            png = screenshot(view.url, websocket_url, args.photo.resolve(), args.width)
        finally:
            stop_process(process)
    colours = heatmap_colours(png)
    picture = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, format="PNG", optimize=True)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({picture.width}×{picture.height}, {size:,} bytes); jet warm {colours['warm']:.3f}, "
          f"cold {colours['cold']:.3f}")
    if size > MAX_BYTES:
        print(f"warning: over {MAX_BYTES:,} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
