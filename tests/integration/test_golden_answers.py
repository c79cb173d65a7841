"""The golden answers: a fixed set of requests whose answers must stay the same, floats within a
stated tolerance.

Every door of the product is asked the same fixed questions — TorchServe (bundled classifier and
embedding archives, the bring-your-own archives of tests/byo_archives.py; plain, each method family,
compare, FAM, gallery, KServe v1 and v2 envelopes, JSON and multipart, headers, errors) and camserve's
KServe predictor — one request at a time (so each is its own batch), and each answer is reduced to a
canonical form (:func:`canonical`):

- the status code and the JSON body, timing fields removed (``seconds``, ``batch_seconds``,
  ``comparison_seconds``, ``forward_seconds``, and the v2 output tensors of those names);
- everything that is not a float measurement verbatim: keys and their order, labels, class indices,
  methods, layer names, shapes and sizes, options, passes, crop boxes, error types and messages;
- every map reduced to a fingerprint: a base64 PNG (grayscale heatmap, colour heatmap, RGB overlay,
  FAM query/reference map) is decoded to ``{"fingerprint": "png", "mode", "shape": [h, w, c],
  "cells"}``, and a map sent as numbers (``format=array``: the JSON ``array``/``arrays`` nested lists,
  the v2 ``heatmap_array`` tensor, reshaped by its ``shape``) to ``{"fingerprint": "array", "shape",
  "cells"}``; ``cells`` is, per channel, the mean over a 16 × 16 grid of cells (adaptive: a map
  smaller than 16 on a side keeps its own pixels) of the values in [0, 1] (PNG levels / 255), rounded
  to 4 decimals;
- every other long number list (embeddings: the JSON ``embedding``, the v2 ``embedding`` tensor, one
  per row) to ``{"fingerprint": "vector", "length", "norm", "mean", "min", "max", "chunks"}``
  (``chunks``: the means of 32 equal consecutive slices), rounded to 5 decimals;
- a long base64 string that is no PNG keeps only its SHA-256; a JSON answer carried as text (the v2
  ``json_output`` form, ``options``) is parsed and canonicalised too.

The comparison (:func:`differences`) lists every difference with its path in the answer
(``cls-compare.body.explanations[1].heatmap: …``), under these tolerances:

- **floats measured by the model** — probabilities (``score``/``scores``), similarities
  (``similarity``, ``match_similarity``), Spearman ρ (``spearman``), calibration scores, and the
  numbers of a vector fingerprint: ``|actual − expected| ≤ 1e-3 · max(1, |expected|)``
  (:data:`FLOAT_TOL`). Why 1e-3: the answers round probabilities and similarities to 6 decimals and ρ
  to 4, so the tolerance is 1000× and 10× their rounding step (rounding alone never fails it); running
  the EfficientNet-Lite0 forward in channels-last instead of contiguous memory changes probabilities
  by at most 1.1e-6 (measured on the 8 first sample photographs, CPU), so it leaves a margin of about
  1000× for a faster forward (channels-last, another runtime), while a real change — another
  preprocessing, other weights, an inference in bfloat16/float16 (errors of order 1e-2) — moves these
  numbers by far more than 1e-3. Every other float (crop boxes, options such as ``alpha`` or
  ``temperature``, ``passes``) is compared exactly;
- **top-k** (``predictions``, the gallery's ``matches``, the v2 ``indices``/``labels``/``scores`` and
  ``match_*`` tensors): the same class indices in the same order, with one allowance: two classes may
  trade places when their expected probabilities (similarities) are within :data:`FLOAT_TOL` of each
  other, and a class may enter or leave the top-k only when its probability is within
  :data:`FLOAT_TOL` of the expected k-th (it could have been the (k+1)-th). Each class's own entry
  (label, score, maps) is then compared with its expected entry;
- **maps**: fingerprint kind, mode and shape exactly; every cell mean within ``0.01`` (:data:`MAP_TOL`,
  2.55 grey levels of an 8-bit map averaged over a cell). Why 0.01: the channels-last forward moves a
  16 × 16 cell mean of the 8-bit heatmaps by at most 2.8e-4 (CAM, Grad-CAM, LayerCAM, Shallow-CAM;
  measured as above: a map value moving by ~1e-6 flips a pixel across an 8-bit rounding boundary now
  and then), a margin of about 35×; a map of another layer, method, target or crop moves many cells
  by 0.05 and more.

The expected forms live in ``tests/integration/golden/answers.json`` (about 300 kB).
``CAMSERVE_RECORD_GOLDEN=1`` rewrites that file from the running code (do it only on purpose, before a
refactor, and commit it). On a failure, the answers' canonical forms of this run are written next to
the test's temporary files (the path is in the message), to diff against the golden file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import photo_bytes as photo
from serverkit import REPO

pytestmark = pytest.mark.server
GOLDEN = Path(__file__).resolve().parent / "golden" / "answers.json"
RECORD = os.environ.get("CAMSERVE_RECORD_GOLDEN") == "1"

#: keys whose values are wall-clock measurements (never the same twice)
TIMING_KEYS = {"seconds", "batch_seconds", "comparison_seconds", "forward_seconds"}
#: strings longer than this that are base64 are decoded (PNG → fingerprint, else SHA-256)
LONG = 200
#: number lists with more values than this (maps as arrays, embeddings) become fingerprints
LONG_LIST = 16
#: texts (error messages …) longer than this keep only their SHA-256
LONG_TEXT = 4000

#: tolerance of a float measured by the model: |actual − expected| ≤ FLOAT_TOL · max(1, |expected|)
FLOAT_TOL = 1e-3
#: tolerance of a map fingerprint: every cell mean (in [0, 1]) within MAP_TOL
MAP_TOL = 0.01
#: a map fingerprint's grid (cells per side, fewer when the map is smaller), its decimals
GRID, MAP_DECIMALS = 16, 4
#: a vector fingerprint's slices, its decimals
CHUNKS, VECTOR_DECIMALS = 32, 5
#: keys (JSON fields, v2 output names) whose numbers are float measurements, compared within FLOAT_TOL
MEASURED = {"score", "scores", "similarity", "match_similarity", "spearman", "overall", "vs_layercam", "sem"}
#: v2 output tensors that form ranked lists ([images, k]): entry field → tensor name; the first field
#: found of ``key`` identifies an entry, ``score`` ranks them
RANKED_V2 = (
    {"index": "indices", "label": "labels", "score": "scores"},
    {"index": "match_index", "label": "match_label", "similarity": "match_similarity",
     "query_map": "match_query_map", "reference_map": "match_reference_map"},
)

CLS, EMB = "effnet_lite0", "effnet_lite0_embed"
BIRD, TENCH, SHARK, TURTLE = ("n01833805_hummingbird.JPEG", "n01440764_tench.JPEG",
                              "n01484850_great_white_shark.JPEG", "n01665541_leatherback_turtle.JPEG")


def b64(name: str) -> str:
    return base64.b64encode(photo(name)).decode("ascii")


# -- the canonical form ---------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def grid_cells(values: np.ndarray) -> List[List[List[float]]]:
    """``(h, w, c)`` values → per channel, the mean over a GRID × GRID grid of cells (adaptive, as
    ``adaptive_avg_pool2d``: cell ``i`` spans ``[⌊i·h/g⌋, ⌈(i+1)·h/g⌉)``), rounded to MAP_DECIMALS."""
    h, w, channels = values.shape
    gh, gw = min(GRID, h), min(GRID, w)
    rows = [(i * h // gh, -(-(i + 1) * h // gh)) for i in range(gh)]
    cols = [(j * w // gw, -(-(j + 1) * w // gw)) for j in range(gw)]
    return [[[round(float(values[r0:r1, c0:c1, c].mean()), MAP_DECIMALS) + 0.0 for c0, c1 in cols]
             for r0, r1 in rows] for c in range(channels)]


def png_fingerprint(data: bytes) -> Dict[str, Any]:
    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = np.asarray(image)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    values = (pixels.astype(np.float64) / scale).reshape(pixels.shape[0], pixels.shape[1], -1)
    return {"fingerprint": "png", "mode": image.mode, "shape": list(values.shape), "cells": grid_cells(values)}


def map_fingerprint(values: np.ndarray) -> Dict[str, Any]:
    """A map ``(h, w)`` sent as numbers."""
    return {"fingerprint": "array", "shape": list(values.shape), "cells": grid_cells(values[:, :, None])}


def vector_fingerprint(values: Sequence[float]) -> Dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)

    def r(x: float) -> float:
        return round(float(x), VECTOR_DECIMALS) + 0.0

    return {"fingerprint": "vector", "length": int(v.size), "norm": r(np.linalg.norm(v)), "mean": r(v.mean()),
            "min": r(v.min()), "max": r(v.max()), "chunks": [r(c.mean()) for c in np.array_split(v, CHUNKS) if c.size]}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_shape(value: Any) -> Optional[List[int]]:
    """The shape of a rectangular nested list of numbers, else ``None``."""
    if not isinstance(value, list) or not value:
        return None
    if all(is_number(v) for v in value):
        return [len(value)]
    inner = [numeric_shape(v) for v in value]
    if inner[0] is None or any(s != inner[0] for s in inner):
        return None
    return [len(value)] + inner[0]


def numbers_fingerprint(values: Any, shape: Sequence[int], flat_rows: bool = False) -> Any:
    """Long numbers of this shape: a vector (1-D; with ``flat_rows``, each row of a flat v2 tensor
    ``[rows, D]``) as vector fingerprints; maps (2-D and more: the last two dimensions are a map) as
    array fingerprints, one per map."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(shape) == 1:
        return vector_fingerprint(flat)
    if len(shape) == 2 and flat_rows:
        return [vector_fingerprint(row) for row in flat.reshape(shape)]
    maps = [map_fingerprint(m) for m in flat.reshape(-1, shape[-2], shape[-1])]
    return maps[0] if len(shape) == 2 else maps


