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

JSON bounds: every JSON value is checked for depth (:data:`MAX_JSON_DEPTH` levels) and size
(:data:`MAX_JSON_VALUES` values) *before* anything reads it, without recursion: a body TorchServe's
worker could not parse (its parser stops at Python's recursion limit and forwards the raw bytes) is
scanned for its nesting depth before it is parsed again, and an already-parsed value is walked
iteratively. Beyond a bound → 400 :class:`InvalidJSONError` naming it.

Envelopes are recognised by the JSON body's shape, per request (TorchServe's own ``service_envelope``
would apply to all models and reads only the first request of a batch):

- KServe v1: ``{"instances": [<base64> | {"data"|"b64"|"image": <base64>, <options>…}], "parameters": {…}}``
- KServe v2 (Open Inference Protocol): ``{"id": …, "inputs": [{"name": "image", "datatype": "BYTES",
  "shape": [n], "data": [<base64>…]}], "parameters": {…}, "outputs": [{"name": …}]}``; on the
  embedding model an input named ``reference`` (BYTES) pairs reference images with the images by
  position and one named ``reference_embedding`` (``FP32``/``FP64``, shape ``[D]``, ``[1, D]`` or
  ``[n, D]``) gives each image its reference embedding (one row: the same for every image).
  ``parameters.json_output`` (or ``X-Camserve-Json-Output``) asks for the old answer form (each
  image's JSON answer as text in one BYTES output); ``outputs`` names the output tensors to return.
- otherwise plain: raw image bytes, multipart fields, or a JSON object ``{"data"|"image": <base64>, <options>…}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from camserve.engine.core.values import parse_flag
from camserve.serving.errors import InvalidJSONError, InvalidRequestOptionError, MissingInputError
from camserve.serving.protocol import (EMBED_FIELDS, ENVELOPE_OPTIONS, FLOAT_DATATYPES, IMAGE_FIELDS, KSERVE_V1,
                                       KSERVE_V2, PLAIN, V2_OUTPUT_NAMES)

#: deepest JSON nesting a request may have (a KServe v2 body needs 4; nested tensor data a few more)
MAX_JSON_DEPTH = 32
#: most JSON values (objects, arrays, strings, numbers, …) in one request
MAX_JSON_VALUES = 262_144


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
    #: KServe v2: ``json_output`` (bool) and ``outputs`` (requested output names or None)
    meta: Dict[str, Any] = field(default_factory=dict)


def is_json_part(headers: Any) -> bool:
    """Whether a per-parameter header dict says ``application/json``."""
    return isinstance(headers, dict) and "json" in str(headers.get("content-type", "")).lower()


# -- JSON bounds ------------------------------------------------------------------------------
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(text: str) -> int:
    """Nesting depth of JSON ``text`` (``[[1]]`` → 2) from its brackets outside strings, without parsing."""
    stripped = _STRING.sub('""', text).encode("utf-8", errors="replace")
    codes = np.frombuffer(stripped, np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max()) if steps.size else 0


def load_json(raw: Any, where: str = "body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes/text with the depth bound checked first; → :class:`InvalidJSONError`."""
    try:
        text = bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError as error:
        raise InvalidJSONError(f"{where}: invalid JSON body (not UTF-8: {error})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise InvalidJSONError(f"{where}: JSON nested {depth} levels deep; at most {max_depth} levels are accepted")
    try:
        value = json.loads(text)
    except RecursionError:  # cannot happen under the depth bound; kept as a 400, never a 500
        raise InvalidJSONError(f"{where}: JSON nested too deeply; at most {max_depth} levels are accepted") from None
    except ValueError as error:
        raise InvalidJSONError(f"{where}: invalid JSON body ({error})") from None
    check_json(value, where, max_depth)
    return value


def check_json(value: Any, where: str = "body", max_depth: int = MAX_JSON_DEPTH,
               max_values: int = MAX_JSON_VALUES) -> None:
    """Walk an already-parsed JSON value iteratively; deeper than ``max_depth`` or more than
    ``max_values`` values → :class:`InvalidJSONError`."""
    stack = [(value, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values:
            raise InvalidJSONError(f"{where}: JSON has more than {max_values} values; split the request")
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise InvalidJSONError(f"{where}: JSON nested more than {max_depth} levels deep; "
                                       f"at most {max_depth} levels are accepted")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


# -- requests ---------------------------------------------------------------------------------
def parse_request(row: Mapping[str, Any], fields: Mapping[str, str] = IMAGE_FIELDS,
                  json_parts: Sequence[str] = (), max_instances: int = 16,
                  explain_route: bool = False, header_options: Optional[Mapping[str, Any]] = None) -> ParsedRequest:
    """Split a request into payloads (by role) and options; recognise KServe envelopes.

    ``json_parts`` names the parameters whose content type was ``application/json``: a ``bytes``
    value there (TorchServe could not parse it, or its decoding is off) is parsed here under the
    JSON bounds; invalid → :class:`InvalidJSONError`.
    """
    payloads: Dict[str, Any] = {}
    options: Dict[str, Any] = {str(k).lower(): v for k, v in (header_options or {}).items()}
    body_json: Optional[dict] = None
    for name, value in row.items():
        key = str(name).lower()
        if key in json_parts and isinstance(value, (bytes, bytearray)):
            value = load_json(value, str(name))
        if isinstance(value, (dict, list)):
            check_json(value, str(name))
            if key not in ("body", "data") and key not in fields:
                options[key] = value
                continue
            if isinstance(value, list):
                raise InvalidJSONError(f"{name}: a JSON body must be an object, got a list")
            if body_json is not None:
                raise InvalidJSONError("two JSON bodies in one request")
            body_json = value
        elif key in fields:
            _put_payload(payloads, fields[key], value, name)
        else:
            options[key] = value
    if body_json is not None:
        if "instances" in body_json:
            parsed = _kserve_v1(body_json, options, fields, max_instances, explain_route)
            return _no_envelope_options(parsed)
        if "inputs" in body_json:
            return _kserve_v2(body_json, options, fields, max_instances, explain_route)
        for key, value in body_json.items():
            k = str(key).lower()
            if k in fields:
                _put_payload(payloads, fields[k], value, key)
            else:
                options[k] = value
    if "image" not in payloads:
        raise MissingInputError("no image in the request: send image bytes as the body, a multipart field "
                                "'data'/'image', or JSON {\"data\": <base64>}")
    return _no_envelope_options(ParsedRequest(PLAIN, [Item(payloads, options)], explain_route))


def _put_payload(payloads: Dict[str, Any], role: str, value: Any, name: Any) -> None:
    """One payload per role: a second field with the same role (``data`` and ``image``) is a 400."""
    if role in payloads:
        raise MissingInputError(f"two {role} fields in one request ({name!r} is the second): send one "
                                f"{role} per request, or several images in a KServe envelope")
    payloads[role] = value


def _no_envelope_options(parsed: ParsedRequest) -> ParsedRequest:
    for item in parsed.items:
        for name in ENVELOPE_OPTIONS:
            if name in item.options:
                raise InvalidRequestOptionError(f"option {name!r} applies to KServe v2 answers only "
                                                f"(/v2/models/<model>/infer|explain)")
    return parsed


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
        raise MissingInputError(f"{where}: an instance must be a base64 string or an object, "
                                f"got {type(instance).__name__}")
    payloads, options = {}, dict(base)
    for key, value in instance.items():
        k = str(key).lower()
        if k in fields:
            if isinstance(value, dict) and "b64" in value:
                value = value["b64"]
            _put_payload(payloads, fields[k], value, f"{where}.{key}")
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


def _shape(tensor: dict, where: str) -> Optional[List[int]]:
    shape = tensor.get("shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidRequestOptionError(f"KServe v2: {where}.shape must be a list of non-negative integers, "
                                        f"got {shape!r}")
    return shape


def _flatten(data: list) -> list:
    """Row-major flattening of (possibly nested) tensor data; depth is bounded by the JSON check."""
    flat, stack = [], [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def _embedding_rows(tensor: dict, where: str, images: int) -> List[List[float]]:
    """A ``reference_embedding`` input → one row of floats per image (a single row is shared)."""
    datatype = str(tensor.get("datatype", "")).upper()
    if datatype not in FLOAT_DATATYPES:
        raise InvalidRequestOptionError(f"KServe v2: {where} (reference_embedding) must have datatype FP32 "
                                        f"(or FP16/FP64), got {tensor.get('datatype')!r}")
    values = _flatten(tensor["data"])
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InvalidRequestOptionError(f"KServe v2: {where} (reference_embedding) data must be a non-empty "
                                        f"list of numbers")
    shape = _shape(tensor, where) or [len(values)]
    if len(shape) not in (1, 2) or int(np.prod(shape)) != len(values):
        raise InvalidRequestOptionError(f"KServe v2: {where} (reference_embedding) shape must be [D], [1, D] or "
                                        f"[n, D] matching its {len(values)} values, got {shape}")
    rows = 1 if len(shape) == 1 else shape[0]
    if rows not in (1, images):
        raise InvalidRequestOptionError(f"KServe v2: {where} (reference_embedding) has {rows} rows for {images} images "
                                        f"(give one row, or one per image)")
    width = len(values) // rows
    matrix = [[float(v) for v in values[r * width:(r + 1) * width]] for r in range(rows)]
    return matrix * images if rows == 1 else matrix


def _requested_outputs(body: dict) -> Optional[List[str]]:
    outputs = body.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidRequestOptionError("KServe v2: 'outputs' must be a list of {\"name\": <output name>}")
    names = [o["name"] for o in outputs]
    unknown = sorted({n for n in names if n.split(".")[0] not in V2_OUTPUT_NAMES})
    if unknown:
        raise InvalidRequestOptionError(f"KServe v2: unknown output(s) {unknown}; known: {sorted(V2_OUTPUT_NAMES)}")
    return names


def _kserve_v2(body: dict, query: Dict[str, Any], fields, max_instances, explain_route) -> ParsedRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MissingInputError("KServe v2: 'inputs' must be a non-empty list")
    base = {**query, **_options_from(body.get("parameters"), "parameters")}
    json_output = parse_flag("json_output", base.pop("json_output", False), InvalidRequestOptionError)
    meta = {"json_output": json_output, "outputs": _requested_outputs(body)}
    images: List[Item] = []
    references: List[Any] = []
    embeddings = []
    for n, tensor in enumerate(inputs):
        where = f"inputs[{n}]"
        if not isinstance(tensor, dict) or not isinstance(tensor.get("data"), list):
            raise MissingInputError(f"KServe v2: {where} needs a 'data' list")
        name = str(tensor.get("name", "image")).lower()
        if name in EMBED_FIELDS and name not in fields:
            raise InvalidRequestOptionError(f"KServe v2: {where}: this model takes no {name!r} input "
                                            f"(inputs: {sorted(set(fields.values()))})")
        role = fields.get(name, "image")
        local = {**base, **_options_from(tensor.get("parameters"), f"{where}.parameters")}
        for option in ENVELOPE_OPTIONS:
            if option in local and option not in base:
                raise InvalidRequestOptionError(f"KServe v2: {option!r} is a request-level parameter, "
                                                f"not one of {where}.parameters")
        if role == "reference_embedding":
            embeddings.append((tensor, where))
            continue
        if str(tensor.get("datatype", "BYTES")).upper() != "BYTES":
            raise InvalidRequestOptionError(f"KServe v2: {where} must have datatype BYTES (base64 images), "
                                            f"got {tensor.get('datatype')!r}")
        shape = _shape(tensor, where)
        if shape is not None and int(np.prod(shape)) != len(tensor["data"]):
            raise InvalidRequestOptionError(f"KServe v2: {where}.shape {shape} does not match its "
                                            f"{len(tensor['data'])} data elements")
        for element in tensor["data"]:
            if role == "image":
                images.append(_instance_item(element, local, fields, where))
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
    if len(embeddings) > 1:
        raise InvalidRequestOptionError("KServe v2: give at most one reference_embedding input")
    for tensor, where in embeddings:
        for item, row in zip(images, _embedding_rows(tensor, where, len(images))):
            item.payloads["reference_embedding"] = row
    request_id = body.get("id")
    return ParsedRequest(KSERVE_V2, images, explain_route,
                         request_id=None if request_id is None else str(request_id), meta=meta)
