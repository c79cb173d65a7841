"""Response encoding: envelopes, compact JSON, PNG text and the KServe v2 tensor machinery.

The answers themselves are typed (:mod:`camserve.serving.answer`): each image's answer writes its own
JSON (``to_json``) and v2 tensors (``to_v2_tensors``); this module wraps a request's answers in its
envelope (:func:`envelope_body`) and stacks their tensors (:func:`v2_outputs`). All map work
(upsampling, colouring, blending, ``uint8`` conversion) stays on the model's device; only the final
``uint8`` images cross to the host inside :func:`camserve.engine.imaging.render.encode_png`. Responses
are serialised compactly here (TorchServe would ``json.dumps(indent=2)`` a dict).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from camserve.engine.imaging.render import encode_png
from camserve.serving.protocol import KSERVE_V1, KSERVE_V2


def b64png(image: torch.Tensor) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


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


def envelope_body(envelope: str, results: Sequence[Any], explain_route: bool, model_name: str,
                  request_id: Optional[str] = None, json_output: bool = False,
                  outputs: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Wrap a request's per-image answers (:mod:`camserve.serving.answer`: each has ``to_json`` and
    ``to_v2_tensors``): plain → the single answer's JSON; KServe v1 → ``{"predictions"|"explanations":
    […]}``; KServe v2 → ``{"model_name", "id", "outputs": [<named tensors>]}`` (:func:`v2_outputs`), or
    with ``json_output`` the JSON-in-BYTES form ``{"outputs": [{"name": "predictions"|"explanations",
    "datatype": "BYTES", "shape": [n], "data": [<each image's JSON answer as text>]}]}``."""
    if envelope == KSERVE_V1:
        return {"explanations" if explain_route else "predictions": [r.to_json() for r in results]}
    if envelope == KSERVE_V2:
        if json_output:
            tensors = [{"name": "explanations" if explain_route else "predictions", "datatype": "BYTES",
                        "shape": [len(results)], "data": [dumps(r.to_json()) for r in results],
                        "parameters": {"content_type": "application/json"}}]
        else:
            tensors = v2_outputs(results, outputs)
        body = {"model_name": model_name, "outputs": tensors}
        if request_id is not None:
            body["id"] = str(request_id)
        return body
    return results[0].to_json()


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


def flat(values: Any) -> List[Any]:
    """A (nested) list's values in row-major order; a scalar as a list of one."""
    if not isinstance(values, list):
        return [values]
    return [x for v in values for x in flat(v)]


def tensor(value: Any, datatype: Optional[str] = None, parameters: Optional[Dict[str, Any]] = None) -> Tensor:
    """A JSON value → a tensor: scalars have shape ``[]``, (nested) lists their own shape."""
    shape, values = _nested_shape(value), flat(value)
    size = 1
    for dim in shape:
        size *= dim
    if size != len(values):  # ragged lists are no tensor: the value as JSON text
        return Tensor("BYTES", [], [dumps(value)], {"content_type": "application/json"})
    if datatype is None:
        if values and all(isinstance(v, bool) for v in values):
            datatype = "BOOL"
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            datatype = "INT64" if all(isinstance(v, int) for v in values) else "FP32"
        else:
            datatype = "BYTES"
    if datatype == "FP32":
        values = [float(v) for v in values]
    elif datatype == "INT64":
        values = [int(v) for v in values]
    elif datatype == "BYTES":
        values = [v if isinstance(v, str) else dumps(v) for v in values]
    return Tensor(datatype, shape, values, dict(parameters or {}))


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


def v2_outputs(results: Sequence[Any], requested: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The request's images' answers (each its ``to_v2_tensors()``) as OIP output tensors ``{"name", "datatype", "shape", "data"[,
    "parameters"]}``, data flattened in row-major order, the first dimension the request's images;
    ``requested`` (the request's ``outputs`` names) keeps only those (``name`` also keeps ``name.<i>``)."""
    tensors = stack([r.to_v2_tensors() for r in results])
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
