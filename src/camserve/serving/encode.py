"""Response encoding: predictions, heatmaps (PNG / compact arrays / colour overlays), envelopes.

All map work (upsampling, colouring, blending, ``uint8`` conversion) stays on the model's device;
only the final ``uint8`` images cross to the host inside :func:`camserve.engine.imaging.render.encode_png`.
Responses are serialised compactly here (TorchServe would ``json.dumps(indent=2)`` a dict). KServe v2
answers are named output tensors (:func:`v2_outputs`, Open Inference Protocol).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from camserve.engine.imaging.render import colorize, encode_png, overlay, upsample
from camserve.serving.protocol import KSERVE_V1, KSERVE_V2, PNG, V2_OUTPUT_NAMES


def b64png(image: torch.Tensor) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def top_predictions(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> List[Dict[str, Any]]:
    """Top-``k`` ``{index, label, score}`` of one image's softmax (like TorchServe's ImageClassifier)."""
    scores, indices = probabilities.topk(min(k, probabilities.shape[-1]))
    return [{"index": int(i), "label": labels[int(i)] if int(i) < len(labels) else str(int(i)),
             "score": round(float(s), 6)} for s, i in zip(scores.tolist(), indices.tolist())]


def heatmap_fields(maps: torch.Tensor, crop01: Optional[torch.Tensor], options, output_size, decimals: int) -> Dict[str, Any]:
    """Encode ``maps`` ``(k, h, w)`` (layer resolution, [0, 1]) as the request asked.

    ``format=png``: 8-bit grayscale PNG at ``output_size``; ``colormap`` adds an RGB rendering,
    ``overlay=1`` the colour map blended over the model-input crop (the request's ``colormap``, else
    ``options.default_colormap``: the archive's ``handler.colormap``). ``format=array``: the maps at
    layer resolution as nested lists rounded to ``decimals``. The first target's field has the
    singular name (``heatmap``); with several targets the plural one (``heatmaps``) holds them all.
    """
    fields: Dict[str, Any] = {}
    if options.format == "array":
        arrays = torch.round(maps.float() * 10 ** decimals) / 10 ** decimals
        values = arrays.cpu().tolist()
        fields["array"] = values[0]
        if len(values) > 1:
            fields["arrays"] = values
        fields["size"] = [int(maps.shape[-1]), int(maps.shape[-2])]
        return fields
    full = upsample(maps, tuple(output_size))
    fields["size"] = [int(full.shape[-1]), int(full.shape[-2])]
    _put(fields, "heatmap", [b64png(m) for m in full])
    if options.colormap:
        _put(fields, "heatmap_color", [b64png(c) for c in colorize(full, options.colormap)])
    if options.overlay and crop01 is not None:
        colormap = options.colormap or getattr(options, "default_colormap", None) or "jet"
        blended = overlay(full, crop01.expand(full.shape[0], -1, -1, -1), colormap, options.alpha)
        _put(fields, "overlay", [b64png(b) for b in blended])
    return fields


def _put(fields: Dict[str, Any], name: str, values: List[str]) -> None:
    fields[name] = values[0]
    if len(values) > 1:
        fields[name + "s"] = values


#: the largest answer a worker sends: ``config.properties``' ``max_response_size`` (32 MiB). A server
#: with another limit sets ``handler.max_response_bytes`` in the archive or ``CAMSERVE_MAX_RESPONSE_BYTES``
#: in TorchServe's environment (the workers inherit it) to the same number
MAX_RESPONSE_BYTES = 33_554_432


def answer_limit(settings: Any) -> int:
    """The answer size limit of a handler: ``handler.max_response_bytes``, else the
    ``CAMSERVE_MAX_RESPONSE_BYTES`` environment variable, else :data:`MAX_RESPONSE_BYTES`."""
    extra = getattr(settings, "extra", None) or {}
    value = (getattr(settings, "max_response_bytes", None) or extra.get("max_response_bytes")
             or os.environ.get("CAMSERVE_MAX_RESPONSE_BYTES") or MAX_RESPONSE_BYTES)
    return int(value)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def envelope_body(envelope: str, results: List[Dict[str, Any]], explain_route: bool, model_name: str,
                  request_id: Optional[str] = None, json_output: bool = False,
                  outputs: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Wrap per-image results: plain → the single result; KServe v1 → ``{"predictions"|"explanations": […]}``;
    KServe v2 → ``{"model_name", "id", "outputs": [<named tensors>]}`` (:func:`v2_outputs`), or with
    ``json_output`` the JSON-in-BYTES form ``{"outputs": [{"name": "predictions"|"explanations",
    "datatype": "BYTES", "shape": [n], "data": [<each image's JSON answer as text>]}]}``."""
    if envelope == KSERVE_V1:
        return {"explanations" if explain_route else "predictions": results}
    if envelope == KSERVE_V2:
        if json_output:
            tensors = [{"name": "explanations" if explain_route else "predictions", "datatype": "BYTES",
                        "shape": [len(results)], "data": [dumps(r) for r in results],
                        "parameters": {"content_type": "application/json"}}]
        else:
            tensors = v2_outputs(results, outputs)
        body = {"model_name": model_name, "outputs": tensors}
        if request_id is not None:
            body["id"] = str(request_id)
        return body
    return results[0]


# -- KServe v2 (Open Inference Protocol) named output tensors ----------------------------------


@dataclass
class Tensor:
    """One OIP output tensor before stacking: datatype, shape, row-major flat data, parameters."""

    datatype: str
    shape: List[int]
    data: List[Any]
    parameters: Dict[str, Any] = field(default_factory=dict)

    def key(self):
        return self.datatype, tuple(self.shape), tuple(sorted(self.parameters.items()))


def _nested_shape(values: Any) -> List[int]:
    shape = []
    while isinstance(values, list):
        shape.append(len(values))
        values = values[0] if values else None
    return shape


def _flat(values: Any) -> List[Any]:
    if not isinstance(values, list):
        return [values]
    return [x for v in values for x in _flat(v)]


def _tensor(value: Any, datatype: Optional[str] = None, parameters: Optional[Dict[str, Any]] = None) -> Tensor:
    """A JSON value → a tensor: scalars have shape ``[]``, (nested) lists their own shape."""
    shape, flat = _nested_shape(value), _flat(value)
    size = 1
    for dim in shape:
        size *= dim
    if size != len(flat):  # ragged lists are no tensor: the value as JSON text
        return Tensor("BYTES", [], [dumps(value)], {"content_type": "application/json"})
    if datatype is None:
        if flat and all(isinstance(v, bool) for v in flat):
            datatype = "BOOL"
        elif flat and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            datatype = "INT64" if all(isinstance(v, int) for v in flat) else "FP32"
        else:
            datatype = "BYTES"
    if datatype == "FP32":
        flat = [float(v) for v in flat]
    elif datatype == "INT64":
        flat = [int(v) for v in flat]
    elif datatype == "BYTES":
        flat = [v if isinstance(v, str) else dumps(v) for v in flat]
    return Tensor(datatype, shape, flat, dict(parameters or {}))


def _several(mapping: Dict[str, Any], name: str) -> Optional[List[Any]]:
    """The plural list (``heatmaps``) when there is one, else the singular value as a list of one."""
    if mapping.get(name + "s") is not None:
        return list(mapping[name + "s"])
    return None if mapping.get(name) is None else [mapping[name]]


def explanation_tensors(e: Dict[str, Any]) -> Dict[str, Tensor]:
    """One classifier explanation (its JSON form) as tensors; maps have a leading target dimension."""
    out: Dict[str, Tensor] = {}
    for name in ("method", "layer", "colormap"):
        if e.get(name) is not None:
            out[name] = _tensor(str(e[name]), "BYTES")
    if e.get("targets") is not None:
        out["targets"] = _tensor(list(e["targets"]), "INT64")
    if e.get("labels") is not None:
        out["target_labels"] = _tensor(list(e["labels"]), "BYTES")
    if e.get("layer_shape") is not None:
        out["layer_shape"] = _tensor(list(e["layer_shape"]), "INT64")
    arrays = _several(e, "array")
    if arrays is not None:
        out["heatmap_array"] = _tensor(arrays, "FP32")
    for name in ("heatmap", "heatmap_color", "overlay"):
        pngs = _several(e, name)
        if pngs is not None:
            out[name] = _tensor(pngs, "BYTES", PNG)
    if e.get("size") is not None:
        out["size"] = _tensor(list(e["size"]), "INT64")
    if e.get("crop_box") is not None:
        out["crop_box"] = _tensor(list(e["crop_box"]), "FP32")
    if e.get("image_size") is not None:
        out["image_size"] = _tensor(list(e["image_size"]), "INT64")
    if e.get("options"):
        out["options"] = _tensor(dumps(e["options"]), "BYTES", {"content_type": "application/json"})
    for key, count in (e.get("passes") or {}).items():
        out[f"passes_{key}"] = _tensor(int(count), "INT64")
    if e.get("seconds") is not None:
        out["seconds"] = _tensor(float(e["seconds"]), "FP32")
    _other_keys(e, EXPLANATION_KEYS, out)
    return out


#: keys of an explanation's JSON form that :func:`explanation_tensors` encodes (or drops: ``target`` is
#: ``targets[0]``, ``format`` is implied by ``heatmap`` vs ``heatmap_array``, ``batch_size`` is the image's)
EXPLANATION_KEYS = {"method", "layer", "colormap", "target", "targets", "labels", "layer_shape", "array", "arrays",
                    "heatmap", "heatmaps", "heatmap_color", "heatmap_colors", "overlay", "overlays", "size",
                    "crop_box", "image_size", "options", "passes", "seconds", "format", "batch_size"}
#: keys of an image's JSON answer that :func:`image_tensors` encodes
IMAGE_KEYS = {"predictions", "embedding", "dim", "batch_size", "similarity", "metric", "route", "reference",
              "explanation", "explanations", "comparison", "method", "query_map", "reference_map", "overlay",
              "size", "passes", "seconds", "matches", "crop_box"}


def _other_keys(mapping: Dict[str, Any], known: set, out: Dict[str, Tensor]) -> None:
    """Keys added to the JSON answers later keep their name: numbers, strings and lists of them as
    tensors of their own type (``batch_seconds`` → FP32), anything else as JSON text (BYTES)."""
    for key, value in mapping.items():
        if key in known or key in out or value is None:
            continue
        flat = _flat(value)
        if isinstance(value, dict) or not all(isinstance(v, (bool, int, float, str)) for v in flat):
            out[key] = _tensor(dumps(value), "BYTES", {"content_type": "application/json"})
        else:
            out[key] = _tensor(value)


def image_tensors(result: Dict[str, Any]) -> Dict[str, Tensor]:
    """One image's answer (classifier or embedding JSON form) as named tensors (no batch dimension)."""
    out: Dict[str, Tensor] = {}
    predictions = result.get("predictions")
    if predictions is not None:
        out["scores"] = _tensor([p["score"] for p in predictions], "FP32")
        out["indices"] = _tensor([p["index"] for p in predictions], "INT64")
        out["labels"] = _tensor([p["label"] for p in predictions], "BYTES")
    if result.get("embedding") is not None:
        out["embedding"] = _tensor(list(result["embedding"]), "FP32")
    for name, datatype in (("dim", "INT64"), ("batch_size", "INT64"), ("similarity", "FP32"), ("metric", "BYTES"),
                           ("route", "BYTES"), ("reference", "BYTES")):
        if result.get(name) is not None:
            out[name] = _tensor(result[name], datatype)
    if result.get("explanation") is not None:
        out.update(explanation_tensors(result["explanation"]))
    if result.get("explanations") is not None:  # compare: one explanation per method, stacked
        stacked = stack([explanation_tensors(e) for e in result["explanations"]])
        for name in ("crop_box", "image_size"):  # the same for every method: one per image
            if name in stacked:
                first = stacked.pop(name)
                width = len(first.data) // first.shape[0]
                stacked[name] = Tensor(first.datatype, first.shape[1:], first.data[:width], first.parameters)
        out.update(stacked)
        comparison = result.get("comparison") or {}
        if comparison.get("spearman") is not None:
            out["spearman"] = _tensor(comparison["spearman"], "FP32")
        if comparison.get("target") is not None:
            out["comparison_target"] = _tensor(int(comparison["target"]), "INT64")
        if comparison.get("seconds") is not None:
            out["comparison_seconds"] = _tensor(list(comparison["seconds"]), "FP32")
    if "query_map" in result:  # embedding model: FAM pair
        out["method"] = _tensor(str(result.get("method")), "BYTES")
        for name in ("query_map", "reference_map", "overlay"):
            if result.get(name) is not None:
                out[name] = _tensor(result[name], "BYTES", PNG)
        if result.get("size") is not None:
            out["size"] = _tensor(list(result["size"]), "INT64")
        for key, count in (result.get("passes") or {}).items():
            out[f"passes_{key}"] = _tensor(int(count), "INT64")
        if result.get("seconds") is not None:
            out["seconds"] = _tensor(float(result["seconds"]), "FP32")
    if result.get("matches") is not None:
        matches = result["matches"]
        out["match_index"] = _tensor([int(m["index"]) for m in matches], "INT64")
        out["match_label"] = _tensor([str(m["label"]) for m in matches], "BYTES")
        out["match_similarity"] = _tensor([float(m["similarity"]) for m in matches], "FP32")
        out["match_query_map"] = _tensor([m["query_map"] for m in matches], "BYTES", PNG)
        if all(m.get("reference_map") is not None for m in matches):
            out["match_reference_map"] = _tensor([m["reference_map"] for m in matches], "BYTES", PNG)
    if result.get("crop_box") is not None and "crop_box" not in out:
        out["crop_box"] = _tensor(list(result["crop_box"]), "FP32")
    _other_keys(result, IMAGE_KEYS, out)
    return out


def stack(items: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Stack per-item tensors along a new leading dimension (``[n, …]``) when every item has the
    output with the same datatype and shape; otherwise each item that has it gets its own output
    ``<name>.<i>`` of shape ``[1, …]`` (parameter ``index``: the item's position)."""
    names: List[str] = list(dict.fromkeys(name for item in items for name in item))
    out: Dict[str, Tensor] = {}
    for name in names:
        tensors = [item.get(name) for item in items]
        if all(t is not None for t in tensors) and len({t.key() for t in tensors}) == 1:
            first = tensors[0]
            out[name] = Tensor(first.datatype, [len(tensors)] + first.shape,
                               [x for t in tensors for x in t.data], dict(first.parameters))
            continue
        for position, t in enumerate(tensors):
            if t is not None:
                out[f"{name}.{position}"] = Tensor(t.datatype, [1] + t.shape, t.data,
                                                   {**t.parameters, "index": position})
    return out


def v2_outputs(results: List[Dict[str, Any]], requested: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The request's images' answers as OIP output tensors ``{"name", "datatype", "shape", "data"[,
    "parameters"]}``, data flattened in row-major order, the first dimension the request's images;
    ``requested`` (the request's ``outputs`` names) keeps only those (``name`` also keeps ``name.<i>``)."""
    tensors = stack([image_tensors(r) for r in results])
    wanted = None if requested is None else set(requested)
    answer = []
    for name, t in tensors.items():
        if wanted is not None and name not in wanted and name.split(".")[0] not in wanted:
            continue
        entry = {"name": name, "datatype": t.datatype, "shape": t.shape, "data": t.data}
        if t.parameters:
            entry["parameters"] = t.parameters
        answer.append(entry)
    return answer