def v2_fingerprinted(tensor: Dict[str, Any]) -> bool:
    """A v2 tensor whose data becomes fingerprints: numbers, maps (``[…, h, w]``, 3-D and more) or
    long vectors (last dimension over LONG_LIST: embeddings); never a ranked or measured output."""
    data, shape = tensor["data"], tensor["shape"]
    names = {n for fields in RANKED_V2 for n in fields.values()} | MEASURED
    return (tensor["name"] not in names and isinstance(data, list) and all(is_number(v) for v in data)
            and isinstance(shape, list) and math.prod(shape) == len(data) > LONG_LIST
            and (len(shape) >= 3 or shape[-1] > LONG_LIST))


def long_string(value: str) -> Any:
    """A long string: a base64 PNG as its fingerprint, other base64 as its SHA-256, text verbatim
    (its SHA-256 past LONG_TEXT characters)."""
    if len(value) % 4 == 0 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", value):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            data = None
        if data is not None and data.startswith(b"\x89PNG\r\n\x1a\n"):
            return png_fingerprint(data)
        return sha256(value.encode())
    return value if len(value) <= LONG_TEXT else sha256(value.encode())


def is_v2_tensor(value: Any) -> bool:
    return isinstance(value, dict) and {"name", "datatype", "shape", "data"} <= set(value)


