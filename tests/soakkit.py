"""Soak benchmark: N mixed requests at concurrency C against a real TorchServe, every answer checked.

Kinds of request (weights in :data:`MIX`, drawn with a seeded RNG, photos from the shared samples):
plain predictions, Grad-CAM, LayerCAM, Shallow-CAM at two layers (``_blocks.4``, ``_blocks.2``),
KServe v1 (``instances``, two photos each) and v2 (``inputs``, named output tensors, two photos
each), FAM pairs (embedding model with a ``reference`` photo), embeddings, gallery matches and
malformed bodies; with ``--byo`` also the bring-your-own archives of ``tests/byo_archives.py``.

Every answer is checked, not only its status:

* the expected status (200, or for the malformed kinds a 4xx with ``{"error": {"message": …}}``);
* a heatmap / FAM map that is present and decodes as a PNG of the expected size;
* **no cross-talk inside batches**: before the soak, each photo's plain answer is fetched once per
  model (top-1 index and score, its embedding, its gallery matches); every soak answer for that
  photo must give the same top-1 index with the same score (±2e-3), the same embedding (cosine
  > 0.999), a FAM similarity equal to the two reference embeddings' cosine, the same gallery
  matches. An answer carrying another request's image would fail these.

A request with no answer (connection error or timeout) is *lost*; a wrong status is *unexpected*; a
right status with a wrong body is a *check failure*. While the soak runs a sampler reads the resident
memory (``VmRSS``, ``RssAnon`` in ``/proc/<pid>/status``) of every model's workers (pids from the
management API ``GET /models/<name>`` → ``workers[].pid``, re-read each time so a restarted worker is
noticed) and of the frontend (the workers' parent java process), every ``--sample-every`` seconds.

Report: p50/p99 latency per kind, throughput, lost/unexpected/check-failure counts, the workers'
memory after warm-up (the first ``--warmup`` requests) and its growth to the end of the run, and the
memory curve, written to ``<out>/soak.json``, ``soak.md``, ``soak.png``.

By default a TorchServe is started on free loopback ports (``tests/serverkit.py``'s
``start_server``, the bundled archives, ``--byo`` adds the bring-your-own ones) and stopped at the
end; ``--url``/``--token-file`` (a TorchServe ``key_file.json``) attach to a running one instead.
Bounded: at most ``--requests`` requests and ``--max-seconds`` of soak; traffic to 127.0.0.1 only.

    .venv/bin/python benchmarks/soak.py --requests 10000 --concurrency 32 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))
PHOTOS = SHARED / "data" / "imagenet-samples"
CLASSIFIER, EMBED = "effnet_lite0", "effnet_lite0_embed"
BYO_CLASSIFIERS = ("tv_resnet18", "timm_vit", "cifar_resnet20")
BYO_EMBEDDERS = ("tv_resnet18_embed", "tv_resnet18_proj")
SCORE_TOL = 2e-3       # same photo, another batch: the float noise of batching is ~1e-6
COSINE_MIN = 0.999
TIMEOUT_S = 300.0      # a request unanswered after this long is lost (responseTimeout is 120 s)


# --------------------------------------------------------------------------------------------- client

class Client:
    """HTTP to one TorchServe: inference and management URLs and keys, one session per thread."""

    def __init__(self, url: str, management_url: str, keys: Dict[str, str]):
        for u in (url, management_url):
            if urlparse(u).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit(f"loopback only: {u}")
        self.url, self.management_url, self.keys = url.rstrip("/"), management_url.rstrip("/"), keys
        self._local = threading.local()

    @classmethod
    def of(cls, server) -> "Client":
        """From a ``tests/serverkit.py`` TorchServe."""
        return cls(server.url, server.management_url, dict(server.keys))

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def headers(self, api: str = "inference") -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"}

    def send(self, method: str, path: str, timeout: float = TIMEOUT_S, **kwargs) -> requests.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return self.session.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)

    def workers(self, model: str) -> List[int]:
        r = requests.get(f"{self.management_url}/models/{model}", headers=self.headers("management"), timeout=10)
        r.raise_for_status()
        return [int(w["pid"]) for w in r.json()[0].get("workers", []) if w.get("pid")]

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/ping", headers=self.headers(), timeout=10).json().get("status") == "Healthy"
        except (requests.RequestException, ValueError):
            return False


# ------------------------------------------------------------------------------------------ photos

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_png(text: str, size: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """None if ``text`` is a base64 PNG (of ``size``) that decodes completely, else what is wrong."""
    if not isinstance(text, str) or not text:
        return f"no PNG (got {type(text).__name__})"
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        if image.format != "PNG":
            return f"not a PNG but {image.format}"
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a check failure
        return f"PNG does not decode: {type(exc).__name__}: {exc}"
    if size is not None and image.size != tuple(size):
        return f"PNG is {image.size}, expected {tuple(size)}"
    return None


def load_photos(count: int, seed: int = 0) -> Dict[str, bytes]:
    """``count`` sample photographs (seeded choice), name → file bytes."""
    names = sorted(p.name for p in PHOTOS.glob("*.JPEG"))
    if not names:
        raise SystemExit(f"no photographs in {PHOTOS}")
    chosen = random.Random(seed).sample(names, min(count, len(names)))
    return {name: (PHOTOS / name).read_bytes() for name in chosen}


# ------------------------------------------------------------------------------------ reference answers

@dataclass
class Reference:
    """Each photo's plain answer, fetched once before the soak, one request per photo and model."""
    top1: Dict[Tuple[str, str], Tuple[int, float]] = field(default_factory=dict)   # (model, photo) → (index, score)
    embedding: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)     # (model, photo) → unit vector
    gallery: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)      # photo → [(index, similarity)]


