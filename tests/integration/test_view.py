"""``camserve view``, for real: the in-process view of the bundled classifier (a subprocess on a free
loopback port) driven in headless Chromium over the Chrome DevTools Protocol — a photograph set on
the file input, two methods × two layers ticked, the page's four maps loaded, the top-k shown, and a
screenshot of the grid that holds heatmap colours; a non-image upload answered 4xx with the message,
the view still answering after; target ``top2`` (a map per class, and a note instead of ρ); and the
remote view of the session TorchServe (the classifier's stages read from the server, a comparison;
the embedding model's FAM pair and gallery matches).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import requests
from PIL import Image
from websockets.sync.client import connect

from conftest import SAMPLES
from serverkit import REPO, VENV_BIN, free_port, stop_process

pytestmark = pytest.mark.server
PHOTO = "n01833805_hummingbird.JPEG"
REFERENCE = "n01560419_bulbul.JPEG"
METHODS = ["gradcam", "shallowcam"]
LAYERS = ["_blocks.4", "_conv_head"]
READY_S = 300
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: where a run may leave its screenshot (the docs' picture is made from one)
SCREENSHOT_COPY = os.environ.get("CAMSERVE_VIEW_SCREENSHOT")


class View:
    """``camserve view …`` in a subprocess on a free loopback port; always stopped."""

    def __init__(self, args: List[str], log: Path):
        self.port = free_port()
        self.log = log
        self.out = open(log, "wb")
        cmd = [str(VENV_BIN / "camserve"), "view", *args, "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"camserve view exited with {self.process.returncode}\n{self.log.read_text()}")
            try:
                if requests.get(f"{self.url}/api/model", timeout=60).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"camserve view not ready after {timeout:.0f} s\n{self.log.read_text()}")

    def stop(self) -> None:
        stop_process(self.process)
        self.out.close()

    def explain(self, files: Dict[str, bytes], **fields: Any) -> requests.Response:
        form = [(k, (None, str(v))) for k, values in fields.items()
                for v in (values if isinstance(values, list) else [values])]
        form += [(k, (f"{k}.jpg", data)) for k, data in files.items()]
        return requests.post(f"{self.url}/api/explain", files=form, timeout=300)


@contextlib.contextmanager
def running(args: List[str], log: Path) -> Iterator[View]:
    """``camserve view`` with ``args``, ready; stopped at the end (also when it never became ready)."""
    view = View(args, log)
    try:
        view.wait_ready()
        yield view
    finally:
        view.stop()
    assert view.process.poll() is not None, "camserve view outlived its tests"


@pytest.fixture(scope="module")
def local_view(tmp_path_factory) -> Iterator[View]:
    """The bundled classifier, in the view's process."""
    log = tmp_path_factory.mktemp("view") / "view.log"
    with running(["--model-config", "configs/effnet_lite0.yaml", "--device", "cpu"], log) as view:
        yield view


class DevTools:
    """One page target of a headless Chromium, over the Chrome DevTools Protocol (a WebSocket)."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.last_id = 0

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        self.last_id += 1
        self.websocket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.websocket.recv(timeout=60))
            if message.get("id") == self.last_id:  # events and other replies are skipped
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"{expression} still false after {timeout:.0f} s")


@pytest.fixture
def chromium(tmp_path) -> Iterator[DevTools]:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium not found: run scripts/install_chromium.sh (Debian package 'chromium')")
    port = free_port()
    process = subprocess.Popen([path, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, target = time.monotonic() + 60, None
        while target is None and time.monotonic() < deadline:
            try:
                pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                target = next((p for p in pages if p.get("type") == "page"), None)
            except (requests.RequestException, ValueError):
                time.sleep(0.25)
        assert target is not None, "headless Chromium offered no page over the DevTools protocol"
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as websocket:
            yield DevTools(websocket)
    finally:
        stop_process(process)


def heatmap_colours(png: bytes) -> Dict[str, float]:
    """Shares of a screenshot's pixels in jet's hot and cold ends, and the saturated hue bins used."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = np.asarray(image).astype(np.int32)
    r, b = pixels[..., 0], pixels[..., 2]
    hsv = np.asarray(image.convert("HSV")).astype(np.int32)
    saturated = (hsv[..., 1] > 100) & (hsv[..., 2] > 80)
    hues = np.unique(hsv[..., 0][saturated] // 22) if saturated.any() else np.array([])
    return {"warm": float(((r > 180) & (b < 90)).mean()), "cold": float(((b - r > 60) & (b > 120)).mean()),
            "hue_bins": float(len(hues)), "std": float(pixels.std())}


def test_page_in_chromium_shows_two_methods_by_two_layers(local_view, chromium, tmp_path):
    html = requests.get(local_view.url, timeout=30).text
    assert "http://" not in html and "https://" not in html  # no external asset: works offline
    page = chromium
    page.call("Page.enable")
    page.call("Page.navigate", url=local_view.url + "/")
    page.wait_for("document.body && document.body.dataset.ready === '1'", 60)
    offered = page.evaluate("[...document.querySelectorAll('input[name=layer]')].map(c => c.value)")
    assert set(LAYERS) <= set(offered)

    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    page.call("DOM.setFileInputFiles", files=[str(SAMPLES / PHOTO)], nodeId=node)
    page.evaluate(f"""(() => {{
        for (const box of document.querySelectorAll('input[name=method]')) box.checked = {json.dumps(METHODS)}.includes(box.value);
        for (const box of document.querySelectorAll('input[name=layer]')) box.checked = {json.dumps(LAYERS)}.includes(box.value);
        document.querySelector('#run').click();
    }})()""")
    state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", 180)
    assert state == "done", page.evaluate("document.querySelector('#error').textContent")

    maps = page.evaluate("[...document.querySelectorAll('img.map')].map(i => [i.complete, i.naturalWidth])")
    assert len(maps) == 4 and all(done and width > 0 for done, width in maps), maps
    assert page.evaluate("document.body.dataset.maps") == "4"
    top = page.evaluate("[...document.querySelectorAll('#topk li .label')].map(e => e.textContent)")
    assert len(top) == 5 and top[0].startswith("hummingbird"), top
    assert page.evaluate("document.querySelectorAll('table.rho').length") == 2  # ρ per shared layer
    links = page.evaluate("[...document.querySelectorAll('a[download]')].map(a => a.href.slice(0, 22))")
    assert links == ["data:image/png;base64,"] * 8, links  # the map and its colouring, per map
    page.evaluate("(() => { const s = document.querySelector('#opacity'); s.value = 80;"
                  " s.dispatchEvent(new Event('input')); })()")
    assert page.evaluate("getComputedStyle(document.querySelector('img.map')).opacity") == "0.8"

    box = page.evaluate("(() => { const r = document.querySelector('table.grid').getBoundingClientRect();"
                        " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()")
    shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                     clip={**box, "scale": 1})
    png = base64.b64decode(shot["data"])
    (tmp_path / "grid.png").write_bytes(png)
    if SCREENSHOT_COPY:
        full = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(SCREENSHOT_COPY).write_bytes(base64.b64decode(full["data"]))
    colours = heatmap_colours(png)
    assert colours["std"] > 30, colours  # not a blank grid
    assert colours["warm"] > 0.005 and colours["cold"] > 0.005, colours  # both ends of jet, over the photo
    assert colours["hue_bins"] >= 4, colours