def canonical(value: Any) -> Any:
    """The answer without timings, maps and long number lists as fingerprints (module docstring)."""
    if isinstance(value, dict):
        if value.get("name") in TIMING_KEYS and "datatype" in value:  # a v2 output tensor of timings
            return None
        out = {}
        for key, item in value.items():
            if key in TIMING_KEYS:
                continue
            if key == "data" and is_v2_tensor(value) and v2_fingerprinted(value):
                out[key] = numbers_fingerprint(item, value["shape"], flat_rows=True)
                continue
            item = canonical(item)
            if item is not None or value[key] is None:
                out[key] = item
        return out
    if isinstance(value, list):
        shape = numeric_shape(value)
        if shape is not None and math.prod(shape) > LONG_LIST:
            return numbers_fingerprint(value, shape)
        items = [canonical(v) for v in value]
        return [v for v, raw in zip(items, value) if v is not None or raw is None]
    if isinstance(value, str) and value.startswith("{"):  # a JSON answer carried as text (v2 json_output)
        try:
            return {"json_text": canonical(json.loads(value))}
        except ValueError:
            pass
    if isinstance(value, str) and len(value) > LONG:
        return long_string(value)
    return value


def answer_form(response: requests.Response) -> Dict[str, Any]:
    try:
        body = canonical(response.json())
    except ValueError:
        body = sha256(response.content)
    return {"status": response.status_code, "body": body}


# -- the comparison -------------------------------------------------------------------------------


def close(expected: float, actual: float) -> bool:
    return abs(actual - expected) <= FLOAT_TOL * max(1.0, abs(expected))


