"""What travels: one image's request in each protocol, the answer out of each envelope, the server's
message out of an error, the keys of a TorchServe key file — shared by :class:`~camserve.client.Client`
(``requests``) and :class:`~camserve.client.AsyncClient` (``httpx``), which only send.

Protocols:

- ``torchserve``: ``POST /predictions/<model>`` with the image (and a ``reference`` image) as multipart
  files and each option as a form field;
- ``v1``: KServe v1, ``POST /v1/models/<model>:predict`` with ``{"instances": [{"data": <base64>, …options}]}``;
- ``v2``: the Open Inference Protocol, ``POST /v2/models/<model>/infer`` with a BYTES ``image`` input,
  the options as ``parameters`` and ``json_output`` (each image's JSON answer as text).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union
from urllib.parse import urlparse

from camserve.client.errors import CamserveError
from camserve.client.images import image_bytes
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer

PROTOCOLS = ("torchserve", "v1", "v2")
#: statuses that mean "busy, try again" (TorchServe's 503 queue full / 507 worker busy)
RETRY_STATUSES = (503, 507)
Answer = Union[ClassifierAnswer, EmbeddingAnswer]


@dataclass
class WireRequest:
    """One POST: ``path`` under the server URL, then multipart ``files`` + form ``data``, or ``json``.
    ``image``/``reference``: the encoded images sent (the answer keeps them for display)."""

    path: str
    image: bytes
    reference: Optional[bytes] = None
    files: Optional[Dict[str, bytes]] = None
    data: Optional[Dict[str, str]] = None
    json: Optional[Dict[str, Any]] = None
    kwargs: Dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.kwargs = {k: v for k, v in (("files", self.files), ("data", self.data), ("json", self.json))
                       if v is not None}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def build_request(protocol: str, model: str, image: Any, options: Mapping[str, Any]) -> WireRequest:
    """One image's request; a ``reference`` option (an embedding model's reference image) travels as
    an image of its own."""
    options = dict(options)
    reference = options.pop("reference", None)
    sent = image_bytes(image)
    ref = image_bytes(reference) if reference is not None else None
    if protocol == "torchserve":
        files = {"data": sent, **({"reference": ref} if ref is not None else {})}
        return WireRequest(f"/predictions/{model}", sent, ref, files=files,
                           data={k: form_text(v) for k, v in options.items()})
    data = base64.b64encode(sent).decode("ascii")
    ref64 = base64.b64encode(ref).decode("ascii") if ref is not None else None
    if protocol == "v1":
        instance = {"data": data, **({"reference": ref64} if ref64 is not None else {}), **options}
        return WireRequest(f"/v1/models/{model}:predict", sent, ref, json={"instances": [instance]})
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]
    if ref64 is not None:
        inputs.append({"name": "reference", "datatype": "BYTES", "shape": [1], "data": [ref64]})
    return WireRequest(f"/v2/models/{model}/infer", sent, ref,
                       json={"inputs": inputs, "parameters": {**options, "json_output": True}})


def answer_from_json(body: Mapping[str, Any]) -> Answer:
    """A classifier's answer (it has ``predictions``) or an embedding model's (it has ``embedding``/``dim``)."""
    if "predictions" in body:
        return ClassifierAnswer.from_json(body)
    if "embedding" in body or "dim" in body:
        return EmbeddingAnswer.from_json(body)
    raise CamserveError(200, f"an answer of neither a classifier nor an embedding model: keys {sorted(body)}", body)


def read_answer(protocol: str, status: int, text: str, request: WireRequest) -> Answer:
    """The one image's typed answer out of this protocol's envelope (it keeps the sent images for
    display), or the :class:`CamserveError` of a refusal."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status != 200:
        raise CamserveError(status, error_message(body, text), body)
    try:
        if protocol == "v1":
            body = (body.get("predictions") or body.get("explanations") or [])[0]
        elif protocol == "v2":
            body = json.loads(body["outputs"][0]["data"][0])
        return answer_from_json(body).with_images(request.image, request.reference)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise CamserveError(status, f"an answer the client cannot read ({type(error).__name__}: {error})",
                            body) from None


def form_text(value: Any) -> str:
    """An option as a form field: JSON for lists and mappings, ``true``/``false`` for booleans."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def retry_after(headers: Mapping[str, str]) -> float:
    """The server's ``Retry-After`` in seconds (default 1)."""
    try:
        return max(0.0, float(headers.get("Retry-After", 1.0)))
    except ValueError:
        return 1.0


def refused_key(status: int, text: str) -> bool:
    """TorchServe's answer to an expired or wrong inference key."""
    return status in (400, 401) and "InvalidKeyException" in text


def error_message(body: Any, text: str) -> str:
    """The server's message: camserve's ``{"error": {"message"}}``, TorchServe's ``{"message"}``, or the text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return text[:500]


def default_management_url(url: str) -> str:
    """TorchServe's default layout: management on the inference port + 1 (8080 → 8081)."""
    parsed = urlparse(url)
    return parsed._replace(netloc=f"{parsed.hostname}:{(parsed.port or 80) + 1}").geturl()


def read_key(key_file: Optional[Path], api: str) -> Optional[str]:
    """The ``api`` key (``inference``, ``management``, ``API``) of a TorchServe ``key_file.json``."""
    if key_file is None:
        return None
    try:
        return json.loads(key_file.read_text())[api]["key"]
    except (OSError, ValueError, KeyError) as error:
        raise CamserveError(None, f"key file {key_file}: no {api!r} key ({error})") from None
