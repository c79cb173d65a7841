"""One TorchServe request → a :class:`ParsedRequest`: its images (payloads) and its options.

What TorchServe 0.12 hands a handler, per request of the batch, is a dict ``name → value``:

- the body as ``"body"`` (``bytes``; a ``dict``/``list`` when the content type is
  ``application/json`` and it parsed; the raw ``bytes`` when it did not — we report invalid JSON);
- each multipart form field under its own name (``bytes``, or ``str`` for ``text/*`` parts);
- each query parameter under its own name (``bytes``) — but **only** on the routes whose frontend
  code passes the query decoder: ``/{model}/predict?…`` and ``/invocations?model_name=…&…``.
  TorchServe 0.12 drops the query string of ``/predictions/{m}``, ``/explanations/{m}``,
  ``/v1/models/{m}:…`` and ``/v2/models/{m}/…`` (``InferenceRequestHandler.predict(…, null, …)``);
  there, options travel as multipart/JSON fields or as ``X-Camserve-<Option>`` headers.

Request headers are separate (``context.get_request_header(i, name)``): TorchServe sets
``explain: True`` on ``/explanations/{m}``, ``/v1/models/{m}:explain`` and ``/v2/models/{m}/explain``.

Envelopes are recognised by the JSON body's shape, per request (TorchServe's own ``service_envelope``
would apply to all models and reads only the first request of a batch):

- KServe v1: ``{"instances": [<base64> | {"data"|"b64"|"image": <base64>, <options>…}], "parameters": {…}}``
- KServe v2: ``{"id": …, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": [<base64>…]}],
  "parameters": {…}}`` (an input named ``reference`` pairs references with the images by position).
- otherwise plain: raw image bytes, multipart fields, or a JSON object ``{"data"|"image": <base64>, <options>…}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import InvalidJSONError, InvalidRequestOptionError, MissingInputError

#: field name → role. ``image`` is the query image; the embedding handler adds reference roles.
IMAGE_FIELDS = {"body": "image", "data": "image", "image": "image", "file": "image", "b64": "image"}
EMBED_FIELDS = {**IMAGE_FIELDS, "reference": "reference", "reference_embedding": "reference_embedding"}

PLAIN, KSERVE_V1, KSERVE_V2 = "torchserve", "kserve_v1", "kserve_v2"


@dataclass
class Item:
    """One image to run: its payloads by role (bytes, base64 text or floats) and its raw options."""

    payloads: Dict[str, Any]
    options: Dict[str, Any]


@dataclass
class ParsedRequest:
    envelope: str
    items: List[Item]
    explain_route: bool = False
    request_id: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def is_json_part(headers: Any) -> bool:
    """Whether a per-parameter header dict says ``application/json``."""
    return isinstance(headers, dict) and "json" in str(headers.get("content-type", "")).lower()


def parse_request(row: Mapping[str, Any], fields: Mapping[str, str] = IMAGE_FIELDS,
                  json_parts: Sequence[str] = (), max_instances: int = 16,
                  explain_route: bool = False, header_options: Optional[Mapping[str, Any]] = None) -> ParsedRequest:
    """Split a request into payloads (by role) and options; recognise KServe envelopes.

    ``json_parts`` names the parameters whose content type was ``application/json`` (a ``bytes``
    value there means TorchServe failed to parse it → :class:`InvalidJSONError`).
    """
    payloads: Dict[str, Any] = {}
    options: Dict[str, Any] = dict(header_options or {})
    body_json: Optional[dict] = None
    for name, value in row.items():
        key = str(name).lower()
        if key in json_parts and isinstance(value, (bytes, bytearray)):
            raise InvalidJSONError(f"{name}: invalid JSON body ({_json_error(value)})")
        if isinstance(value, (dict, list)):
            if key not in ("body", "data") and key not in fields:
                options[key] = value
                continue
            if isinstance(value, list):
                raise InvalidJSONError(f"{name}: a JSON body must be an object, got a list")
            if body_json is not None:
                raise InvalidJSONError("two JSON bodies in one request")
            body_json = value
        elif key in fields:
            payloads[fields[key]] = value
        else:
            options[key] = value
    if body_json is not None:
        if "instances" in body_json:
            return _kserve_v1(body_json, options, fields, max_instances, explain_route)
        if "inputs" in body_json:
            return _kserve_v2(body_json, options, fields, max_instances, explain_route)
        for key, value in body_json.items():
            k = str(key).lower()
            if k in fields:
                payloads[fields[k]] = value
            else:
                options[k] = value
    if "image" not in payloads:
        raise MissingInputError("no image in the request: send image bytes as the body, a multipart field "
                                "'data'/'image', or JSON {\"data\": <base64>}")
    return ParsedRequest(PLAIN, [Item(payloads, options)], explain_route)


def _json_error(value: bytes) -> str:
    try:
        json.loads(bytes(value).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return str(error)
    return "unparsable"


def _options_from(mapping: Any, where: str) -> Dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise InvalidRequestOptionError(f"{where} must be an object")
    return {str(k).lower(): v for k, v in mapping.items()}


def _instance_item(instance: Any, base: Dict[str, Any], fields: Mapping[str, str], where: str) -> Item:
    if isinstance(instance, str):
        return Item({"image": instance}, dict(base))
    if not isinstance(instance, dict):
        raise MissingInputError(f"{where}: an instance must be a base64 string or an object")
    payloads, options = {}, dict(base)
    for key, value in instance.items():
        k = str(key).lower()
        if k in fields:
            if isinstance(value, dict) and "b64" in value:
                value = value["b64"]
            payloads[fields[k]] = value
        else:
            options[k] = value
    if "image" not in payloads:
        raise MissingInputError(f"{where}: no image (use a base64 string or {{\"data\": <base64>}})")
    return Item(payloads, options)


def _kserve_v1(body: dict, query: Dict[str, Any], fields, max_instances, explain_route) -> ParsedRequest:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise MissingInputError("KServe v1: 'instances' must be a non-empty list")
    if len(instances) > max_instances:
        raise InvalidRequestOptionError(f"KServe v1: at most {max_instances} instances per request, got {len(instances)}")
    base = {**query, **_options_from(body.get("parameters"), "parameters")}
    items = [_instance_item(inst, base, fields, f"instances[{i}]") for i, inst in enumerate(instances)]
    return ParsedRequest(KSERVE_V1, items, explain_route)


def _kserve_v2(body: dict, query: Dict[str, Any], fields, max_instances, explain_route) -> ParsedRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MissingInputError("KServe v2: 'inputs' must be a non-empty list")
    base = {**query, **_options_from(body.get("parameters"), "parameters")}
    images: List[Item] = []
    references: List[Any] = []
    for n, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("data"), list):
            raise MissingInputError(f"KServe v2: inputs[{n}] needs a 'data' list")
        if str(tensor.get("datatype", "BYTES")).upper() != "BYTES":
            raise InvalidRequestOptionError(f"KServe v2: inputs[{n}] must have datatype BYTES (base64 images)")
        role = fields.get(str(tensor.get("name", "image")).lower(), "image")
        local = {**base, **_options_from(tensor.get("parameters"), f"inputs[{n}].parameters")}
        for element in tensor["data"]:
            if role == "image":
                images.append(_instance_item(element, local, fields, f"inputs[{n}]"))
            else:
                references.append(element)
    if not images:
        raise MissingInputError("KServe v2: no image input")
    if len(images) > max_instances:
        raise InvalidRequestOptionError(f"KServe v2: at most {max_instances} images per request, got {len(images)}")
    if references:
        if len(references) != len(images):
            raise MissingInputError(f"KServe v2: {len(references)} references for {len(images)} images")
        for item, reference in zip(images, references):
            item.payloads["reference"] = reference
    return ParsedRequest(KSERVE_V2, images, explain_route, request_id=body.get("id"))
