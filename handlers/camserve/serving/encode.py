"""Response encoding: predictions, heatmaps (PNG / compact arrays / colour overlays), envelopes.

All map work (upsampling, colouring, blending, ``uint8`` conversion) stays on the model's device;
only the final ``uint8`` images cross to the host inside :func:`camserve.engine.render.encode_png`.
Responses are serialised compactly here (TorchServe would ``json.dumps(indent=2)`` a dict).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..engine.render import colorize, encode_png, overlay, upsample
from .requests import KSERVE_V1, KSERVE_V2


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
    ``overlay=1`` the colour map blended over the model-input crop. ``format=array``: the maps at
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
        blended = overlay(full, crop01.expand(full.shape[0], -1, -1, -1), options.colormap or "jet", options.alpha)
        _put(fields, "overlay", [b64png(b) for b in blended])
    return fields


def _put(fields: Dict[str, Any], name: str, values: List[str]) -> None:
    fields[name] = values[0]
    if len(values) > 1:
        fields[name + "s"] = values


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def envelope_body(envelope: str, results: List[Dict[str, Any]], explain_route: bool, model_name: str,
                  request_id: Optional[str] = None) -> Dict[str, Any]:
    """Wrap per-image results: plain → the single result; KServe v1 → ``{"predictions"|"explanations": […]}``;
    KServe v2 → ``{"model_name", "id", "outputs": [{"name", "datatype": "BYTES", "shape", "data": [JSON text…]}]}``."""
    if envelope == KSERVE_V1:
        return {"explanations" if explain_route else "predictions": results}
    if envelope == KSERVE_V2:
        body = {"model_name": model_name, "outputs": [{
            "name": "explanations" if explain_route else "predictions", "datatype": "BYTES",
            "shape": [len(results)], "data": [dumps(r) for r in results]}]}
        if request_id is not None:
            body["id"] = str(request_id)
        return body
    return results[0]