def test_bad_upload_is_a_4xx_with_its_message_and_the_view_answers_after(local_view):
    bad = local_view.explain({"image": b"this is not an image"}, method="gradcam", layer="_conv_head")
    assert bad.status_code == 400, bad.text
    assert "not a decodable image" in bad.json()["error"]["message"]
    empty = local_view.explain({"image": b""}, method="gradcam")
    assert empty.status_code == 400 and "no image" in empty.json()["error"]["message"]
    unknown = local_view.explain({"image": (SAMPLES / PHOTO).read_bytes()}, method="nosuchcam")
    assert unknown.status_code == 400 and "nosuchcam" in unknown.json()["error"]["message"]
    assert requests.post(f"{local_view.url}/api/explain", data={"x": "1"}, timeout=30).status_code == 415
    good = local_view.explain({"image": (SAMPLES / PHOTO).read_bytes()}, method="gradcam", layer="_conv_head",
                              target="94", topk=3)
    assert good.status_code == 200, good.text
    page = good.json()
    assert [p["label"] for p in page["predictions"]][0] == "hummingbird" and len(page["predictions"]) == 3
    (cell,) = page["cells"]
    assert cell["maps"][0]["target"] == 94 and cell["resolved_layer"] == "_conv_head"


def test_two_targets_get_a_map_each_and_the_page_says_why_there_is_no_rho(local_view):
    answer = local_view.explain({"image": (SAMPLES / PHOTO).read_bytes()}, method=METHODS, layers="stage8",
                                target="top2")
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["comparisons"] == [] and "one class" in page["notes"][0]
    for cell in page["cells"]:
        assert cell["resolved_layer"] == "_conv_head"
        assert [m["label"] for m in cell["maps"]] == [p["label"] for p in page["predictions"][:2]]


def test_remote_view_of_torchserve(torchserve_server, tmp_path):
    key_file = str(torchserve_server.workdir / "key_file.json")
    common = ["--server", torchserve_server.url, "--key-file", key_file]
    with running([*common, "--model", "effnet_lite0"], tmp_path / "remote.log") as view:
        info = requests.get(f"{view.url}/api/model", timeout=60).json()
        assert info["task"] == "classify" and "gradcam" in info["methods"]
        stages = {layer["alias"]: layer["name"] for layer in info["layers"]}  # read from the server's message
        assert stages["stage3"] == "_blocks.4" and stages["stage8"] == "_conv_head"
        answer = view.explain({"image": (SAMPLES / PHOTO).read_bytes()}, method=METHODS, layer="stage3")
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert page["predictions"][0]["label"] == "hummingbird"
        assert {(c["method"], c["resolved_layer"]) for c in page["cells"]} == {(m, "_blocks.4") for m in METHODS}
        (comparison,) = page["comparisons"]
        assert comparison["methods"] == METHODS and comparison["spearman"][0][0] == pytest.approx(1.0)
        bad = view.explain({"image": b"GIF89a nonsense"}, method="gradcam")
        assert bad.status_code == 400 and bad.json()["error"]["message"]
    with running([*common, "--model", "effnet_lite0_embed"], tmp_path / "remote-embed.log") as view:
        assert requests.get(f"{view.url}/api/model", timeout=60).json()["task"] == "embed"
        answer = view.explain({"image": (SAMPLES / PHOTO).read_bytes(), "reference": (SAMPLES / REFERENCE).read_bytes()},
                              method="fam", gallery=2)
        assert answer.status_code == 200, answer.text
        pairs = {p["kind"]: p for p in answer.json()["pairs"]}
        assert pairs["pair"]["query_map"] and pairs["pair"]["reference_map"] and pairs["pair"]["reference_crop_box"]
        assert -1.0 <= pairs["pair"]["similarity"] <= 1.0
        assert len(pairs["gallery"]["matches"]) == 2