def short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def differences(expected: Any, actual: Any, path: str, key: Optional[str] = None) -> List[str]:
    """Every difference between two canonical forms, as ``path: what``; ``key`` is the field (or v2
    output name) the values belong to, which decides whether a float is a measurement."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if "fingerprint" in expected or "fingerprint" in actual:
            return fingerprint_differences(expected, actual, path)
        out = []
        if list(expected) != list(actual):
            missing = [k for k in expected if k not in actual]
            extra = [k for k in actual if k not in expected]
            what = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}",
                                           not (missing or extra) and "reordered"]))
            out.append(f"{path}: keys {what}: expected {list(expected)}, got {list(actual)}")
        if is_outputs(expected.get("outputs")) and is_outputs(actual.get("outputs")):
            out += outputs_differences(expected["outputs"], actual["outputs"], f"{path}.outputs")
        for k in expected:
            if k in actual and not (k == "outputs" and is_outputs(expected[k]) and is_outputs(actual[k])):
                child = expected.get("name") if k == "data" and is_v2_tensor(expected) else k
                out += differences(expected[k], actual[k], f"{path}.{k}", child)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        score = ranked_score(expected) if ranked_score(expected) == ranked_score(actual) else None
        if score is not None:
            return ranked_differences(expected, actual, path, "index", score)
        if len(expected) != len(actual):
            return [f"{path}: {len(actual)} items, expected {len(expected)}: expected {short(expected)}, "
                    f"got {short(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]", key)]
    if key in MEASURED and is_number(expected) and is_number(actual):
        if close(expected, actual):
            return []
        return [f"{path}: {actual} differs from {expected} by {abs(actual - expected):.3g} "
                f"(tolerance {FLOAT_TOL * max(1.0, abs(expected)):.3g})"]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: expected {short(expected)}, got {short(actual)}"]
    return []


def fingerprint_differences(expected: Any, actual: Any, path: str) -> List[str]:
    if not (isinstance(expected, dict) and isinstance(actual, dict)) or \
            expected.get("fingerprint") != actual.get("fingerprint"):
        return [f"{path}: expected {short(expected, 80)}, got {short(actual, 80)}"]
    out = []
    for name in [k for k in expected if k not in ("cells", "chunks")] + [k for k in actual if k not in expected]:
        e, a = expected.get(name), actual.get(name)
        if expected["fingerprint"] == "vector" and name not in ("fingerprint", "length"):
            if not (is_number(e) and is_number(a) and close(e, a)):
                out.append(f"{path}: vector {name} {a} differs from {e} (tolerance {FLOAT_TOL:g} · max(1, |expected|))")
        elif e != a:
            out.append(f"{path}: {expected['fingerprint']} {name} expected {short(e)}, got {short(a)}")
    if out:
        return out
    if expected["fingerprint"] == "vector":
        e, a = np.asarray(expected["chunks"], float), np.asarray(actual["chunks"], float)
        if e.shape != a.shape:
            return [f"{path}: vector chunks {a.shape} expected {e.shape}"]
        bad = np.abs(a - e) > FLOAT_TOL * np.maximum(1.0, np.abs(e))
        if bad.any():
            i = int(np.argmax(np.abs(a - e)))
            out.append(f"{path}: vector differs: {int(bad.sum())} of {e.size} chunk means out of tolerance, worst "
                       f"chunk {i}: {a[i]} vs {e[i]} (tolerance {FLOAT_TOL:g} · max(1, |expected|))")
        return out
    e, a = np.asarray(expected["cells"], float), np.asarray(actual["cells"], float)
    if e.shape != a.shape:
        return [f"{path}: map grid {list(a.shape)} expected {list(e.shape)}"]
    delta = np.abs(a - e)
    if delta.max() > MAP_TOL:
        c, r, k = np.unravel_index(int(np.argmax(delta)), delta.shape)
        out.append(f"{path}: {expected['fingerprint']} map differs: {int((delta > MAP_TOL).sum())} of {delta.size} "
                   f"cell means off by more than {MAP_TOL}, worst {delta.max():.4f} at channel {c} cell (row {r}, "
                   f"col {k}): {a[c, r, k]} vs {e[c, r, k]}; mean |Δ| {delta.mean():.4f}")
    return out


def ranked_score(items: Any) -> Optional[str]:
    """``score`` or ``similarity`` when ``items`` is a ranked list (predictions, gallery matches)."""
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) and "index" in i for i in items):
        return None
    for score in ("score", "similarity"):
        if all(is_number(i.get(score)) for i in items):
            return score
    return None


def ranked_differences(expected: List[Dict[str, Any]], actual: List[Dict[str, Any]], path: str, key: str,
                       score: str) -> List[str]:
    """A top-k: the same entries in the same order, but for swaps within FLOAT_TOL (module docstring);
    each entry then compared with the expected entry of its class."""
    out = []
    if len(expected) != len(actual):
        out.append(f"{path}: top-{len(actual)}, expected top-{len(expected)}: expected "
                   f"{[e[key] for e in expected]}, got {[a[key] for a in actual]}")
    by_key = {e[key]: e for e in expected}
    last = expected[-1][score] if expected else 0.0
    for rank, a in enumerate(actual[:len(expected)]):
        e = expected[rank]
        if a[key] == e[key]:
            out += differences(e, a, f"{path}[{rank}]")
        elif a[key] in by_key:
            was = by_key[a[key]]
            if close(e[score], was[score]):
                out += differences(was, a, f"{path}[{rank}]")
            else:
                out.append(f"{path}[{rank}]: {key} {a[key]!r} ranked here (its expected {score} {was[score]}), "
                           f"expected {key} {e[key]!r} ({score} {e[score]}): a rank change beyond the tolerance")
        elif not close(last, a[score]):
            out.append(f"{path}[{rank}]: {key} {a[key]!r} ({score} {a[score]}) entered the top-k; the expected "
                       f"k-th {score} is {last}: beyond the tolerance")
    seen = {a[key] for a in actual}
    for e in expected:
        if e[key] not in seen and not close(last, e[score]):
            out.append(f"{path}: {key} {e[key]!r} ({score} {e[score]}) left the top-k; the expected k-th {score} is "
                       f"{last}: beyond the tolerance")
    return out


def is_outputs(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_v2_tensor(v) for v in value)


def v2_ranked_rows(tensors: Dict[str, Dict[str, Any]], fields: Dict[str, str]) -> Optional[List[List[Dict[str, Any]]]]:
    """The rows (one per image) of a ranked group of v2 tensors ``[images, k]``, as entries
    ``{field: value}``; ``None`` when the group is absent or not aligned."""
    present = {f: tensors[n] for f, n in fields.items() if n in tensors}
    score = next((f for f in ("score", "similarity") if f in present), None)
    if score is None or len({tuple(t["shape"]) for t in present.values()}) != 1:
        return None
    shape = next(iter(present.values()))["shape"]
    if len(shape) != 2:
        return None
    rows, k = shape
    if any(len(t["data"]) != rows * k for t in present.values()):
        return None
    return [[{f: t["data"][r * k + j] for f, t in present.items()} for j in range(k)] for r in range(rows)]


def outputs_differences(expected: List[Dict[str, Any]], actual: List[Dict[str, Any]], path: str) -> List[str]:
    """v2 output tensors: the same names in the same order, each tensor's fields exactly but its data
    (floats of measurements within FLOAT_TOL); ranked groups (RANKED_V2) row by row as top-k lists."""
    out = []
    names_e, names_a = [t["name"] for t in expected], [t["name"] for t in actual]
    if names_e != names_a:
        out.append(f"{path}: output names expected {names_e}, got {names_a}")
    by_e, by_a = {t["name"]: t for t in expected}, {t["name"]: t for t in actual}
    ranked = set()
    for fields in RANKED_V2:
        rows_e, rows_a = v2_ranked_rows(by_e, fields), v2_ranked_rows(by_a, fields)
        if rows_e is None or rows_a is None or len(rows_e) != len(rows_a):
            continue
        ident = "index" if fields["index"] in by_e and fields["index"] in by_a else "label"
        score = "score" if "score" in fields else "similarity"
        label = "/".join(n for n in fields.values() if n in by_e)
        for r, (row_e, row_a) in enumerate(zip(rows_e, rows_a)):
            out += ranked_differences(row_e, row_a, f"{path}[{label}][{r}]", ident, score)
        ranked |= {n for n in fields.values() if n in by_e}
    for name, e in by_e.items():
        if name not in by_a:
            continue
        a = by_a[name]
        if name in ranked:
            e = {k: v for k, v in e.items() if k != "data"}
            a = {k: v for k, v in a.items() if k != "data"}
        out += differences(e, a, f"{path}[{name}]")
    return out


def v2(inputs: List[Tuple[str, List[str]]], rid: str, **parameters) -> Dict[str, Any]:
    body: Dict[str, Any] = {"id": rid, "inputs": [{"name": name, "datatype": "BYTES", "shape": [len(data)],
                                                  "data": data} for name, data in inputs]}
    if parameters:
        body["parameters"] = parameters
    return body


def multipart(name: str, **fields: str) -> Dict[str, Any]:
    return {"files": {"data": photo(name), **{k: (None, v) for k, v in fields.items()}}}


def dump(value: Any, indent: int = 0) -> str:
    """JSON, one field per line, but lists of scalars (a grid row, a top-k's scores) and small flat
    objects (a prediction) on one line: readable diffs, a compact file."""
    def flat(v: Any) -> bool:
        return not isinstance(v, (dict, list))

    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        if all(flat(v) for v in value.values()) and len(json.dumps(value, ensure_ascii=False)) <= 100:
            return json.dumps(value, ensure_ascii=False)
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and value and not all(flat(v) for v in value):
        return "[\n" + ",\n".join(pad + dump(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


def torchserve_requests() -> List[Tuple[str, str, Dict[str, Any]]]:
    """(id, path, requests.post keyword arguments) for TorchServe."""
    p = f"/predictions/{CLS}"
    e = f"/predictions/{EMB}"
    bird, tench = b64(BIRD), b64(TENCH)
    return [
        # -- the bundled classifier: plain, each method, options, envelopes
        ("cls-plain-multipart", p, multipart(BIRD)),
        ("cls-plain-raw", p, {"data": photo(TENCH)}),
        ("cls-plain-topk2", p, multipart(SHARK, topk="2")),
        ("cls-cam", p, multipart(BIRD, explain="cam")),
        ("cls-gradcam", p, multipart(BIRD, explain="gradcam")),
        ("cls-gradcampp-overlay", p, multipart(TURTLE, explain="gradcampp", layer="_blocks.14", overlay="1")),
        ("cls-layercam-json-top2", p, {"json": {"data": tench, "explain": "layercam", "layer": "_blocks.10",
                                               "target": "top2"}}),
        ("cls-cam-headers", p, {"data": photo(TURTLE), "headers": {"X-Camserve-Explain": "cam",
                                                                  "X-Camserve-Target": "34"}}),
        ("cls-explanations-route", f"/explanations/{CLS}", {"data": photo(SHARK)}),
        ("cls-shallowcam-t2", p, multipart(BIRD, explain="shallowcam", layer="_blocks.2", temperature="2")),
        ("cls-shallowcam-start-target", p, multipart(BIRD, explain="shallowcam", start="target")),
        ("cls-shallowcam-array", p, multipart(SHARK, explain="shallowcam", layer="_blocks.4", format="array")),
        ("cls-relevancecam", p, multipart(TURTLE, explain="relevancecam")),
        ("cls-layercam-array", p, multipart(BIRD, explain="layercam", format="array")),
        ("cls-gradcam-jet", p, multipart(TENCH, explain="gradcam", colormap="jet", overlay="1", alpha="0.4")),
        ("cls-compare", p, multipart(BIRD, compare="gradcam,layercam,shallowcam")),
        ("cls-compare-layer", p, multipart(TENCH, compare="layercam,shallowcam", layer="_blocks.10")),
        ("cls-captum-ig", p, multipart(BIRD, explain="captum.integrated_gradients", steps="8",
                                       internal_batch_size="4")),
        ("cls-captum-compare", p, multipart(TURTLE, compare="shallowcam,captum.integrated_gradients", steps="8")),
        ("cls-v1-predict", f"/v1/models/{CLS}:predict", {"json": {"instances": [{"data": bird}, tench]}}),
        ("cls-v1-explain-array", f"/v1/models/{CLS}:explain",
         {"json": {"instances": [{"data": bird, "explain": "gradcampp"}], "parameters": {"format": "array"}}}),
        ("cls-v2-infer-gradcam", f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird, tench])], "g-1", explain="gradcam", target="top2")}),
        ("cls-v2-explain-array", f"/v2/models/{CLS}/explain",
         {"json": v2([("image", [tench])], "g-2", format="array", layer="_blocks.10")}),
        ("cls-v2-json-output", f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird])], "g-3", json_output=True, explain="cam")}),
        ("cls-v2-outputs-header", f"/v2/models/{CLS}/infer",
         {"json": {**v2([("image", [tench])], "g-4"), "outputs": [{"name": "labels"}, {"name": "scores"}]},
          "headers": {"X-Camserve-Topk": "3"}}),
        ("cls-v2-compare", f"/v2/models/{CLS}/infer", {"json": v2([("image", [bird])], "g-5", compare="cam,gradcam")}),
        # -- classifier errors: each a clear 4xx
        ("cls-err-method", p, multipart(BIRD, explain="nosuchcam")),
        ("cls-err-layer", p, multipart(BIRD, explain="gradcam", layer="no.such.layer")),
        ("cls-err-target", p, multipart(BIRD, explain="gradcam", target="5000")),
        ("cls-err-option", p, multipart(BIRD, explain="gradcam", flavour="mint")),
        ("cls-err-temperature", p, multipart(BIRD, explain="shallowcam", temperature="0")),
        ("cls-err-image", p, {"files": {"data": b"not an image at all"}}),
        ("cls-err-json", p, {"data": b"{\"data\": ", "headers": {"Content-Type": "application/json"}}),
        ("cls-err-captum", p, multipart(BIRD, explain="captum.no_such_method")),
        ("cls-err-compare-option", p, multipart(BIRD, compare="gradcam,cam", temperature="4")),
        ("cls-err-colormap", p, multipart(BIRD, explain="gradcam", colormap="rainbowish")),
        # -- the bundled embedding model: FAM, pairs, gallery
        ("emb-plain", e, {"data": photo(BIRD)}),
        ("emb-pair-multipart", e, {"files": {"image": photo(BIRD), "reference": photo(TURTLE)}}),
        ("emb-pair-json", e, {"json": {"image": bird, "reference": tench}}),
        ("emb-gallery", e, {"files": {"image": photo(TENCH), "gallery": (None, "3")}}),
        ("emb-gallery-json", e, {"json": {"image": tench, "gallery": True, "topk": 5, "embedding": False}}),
        ("emb-similarity-dot", e, {"files": {"image": photo(BIRD), "reference": photo(SHARK),
                                             "similarity": (None, "dot")}}),
        ("emb-v2-pair", f"/v2/models/{EMB}/infer", {"json": v2([("image", [bird]), ("reference", [tench])], "g-6")}),
        ("emb-v1-pair", f"/v1/models/{EMB}:predict", {"json": {"instances": [{"image": bird, "reference": tench}]}}),
        ("emb-err-ref-length", e, {"json": {"image": bird, "reference_embedding": [0.1, 0.2]}}),
        ("emb-err-gallery", e, {"files": {"image": photo(BIRD), "gallery": (None, "500")}}),
        ("emb-err-both", e, {"json": {"image": bird, "reference": tench, "reference_embedding": [1.0]}}),
        # -- bring-your-own archives
        ("byo-tv-plain", "/predictions/tv_resnet18", multipart(BIRD)),
        ("byo-tv-default", "/explanations/tv_resnet18", {"data": photo(BIRD)}),
        ("byo-tv-gradcam-stage", "/predictions/tv_resnet18", multipart(TENCH, explain="gradcam", layer="stage3")),
        ("byo-tv-err-layer", "/predictions/tv_resnet18", multipart(BIRD, explain="gradcam", layer="layer9")),
        ("byo-vit-gradcam", "/predictions/timm_vit", multipart(BIRD, explain="gradcam")),
        ("byo-vit-layercam", "/predictions/timm_vit", multipart(BIRD, explain="layercam")),
        ("byo-vit-err-shallowcam", "/predictions/timm_vit", multipart(BIRD, explain="shallowcam")),
        ("byo-cifar-plain", "/predictions/cifar_resnet20", multipart(TURTLE, topk="3")),
        ("byo-cifar-default", "/explanations/cifar_resnet20", {"data": photo(TURTLE)}),
        ("byo-cifar-compare", "/predictions/cifar_resnet20", multipart(TURTLE, compare="layercam,shallowcam")),
        ("byo-cifar-v1-explain", "/v1/models/cifar_resnet20:explain", {"json": {"instances": [{"data": bird}]}}),
        # (tv_resnet18_embed is left out: its archive has no weights, so each build draws new random ones)
        ("byo-proj-pair", "/predictions/tv_resnet18_proj", {"files": {"image": photo(BIRD),
                                                                        "reference": photo(TENCH)}}),
    ]


def kserve_requests() -> List[Tuple[str, str, str, Dict[str, Any]]]:
    """(id, server, path, requests.post keyword arguments) for camserve's KServe predictor."""
    bird, tench = b64(BIRD), b64(TENCH)
    return [
        ("ks-v1-predict", CLS, f"/v1/models/{CLS}:predict", {"json": {"instances": [{"data": bird}]}}),
        ("ks-v1-explain", CLS, f"/v1/models/{CLS}:explain", {"json": {"instances": [{"data": tench}]}}),
        ("ks-v1-gradcam-top2", CLS, f"/v1/models/{CLS}:predict",
         {"json": {"instances": [{"data": bird, "explain": "gradcam", "topk": 2}]}}),
        ("ks-v2-infer", CLS, f"/v2/models/{CLS}/infer",
         {"json": v2([("image", [bird, tench])], "k-1", explain="layercam", colormap="jet")}),
        ("ks-v2-explain", CLS, f"/v2/models/{CLS}/explain", {"json": v2([("image", [tench])], "k-2")}),
        ("ks-raw", CLS, f"/v1/models/{CLS}:predict", {"data": photo(SHARK), "headers": {"Content-Type": "image/jpeg"}}),
        ("ks-err-layer", CLS, f"/v1/models/{CLS}:predict",
         {"json": {"instances": [{"data": bird, "explain": "gradcam", "layer": "no.such.layer"}]}}),
        ("ks-err-model", CLS, "/v1/models/nope:predict", {"json": {"instances": [{"data": bird}]}}),
        ("ks-emb-pair", EMB, f"/v1/models/{EMB}:predict", {"json": {"instances": [{"image": bird, "reference": tench}]}}),
        ("ks-emb-v2-gallery", EMB, f"/v2/models/{EMB}/infer", {"json": v2([("image", [tench])], "k-3", gallery=3)}),
    ]


@pytest.fixture(scope="module")
def kserve_servers(tmp_path_factory):
    """camserve's KServe predictor for the two bundled archives, as built."""
    work = tmp_path_factory.mktemp("golden-kserve")
    from serverkit import KServe

    started = [KServe(name, ["--mar", str(REPO / "model_store" / f"{name}.mar")], work) for name in (CLS, EMB)]
    try:
        for server in started:
            server.wait_ready()
        yield {s.name: s for s in started}
    finally:
        for server in started:
            server.stop()


def test_golden_answers(torchserve_server, kserve_servers, tmp_path):
    answers: Dict[str, Any] = {}
    for rid, path, kwargs in torchserve_requests():
        kwargs = dict(kwargs)
        headers = {**torchserve_server.headers(), **kwargs.pop("headers", {})}
        response = requests.post(f"{torchserve_server.url}{path}", headers=headers, timeout=300, **kwargs)
        answers[rid] = {"door": "torchserve", "path": path, **answer_form(response)}
    for rid, name, path, kwargs in kserve_requests():
        response = kserve_servers[name].post(path, **kwargs)
        answers[rid] = {"door": "kserve", "path": path, **answer_form(response)}
    assert len(answers) >= 60
    answers = json.loads(json.dumps(answers))  # the forms as the file holds them (tuples → lists …)
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(dump(answers) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert list(expected) == list(answers), "the fixed request set changed: record it again on purpose"
    found = [d for rid in answers for d in differences(expected[rid], answers[rid], rid)]
    if found:
        actual = tmp_path / "answers.actual.json"
        actual.write_text(dump(answers) + "\n")
        changed = sorted({d.split(".", 1)[0].split(":", 1)[0] for d in found})
        shown = found[:200] + ([f"… and {len(found) - 200} more"] if len(found) > 200 else [])
        pytest.fail(f"{len(found)} difference(s) in {len(changed)} answer(s) {changed} (floats within "
                    f"{FLOAT_TOL:g} · max(1, |expected|), map cells within {MAP_TOL}); this run's answers: "
                    f"{actual}\n" + "\n".join(shown), pytrace=False)