def fetch_reference(client: Client, photos: Dict[str, bytes], classifiers: List[str], embedders: List[str],
                    gallery: bool, concurrency: int = 4) -> Reference:
    ref = Reference()
    jobs: List[Tuple[str, str, str]] = [("top1", m, p) for m in classifiers for p in photos]
    jobs += [("embedding", m, p) for m in embedders for p in photos]
    jobs += [("gallery", EMBED, p) for p in photos] if gallery else []

    def one(job):
        what, model, name = job
        if what == "gallery":
            r = client.send("POST", f"/predictions/{model}", files={"image": photos[name], "gallery": (None, "3"),
                                                                   "embedding": (None, "0")})
        else:
            r = client.send("POST", f"/predictions/{model}", data=photos[name],
                            headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 200:
            raise RuntimeError(f"reference {what} {model} {name}: {r.status_code} {r.text[:300]}")
        body = r.json()
        if what == "top1":
            ref.top1[(model, name)] = (body["predictions"][0]["index"], body["predictions"][0]["score"])
        elif what == "embedding":
            ref.embedding[(model, name)] = unit(body["embedding"])
        else:
            ref.gallery[name] = [(m["index"], m["similarity"]) for m in body["matches"]]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    return ref


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / max(np.linalg.norm(v), 1e-12)


# ------------------------------------------------------------------------------------------- kinds

@dataclass
class Request:
    kind: str
    method: str
    path: str
    kwargs: dict
    check: Callable[[requests.Response], Optional[str]]  # None if the answer is right
    case: Optional[str] = None                           # the malformed kinds: which one


def expect_top1(ref: Reference, model: str, photo: str, predictions) -> Optional[str]:
    if not isinstance(predictions, list) or not predictions:
        return f"no predictions: {str(predictions)[:200]}"
    index, score = predictions[0]["index"], predictions[0]["score"]
    want_index, want_score = ref.top1[(model, photo)]
    if index != want_index or abs(score - want_score) > SCORE_TOL:
        return f"cross-talk? {photo} on {model}: top-1 {index} ({score:.4f}), plain answer {want_index} ({want_score:.4f})"
    return None


def ok_json(response: requests.Response) -> Tuple[Optional[dict], Optional[str]]:
    try:
        return response.json(), None
    except ValueError:
        return None, f"not JSON: {response.text[:200]}"


def classifier_kind(kind: str, model: str, fields: Dict[str, str], method: Optional[str], side: int = 224):
    """A multipart (or, without fields, raw-bytes) prediction, explained when ``method``."""
    def make(ref: Reference, photos: Dict[str, bytes], rng: random.Random) -> Request:
        photo = rng.choice(sorted(photos))
        if fields:
            kwargs = {"files": {"data": photos[photo], **{k: (None, v) for k, v in fields.items()}}}
        else:
            kwargs = {"data": photos[photo], "headers": {"Content-Type": "application/octet-stream"}}

        def check(r: requests.Response) -> Optional[str]:
            body, bad = ok_json(r)
            if bad:
                return bad
            problem = expect_top1(ref, model, photo, body.get("predictions"))
            if problem or method is None:
                return problem or ("unexpected explanation" if "explanation" in body else None)
            e = body.get("explanation") or {}
            if e.get("method") != method:
                return f"explanation method {e.get('method')!r}, asked {method}"
            if fields.get("layer") and not e.get("layer"):
                return "explanation without its layer"
            if e.get("target") != ref.top1[(model, photo)][0]:
                return f"explained target {e.get('target')} is not the top-1 {ref.top1[(model, photo)][0]}"
            return decode_png(e.get("heatmap"), (side, side))
        return Request(kind, "POST", f"/predictions/{model}", kwargs, check)
    return make


def kserve_v1(ref, photos, rng) -> Request:
    pair = rng.sample(sorted(photos), 2)
    body = {"instances": [{"data": b64(photos[pair[0]]), "explain": "layercam"}, b64(photos[pair[1]])]}

    def check(r):
        answer, bad = ok_json(r)
        if bad:
            return bad
        rows = answer.get("predictions") or []
        if len(rows) != 2:
            return f"v1: {len(rows)} predictions for 2 instances"
        for row, photo in zip(rows, pair):
            problem = expect_top1(ref, CLASSIFIER, photo, row.get("predictions"))
            if problem:
                return "v1: " + problem
        if "explanation" in rows[1]:
            return "v1: the plain instance has an explanation"
        return decode_png((rows[0].get("explanation") or {}).get("heatmap"), (224, 224))
    return Request("kserve_v1", "POST", f"/v1/models/{CLASSIFIER}:predict", {"json": body}, check)


def kserve_v2(ref, photos, rng) -> Request:
    pair = rng.sample(sorted(photos), 2)
    body = {"id": f"soak-{rng.randrange(1 << 30)}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(photos[p]) for p in pair]}],
            "parameters": {"explain": "gradcam"}}

    def check(r):
        answer, bad = ok_json(r)
        if bad:
            return bad
        if answer.get("id") != body["id"]:
            return f"v2: id {answer.get('id')!r}, sent {body['id']!r}"
        out = {o["name"]: o for o in answer.get("outputs", [])}
        for name in ("indices", "scores", "heatmap"):
            if name not in out:
                return f"v2: no {name} output (got {sorted(out)})"
        k = out["indices"]["shape"][1]
        for i, photo in enumerate(pair):
            predictions = [{"index": out["indices"]["data"][i * k], "score": out["scores"]["data"][i * k]}]
            problem = expect_top1(ref, CLASSIFIER, photo, predictions)
            if problem:
                return "v2: " + problem
        if out["heatmap"]["shape"] != [2, 1]:
            return f"v2: heatmap shape {out['heatmap']['shape']}"
        for png in out["heatmap"]["data"]:
            problem = decode_png(png, (224, 224))
            if problem:
                return "v2: " + problem
        return None
    return Request("kserve_v2", "POST", f"/v2/models/{CLASSIFIER}/infer", {"json": body}, check)


def fam_pair(model: str, kind: str):
    def make(ref, photos, rng) -> Request:
        query, other = rng.sample(sorted(photos), 2)

        def check(r):
            body, bad = ok_json(r)
            if bad:
                return bad
            want = float(ref.embedding[(model, query)] @ ref.embedding[(model, other)])
            if abs(body.get("similarity", float("nan")) - want) > SCORE_TOL:
                return f"cross-talk? FAM similarity {body.get('similarity')} of {query}/{other}, embeddings give {want:.4f}"
            if float(unit(body["embedding"]) @ ref.embedding[(model, query)]) < COSINE_MIN:
                return f"cross-talk? embedding of {query} differs from its plain one"
            for key in ("query_map", "reference_map"):
                problem = decode_png(body.get(key), (224, 224))
                if problem:
                    return f"{key}: {problem}"
            return None
        return Request(kind, "POST", f"/predictions/{model}", {"files": {"image": photos[query], "reference": photos[other]}},
                       check)
    return make


def embedding_kind(model: str, kind: str):
    def make(ref, photos, rng) -> Request:
        photo = rng.choice(sorted(photos))

        def check(r):
            body, bad = ok_json(r)
            if bad:
                return bad
            if float(unit(body.get("embedding") or [0.0]) @ ref.embedding[(model, photo)]) < COSINE_MIN:
                return f"cross-talk? embedding of {photo} differs from its plain one"
            return None
        return Request(kind, "POST", f"/predictions/{model}",
                       {"data": photos[photo], "headers": {"Content-Type": "application/octet-stream"}}, check)
    return make


def gallery(ref, photos, rng) -> Request:
    photo = rng.choice(sorted(photos))

    def check(r):
        body, bad = ok_json(r)
        if bad:
            return bad
        matches = body.get("matches") or []
        got = [(m["index"], m["similarity"]) for m in matches]
        want = ref.gallery[photo]
        if [i for i, _ in got] != [i for i, _ in want] or any(abs(a[1] - b[1]) > SCORE_TOL for a, b in zip(got, want)):
            return f"cross-talk? gallery of {photo}: {got}, plain answer {want}"
        for m in matches:
            for key in ("query_map", "reference_map"):
                problem = decode_png(m.get(key), (224, 224))
                if problem:
                    return f"match {key}: {problem}"
        return None
    return Request("gallery", "POST", f"/predictions/{EMBED}",
                   {"files": {"image": photos[photo], "gallery": (None, "3"), "embedding": (None, "0")}}, check)


def malformed(ref, photos, rng) -> Request:
    """One of several malformed requests; each must be a 4xx whose JSON error carries a message."""
    photo = photos[rng.choice(sorted(photos))]
    nested = "[" * 200 + "]" * 200
    cases = [
        ("invalid JSON", f"/predictions/{CLASSIFIER}", {"data": b'{"data": "abc', "headers": {"Content-Type": "application/json"}}),
        ("not an image", f"/predictions/{CLASSIFIER}", {"data": b"this is not an image" * 10,
                                                        "headers": {"Content-Type": "application/octet-stream"}}),
        ("truncated JPEG", f"/predictions/{CLASSIFIER}", {"data": photo[:300],
                                                          "headers": {"Content-Type": "application/octet-stream"}}),
        ("unknown method", f"/predictions/{CLASSIFIER}", {"files": {"data": photo, "explain": (None, "nosuchcam")}}),
        ("unknown layer", f"/predictions/{CLASSIFIER}", {"files": {"data": photo, "explain": (None, "gradcam"),
                                                                  "layer": (None, "_blocks.99")}}),
        ("bad target", f"/predictions/{CLASSIFIER}", {"files": {"data": photo, "explain": (None, "gradcam"),
                                                               "target": (None, "5000")}}),
        ("deeply nested JSON", f"/predictions/{CLASSIFIER}", {"data": nested.encode(),
                                                              "headers": {"Content-Type": "application/json"}}),
        ("invalid base64", f"/v1/models/{CLASSIFIER}:predict", {"json": {"instances": [{"data": "@@not base64@@"}]}}),
        ("v2 image as FP32", f"/v2/models/{CLASSIFIER}/infer",
         {"json": {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}),
        ("embed unknown similarity", f"/predictions/{EMBED}", {"files": {"image": photo, "similarity": (None, "manhattan")}}),
        ("embed gallery too large", f"/predictions/{EMBED}", {"files": {"image": photo, "gallery": (None, "500")}}),
    ]
    name, path, kwargs = rng.choice(cases)

    def check(r):
        body, bad = ok_json(r)
        if bad:
            return f"{name}: {bad}"
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return None if message else f"{name}: 4xx without an error message: {str(body)[:200]}"
    return Request("malformed", "POST", path, kwargs, check, case=name)


@dataclass
class Kind:
    name: str
    weight: int
    make: Callable[[Reference, Dict[str, bytes], random.Random], Request]
    status: Tuple[int, ...] = (200,)


def kinds(byo: bool = False) -> List[Kind]:
    out = [
        Kind("plain", 4, classifier_kind("plain", CLASSIFIER, {}, None)),
        Kind("gradcam", 2, classifier_kind("gradcam", CLASSIFIER, {"explain": "gradcam"}, "gradcam")),
        Kind("layercam", 2, classifier_kind("layercam", CLASSIFIER, {"explain": "layercam", "layer": "_blocks.10"},
                                            "layercam")),
        Kind("shallowcam@_blocks.4", 2, classifier_kind("shallowcam@_blocks.4", CLASSIFIER,
                                                        {"explain": "shallowcam", "layer": "_blocks.4"}, "shallowcam")),
        Kind("shallowcam@_blocks.2", 2, classifier_kind("shallowcam@_blocks.2", CLASSIFIER,
                                                        {"explain": "shallowcam", "layer": "_blocks.2"}, "shallowcam")),
        Kind("kserve_v1", 1, kserve_v1),
        Kind("kserve_v2", 1, kserve_v2),
        Kind("fam_pair", 2, fam_pair(EMBED, "fam_pair")),
        Kind("embedding", 2, embedding_kind(EMBED, "embedding")),
        Kind("gallery", 1, gallery),
        Kind("malformed", 2, malformed, status=(400, 413)),
    ]
    if byo:
        out += [
            Kind("byo tv_resnet18 gradcam@stage2", 1, classifier_kind(
                "byo tv_resnet18 gradcam@stage2", "tv_resnet18", {"explain": "gradcam", "layer": "stage2"}, "gradcam")),
            Kind("byo timm_vit gradcam", 1, classifier_kind("byo timm_vit gradcam", "timm_vit", {"explain": "gradcam"},
                                                            "gradcam")),
            Kind("byo cifar_resnet20 shallowcam", 1, classifier_kind(
                "byo cifar_resnet20 shallowcam", "cifar_resnet20", {"explain": "shallowcam"}, "shallowcam", side=32)),
            Kind("byo tv_resnet18_embed fam", 1, fam_pair("tv_resnet18_embed", "byo tv_resnet18_embed fam")),
            Kind("byo tv_resnet18_proj fam", 1, fam_pair("tv_resnet18_proj", "byo tv_resnet18_proj fam")),
        ]
    return out


def models_of(byo: bool) -> Tuple[List[str], List[str]]:
    classifiers = [CLASSIFIER] + (list(BYO_CLASSIFIERS) if byo else [])
    embedders = [EMBED] + (list(BYO_EMBEDDERS) if byo else [])
    return classifiers, embedders


# ------------------------------------------------------------------------------------------ memory

def rss_kib(pid: int) -> Optional[Dict[str, int]]:
    """``VmRSS`` and ``RssAnon`` (KiB) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "PPid"):
            out[key] = int(value.split()[0])
    return out


class MemorySampler(threading.Thread):
    """Every ``every`` s: each model's worker pids (management API) and their RSS, plus the frontend's."""

    def __init__(self, client: Client, models: List[str], every: float, progress: Callable[[], int]):
        super().__init__(daemon=True)
        self.client, self.models, self.every, self.progress = client, models, every, progress
        self.samples: List[dict] = []
        self.pids_seen: Dict[str, set] = {m: set() for m in models}
        self.errors = 0
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        row = {"t": round(time.monotonic() - self.t0, 2), "done": self.progress(), "workers": {}, "frontend": None}
        frontend = None
        for model in self.models:
            try:
                pids = self.client.workers(model)
            except (requests.RequestException, ValueError, KeyError, IndexError):
                self.errors += 1
                continue
            for pid in pids:
                self.pids_seen[model].add(pid)
                mem = rss_kib(pid)
                if mem:
                    row["workers"][f"{model}:{pid}"] = {"rss": mem.get("VmRSS", 0), "anon": mem.get("RssAnon", 0)}
                    frontend = frontend or mem.get("PPid")
        if frontend:
            mem = rss_kib(frontend)
            if mem:
                row["frontend"] = {"pid": frontend, "rss": mem.get("VmRSS", 0), "anon": mem.get("RssAnon", 0)}
        row["workers_rss_kib"] = sum(w["rss"] for w in row["workers"].values())
        row["workers_anon_kib"] = sum(w["anon"] for w in row["workers"].values())
        self.samples.append(row)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.sample()  # one last sample after the last answer


# ---------------------------------------------------------------------------------------------- run

@dataclass
class Outcome:
    kind: str
    seconds: float
    status: Optional[int]
    problem: Optional[str]       # None: the answer is right
    lost: bool = False
    unexpected: bool = False
    case: Optional[str] = None


def plan(n: int, kinds_: List[Kind], ref: Reference, photos: Dict[str, bytes], seed: int) -> List[Tuple[Kind, Request]]:
    rng = random.Random(seed)
    weights = [k.weight for k in kinds_]
    return [(kind, kind.make(ref, photos, rng)) for kind in rng.choices(kinds_, weights, k=n)]


def send_one(client: Client, kind: Kind, request: Request) -> Outcome:
    start = time.perf_counter()
    try:
        response = client.send(request.method, request.path, **request.kwargs)
    except requests.RequestException as exc:
        return Outcome(kind.name, time.perf_counter() - start, None, f"lost: {type(exc).__name__}: {exc}", lost=True,
                       case=request.case)
    seconds = time.perf_counter() - start
    case = request.case
    if response.status_code not in kind.status:
        return Outcome(kind.name, seconds, response.status_code,
                       f"status {response.status_code} (expected {kind.status}): {response.text[:300]}",
                       unexpected=True, case=case)
    try:
        problem = request.check(response)
    except Exception as exc:  # noqa: BLE001 - a malformed answer is a check failure, not a crash
        problem = f"check raised {type(exc).__name__}: {exc}"
    return Outcome(kind.name, seconds, response.status_code, problem, case=case)


def soak(client: Client, n: int, concurrency: int, byo: bool = False, photos: int = 40, seed: int = 0,
         max_seconds: float = 3600.0, sample_every: float = 5.0, warmup: Optional[int] = None,
         log: Callable[[str], None] = lambda s: None) -> dict:
    """The soak against ``client``'s server; returns the results (see :func:`summarise`)."""
    kinds_ = kinds(byo)
    classifiers, embedders = models_of(byo)
    images = load_photos(photos, seed)
    t = time.monotonic()
    ref = fetch_reference(client, images, classifiers, embedders, gallery=True)
    log(f"reference answers for {len(images)} photos x {len(classifiers) + len(embedders)} models + gallery "
        f"in {time.monotonic() - t:.1f} s")
    requests_ = plan(n, kinds_, ref, images, seed)
    outcomes: List[Optional[Outcome]] = [None] * n
    done = [0]
    lock = threading.Lock()
    sampler = MemorySampler(client, classifiers + embedders, sample_every, lambda: done[0])
    sampler.start()
    deadline = time.monotonic() + max_seconds
    next_index = [0]
    started = time.monotonic()

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= n or time.monotonic() > deadline:
                    return
                next_index[0] += 1
            kind, request = requests_[i]
            outcome = send_one(client, kind, request)
            with lock:
                outcomes[i] = outcome
                done[0] += 1
                if done[0] % 500 == 0:
                    bad = sum(1 for o in outcomes if o and (o.lost or o.unexpected or o.problem))
                    last = sampler.samples[-1] if sampler.samples else {}
                    log(f"{done[0]}/{n} in {time.monotonic() - started:.0f} s, {bad} bad, "
                        f"workers RSS {last.get('workers_rss_kib', 0) / 1024:.0f} MiB")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - started
    sampler.stop()
    healthy = client.healthy()
    finished = [o for o in outcomes if o is not None]
    return summarise(finished, n, concurrency, wall, sampler, healthy, warmup, byo, len(images), seed)


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(outcomes: List[Outcome], n: int, concurrency: int, wall: float, sampler: MemorySampler, healthy: bool,
              warmup: Optional[int], byo: bool, photos: int, seed: int) -> dict:
    per_kind = {}
    for name in sorted({o.kind for o in outcomes}):
        rows = [o for o in outcomes if o.kind == name]
        lat = [o.seconds for o in rows]
        per_kind[name] = {"requests": len(rows), "p50_s": round(percentile(lat, 50), 3),
                          "p99_s": round(percentile(lat, 99), 3), "max_s": round(max(lat), 3),
                          "lost": sum(o.lost for o in rows), "unexpected": sum(o.unexpected for o in rows),
                          "check_failures": sum(bool(o.problem) and not (o.lost or o.unexpected) for o in rows)}
    malformed = {}
    for o in outcomes:
        if o.case:
            malformed.setdefault(o.case, {}).setdefault(str(o.status), 0)
            malformed[o.case][str(o.status)] += 1
    problems = [f"{o.kind}: {o.problem}" for o in outcomes if o.problem]
    warm = warmup if warmup is not None else min(1000, len(outcomes) // 10)
    memory = memory_summary(sampler.samples, warm)
    all_lat = [o.seconds for o in outcomes]
    return {
        "requests_planned": n, "requests_done": len(outcomes), "concurrency": concurrency, "byo": byo,
        "photos": photos, "seed": seed, "wall_s": round(wall, 1),
        "throughput_rps": round(len(outcomes) / wall, 2) if wall else None,
        "p50_s": round(percentile(all_lat, 50), 3), "p99_s": round(percentile(all_lat, 99), 3),
        "lost": sum(o.lost for o in outcomes), "unexpected": sum(o.unexpected for o in outcomes),
        "check_failures": sum(bool(o.problem) and not (o.lost or o.unexpected) for o in outcomes),
        "healthy_after": healthy, "per_kind": per_kind, "malformed_cases": malformed,
        "problems": problems[:50], "memory": memory,
        "worker_pids": {m: sorted(p) for m, p in sampler.pids_seen.items()},
        "worker_restarts": sum(max(0, len(p) - 1) for p in sampler.pids_seen.values()),
        "samples": sampler.samples,
    }


def memory_summary(samples: List[dict], warmup: int) -> dict:
    """Workers' RSS after warm-up (first sample with ``done >= warmup``) and at the end, growth %."""
    if not samples:
        return {}
    after = [s for s in samples if s["done"] >= warmup] or samples[-1:]
    first, last = after[0], samples[-1]
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    out = {"warmup_requests": warmup, "start_workers_rss_mib": mib(samples[0]["workers_rss_kib"]),
           "warm_workers_rss_mib": mib(first["workers_rss_kib"]), "end_workers_rss_mib": mib(last["workers_rss_kib"]),
           "max_workers_rss_mib": mib(max(s["workers_rss_kib"] for s in samples)),
           "warm_workers_anon_mib": mib(first["workers_anon_kib"]), "end_workers_anon_mib": mib(last["workers_anon_kib"])}
    if first["workers_rss_kib"]:
        out["growth_pct"] = round(100 * (last["workers_rss_kib"] - first["workers_rss_kib"]) / first["workers_rss_kib"], 2)
    # the second half of the post-warm-up samples against the first: does it level off?
    if len(after) >= 4:
        half = len(after) // 2
        a, b, c = after[0], after[half], after[-1]
        out["growth_first_half_mib"] = mib(b["workers_rss_kib"] - a["workers_rss_kib"])
        out["growth_second_half_mib"] = mib(c["workers_rss_kib"] - b["workers_rss_kib"])
        out["halves_requests"] = [a["done"], b["done"], c["done"]]
    # the RSS swings by ~±100 MiB from batch to batch: medians of the post-warm-up samples in quarters
    quarters = [q for q in np.array_split(np.array([x["workers_rss_kib"] for x in after], dtype=float), 4) if q.size]
    if len(quarters) == 4:
        out["quarter_median_rss_mib"] = [mib(float(np.median(q))) for q in quarters]
        out["growth_median_pct"] = round(100 * (np.median(quarters[-1]) / np.median(quarters[0]) - 1), 2)
    per_worker = {}
    for key in first["workers"]:
        if key in last["workers"]:
            per_worker[key] = {"warm_mib": mib(first["workers"][key]["rss"]), "end_mib": mib(last["workers"][key]["rss"])}
    out["per_worker"] = per_worker
    if first.get("frontend") and last.get("frontend"):
        out["frontend_warm_mib"], out["frontend_end_mib"] = mib(first["frontend"]["rss"]), mib(last["frontend"]["rss"])
    return out


# ------------------------------------------------------------------------------------------ reports

def write_reports(result: dict, out: Path, stem: str = "soak", machine: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_memory(result, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(markdown(result, machine, f"{stem}.png"))


def plot_memory(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    done = [s["done"] for s in samples]
    keys = sorted({k for s in samples for k in s["workers"]})
    for key in keys:
        xs = [s["done"] for s in samples if key in s["workers"]]
        ys = [s["workers"][key]["rss"] / 1024 for s in samples if key in s["workers"]]
        ax.plot(xs, ys, label=f"worker {key}", linewidth=1)
    ax.plot(done, [s["workers_rss_kib"] / 1024 for s in samples], label="all workers", linewidth=2, color="black")
    front = [(s["done"], s["frontend"]["rss"] / 1024) for s in samples if s.get("frontend")]
    if front:
        ax.plot(*zip(*front), label="frontend (java)", linewidth=1, linestyle="--")
    warm = result["memory"].get("warmup_requests")
    if warm:
        ax.axvline(warm, color="grey", linestyle=":", label=f"end of warm-up ({warm})")
    ax.set_xlabel("requests answered")
    ax.set_ylabel("resident memory (MiB)")
    env = result.get("worker_env") or {}
    ax.set_title(f"soak: {result['requests_done']} requests at concurrency {result['concurrency']}"
                 + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict, machine: str, png: str) -> str:
    m = r["memory"]
    lines = [
        f"# Soak: {r['requests_done']} mixed requests at concurrency {r['concurrency']}",
        "",
        f"Generated by `benchmarks/soak.py` ({machine}). Every answer checked: status, heatmap/FAM maps "
        "decodable PNGs of the right size, top-1 (index and score), embedding, FAM similarity and gallery "
        "matches equal to the same photo's plain answer fetched once before the soak (no cross-talk inside batches).",
        "",
        f"- requests: {r['requests_done']} of {r['requests_planned']} planned, {r['photos']} photos, seed {r['seed']}"
        + (", with the bring-your-own archives" if r["byo"] else ""),
        f"- wall {r['wall_s']} s, throughput **{r['throughput_rps']} requests/s**, p50 {r['p50_s']} s, p99 {r['p99_s']} s",
        f"- **lost {r['lost']}, unexpected statuses {r['unexpected']}, check failures {r['check_failures']}**, "
        f"server healthy after: {r['healthy_after']}, worker restarts: {r['worker_restarts']}",
    ]
    if r.get("worker_env"):
        lines.append(f"- worker environment: {', '.join(f'`{k}={v}`' for k, v in r['worker_env'].items())}")
    if m:
        lines += [
            f"- workers' resident memory (sum of {len(m.get('per_worker', {}))} workers): {m['start_workers_rss_mib']} MiB "
            f"at the first sample, **{m['warm_workers_rss_mib']} MiB after warm-up** ({m['warmup_requests']} requests), "
            f"**{m['end_workers_rss_mib']} MiB at the end** (max {m['max_workers_rss_mib']}): "
            f"**growth {m.get('growth_pct')} %**"
            + (f" ({m['growth_first_half_mib']} MiB in requests {m['halves_requests'][0]}–{m['halves_requests'][1]}, "
               f"{m['growth_second_half_mib']} MiB in {m['halves_requests'][1]}–{m['halves_requests'][2]})"
               if "growth_first_half_mib" in m else ""),
            *([f"- median of the workers' RSS in each quarter of the post-warm-up samples: "
               f"{' → '.join(str(v) for v in m['quarter_median_rss_mib'])} MiB: **growth {m['growth_median_pct']} %** "
               f"(last quarter against the first)"] if "quarter_median_rss_mib" in m else []),
            f"- anonymous memory (RssAnon) of the workers: {m['warm_workers_anon_mib']} → {m['end_workers_anon_mib']} MiB"
            + (f"; frontend (java) {m['frontend_warm_mib']} → {m['frontend_end_mib']} MiB" if "frontend_warm_mib" in m else ""),
        ]
    lines += ["", "| kind | requests | p50 s | p99 s | max s | lost | unexpected | check failures |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, k in r["per_kind"].items():
        lines.append(f"| {name} | {k['requests']} | {k['p50_s']} | {k['p99_s']} | {k['max_s']} | {k['lost']} | "
                     f"{k['unexpected']} | {k['check_failures']} |")
    if m.get("per_worker"):
        lines += ["", "| worker (model:pid) | after warm-up MiB | end MiB |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['warm_mib']} | {v['end_mib']} |" for k, v in m["per_worker"].items()]
    if r["malformed_cases"]:
        lines += ["", "Malformed requests (case: status → count): "
                  + "; ".join(f"{c}: " + ", ".join(f"{s}×{n}" for s, n in v.items())
                              for c, v in sorted(r["malformed_cases"].items()))]
    if r["problems"]:
        lines += ["", "First problems:", ""] + [f"- {p[:300]}" for p in r["problems"][:20]]
    lines += ["", f"![memory curve]({png})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main

def machine_line() -> str:
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", "-n", type=int, default=10000)
    ap.add_argument("--concurrency", "-c", type=int, default=32)
    ap.add_argument("--byo", action="store_true", help="include the bring-your-own archives (built first)")
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="stop starting requests after this long")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=None, help="requests before the memory baseline (default min(1000, N/10))")
    ap.add_argument("--url", help="attach to a running TorchServe (inference URL) instead of starting one")
    ap.add_argument("--management-url", help="its management URL (default: inference port + 1)")
    ap.add_argument("--token-file", help="its key_file.json (inference and management keys)")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the TorchServe this starts (the workers inherit it), e.g. MALLOC_ARENA_MAX=2")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--stem", default="soak")
    ap.add_argument("--machine", default=machine_line())
    args = ap.parse_args(argv)
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)  # noqa: E731

    server = None
    worker_env = dict(kv.split("=", 1) for kv in args.worker_env)
    if args.url:
        if not args.token_file:
            ap.error("--url needs --token-file")
        data = json.loads(Path(args.token_file).read_text())
        keys = {api: data[api]["key"] for api in ("inference", "management")}
        parsed = urlparse(args.url)
        management = args.management_url or f"{parsed.scheme}://{parsed.hostname}:{parsed.port + 1}"
        client = Client(args.url, management, keys)
    else:
        sys.path.insert(0, str(REPO / "tests"))
        import serverkit  # the test suite's TorchServe starter: free ports, derived config, keys, clean stop

        os.environ.update(worker_env)  # TorchServe's env → the frontend → its workers
        log("starting TorchServe" + (" with the bring-your-own archives" if args.byo else ""))
        # TorchServe's keys expire after token_expiration_min (default 60): a run on a loaded machine
        # can outlast that, and every later request would be refused with InvalidKeyException (seen:
        # 886 such 400s after 60 min); the soak measures the handlers, so its keys outlive its deadline
        expiry = int(args.max_seconds // 60) + 30
        server = serverkit.start_server(byo=args.byo, overrides={"token_expiration_min": str(expiry)})
        client = Client.of(server)
        log(f"TorchServe ready at {server.url} (workdir {server.workdir})")
    try:
        result = soak(client, args.requests, args.concurrency, byo=args.byo, photos=args.photos, seed=args.seed,
                      max_seconds=args.max_seconds, sample_every=args.sample_every, warmup=args.warmup, log=log)
    finally:
        if server is not None:
            log(f"stopping TorchServe: exit {server.stop()}")
    result["worker_env"] = worker_env
    result["machine"] = args.machine
    write_reports(result, Path(args.out), args.stem, args.machine)
    m = result["memory"]
    log(f"done: {result['requests_done']} requests, {result['throughput_rps']} req/s, lost {result['lost']}, "
        f"unexpected {result['unexpected']}, check failures {result['check_failures']}, workers RSS "
        f"{m.get('warm_workers_rss_mib')} → {m.get('end_workers_rss_mib')} MiB ({m.get('growth_pct')} %)")
    for p in result["problems"][:10]:
        log("  " + p[:300])
    bad = result["lost"] or result["unexpected"] or result["check_failures"] or not result["healthy_after"]
    if server is not None:
        if bad:
            log(f"the server's logs are kept in {server.workdir}")
        else:
            import shutil
            shutil.rmtree(server.workdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
