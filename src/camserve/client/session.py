"""The client: requests to one server, answers as typed answers, one exception type.

Protocols (``protocol=``):

- ``torchserve``: ``POST /predictions/<model>`` with the image and each option as multipart fields;
- ``v1``: KServe v1, ``POST /v1/models/<model>:predict`` with ``{"instances": [{"data": <base64>, …options}]}``;
- ``v2``: the Open Inference Protocol, ``POST /v2/models/<model>/infer`` with a BYTES ``image`` input,
  the options as ``parameters`` and ``json_output`` (each image's JSON answer as text).

Each works against TorchServe's routes; ``v1`` and ``v2`` also against ``camserve kserve``. Keys: an
``inference_key``, or a TorchServe ``key_file`` (``key_file.json``); with the key file, a refused key
(TorchServe's keys expire after ``token_expiration_min``: ``400 InvalidKeyException``) is regenerated
once on the management API with the file's ``API`` key and the request sent again. ``503``/``507``
answers are retried after the server's ``Retry-After`` (default 1 s), ``retries`` times.
``predict_many`` sends many images at a time (``concurrency`` in flight) with a progress bar, and
returns the answers in input order.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from camserve.client.errors import CamserveError
from camserve.client.images import image_bytes
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer

PROTOCOLS = ("torchserve", "v1", "v2")
#: statuses that mean "busy, try again" (TorchServe's 503 queue full / 507 worker busy)
RETRY_STATUSES = (503, 507)
Answer = Union[ClassifierAnswer, EmbeddingAnswer]


def answer_from_json(body: Mapping[str, Any]) -> Answer:
    """A classifier's answer (it has ``predictions``) or an embedding model's (it has ``embedding``/``dim``)."""
    if "predictions" in body:
        return ClassifierAnswer.from_json(body)
    if "embedding" in body or "dim" in body:
        return EmbeddingAnswer.from_json(body)
    raise CamserveError(200, f"an answer of neither a classifier nor an embedding model: keys {sorted(body)}", body)


class Client:
    """Requests to the server at ``url`` (its inference address)."""

    def __init__(self, url: str, inference_key: Optional[str] = None, key_file: Optional[str] = None,
                 management_url: Optional[str] = None, protocol: str = "torchserve", timeout: float = 300.0,
                 retries: int = 3):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.url, self.protocol, self.timeout, self.retries = url.rstrip("/"), protocol, timeout, retries
        self.key_file = Path(key_file) if key_file else None
        self.management_url = (management_url or self._default_management_url()).rstrip("/")
        self._key = inference_key if inference_key is not None else self._read_key("inference")
        self._key_lock = threading.Lock()
        self._local = threading.local()  # one requests.Session per thread (predict_many's workers)

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    # -- keys -----------------------------------------------------------------------------------------
    @property
    def inference_key(self) -> Optional[str]:
        """The inference key in use (a regenerated one after a refusal)."""
        return self._key

    def _default_management_url(self) -> str:
        """TorchServe's default layout: management on the inference port + 1 (8080 → 8081)."""
        parsed = urlparse(self.url)
        return parsed._replace(netloc=f"{parsed.hostname}:{(parsed.port or 80) + 1}").geturl()

    def _read_key(self, api: str) -> Optional[str]:
        if self.key_file is None:
            return None
        try:
            return json.loads(self.key_file.read_text())[api]["key"]
        except (OSError, ValueError, KeyError) as error:
            raise CamserveError(None, f"key file {self.key_file}: no {api!r} key ({error})") from None

    def regenerate_key(self, refused: Optional[str]) -> bool:
        """A new inference key from the management API (``/token?type=inference`` with the key file's
        ``API`` key, which does not expire), read back from the key file; ``False`` without a key file.
        Threads that met the same refused key regenerate it once."""
        if self.key_file is None:
            return False
        with self._key_lock:
            if self._key != refused:  # another thread already did
                return True
            api_key = self._read_key("API")
            try:
                response = self._session.get(f"{self.management_url}/token", params={"type": "inference"},
                                             headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout)
            except requests.RequestException as error:
                raise CamserveError(None, f"regenerating the inference key at {self.management_url}: {error}") from None
            if response.status_code != 200:
                raise CamserveError(response.status_code, f"regenerating the inference key: {response.text[:300]}")
            self._key = self._read_key("inference")
            return True

    # -- requests ---------------------------------------------------------------------------------
    def _request(self, model: str, image: bytes, options: Mapping[str, Any]) -> Dict[str, Any]:
        """(path, requests keyword arguments) of one image's request in this client's protocol; a
        ``reference`` option (an embedding model's reference image) travels as an image of its own."""
        options = dict(options)
        reference = options.pop("reference", None)
        reference = image_bytes(reference) if reference is not None else None
        if self.protocol == "torchserve":
            files = {"data": image, **({"reference": reference} if reference is not None else {})}
            return {"path": f"/predictions/{model}",
                    "files": {**files, **{k: (None, _text(v)) for k, v in options.items()}}}
        data = base64.b64encode(image).decode("ascii")
        ref = base64.b64encode(reference).decode("ascii") if reference is not None else None
        if self.protocol == "v1":
            instance = {"data": data, **({"reference": ref} if ref is not None else {}), **options}
            return {"path": f"/v1/models/{model}:predict", "json": {"instances": [instance]}}
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]
        if ref is not None:
            inputs.append({"name": "reference", "datatype": "BYTES", "shape": [1], "data": [ref]})
        return {"path": f"/v2/models/{model}/infer", "json": {"inputs": inputs,
                                                               "parameters": {**options, "json_output": True}}}

    def _answer(self, body: Any) -> Answer:
        """The one image's JSON answer out of this protocol's envelope."""
        if self.protocol == "v1":
            items = body.get("predictions") or body.get("explanations") or []
            return answer_from_json(items[0])
        if self.protocol == "v2":
            return answer_from_json(json.loads(body["outputs"][0]["data"][0]))
        return answer_from_json(body)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """One POST with the inference key, regenerating a refused key and retrying a busy server."""
        attempt, regenerated = 0, False
        while True:
            key = self._key
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                response = self._session.post(f"{self.url}{path}", headers=headers, timeout=self.timeout, **kwargs)
            except requests.RequestException as error:
                raise CamserveError(None, f"{self.url}{path}: {error}") from None
            if response.status_code in (400, 401) and not regenerated and "InvalidKeyException" in response.text:
                regenerated = True
                if self.regenerate_key(key):
                    continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                time.sleep(_retry_after(response))
                continue
            return response

    def predict(self, model: str, image: Any, **options: Any) -> Answer:
        """One image's typed answer; ``options`` are the request options (``explain``, ``layer``,
        ``target``, ``compare``, ``format``, ``overlay``, ``reference``…)."""
        request = self._request(model, image_bytes(image), options)
        response = self.post(request.pop("path"), **request)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            raise CamserveError(response.status_code, _message(body, response.text), body)
        return self._answer(body)

    def predict_many(self, model: str, images: Sequence[Any], concurrency: int = 4, progress: bool = True,
                     **options: Any) -> List[Union[Answer, CamserveError]]:
        """Answers for ``images`` in input order, ``concurrency`` requests in flight; an image the server
        refused gets its :class:`CamserveError` in its place (the others are still answered)."""
        def one(image):
            try:
                return self.predict(model, image, **options)
            except CamserveError as error:
                return error
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(tqdm(pool.map(one, images), total=len(images), disable=not progress, unit="image",
                             desc=f"camserve {model}"))


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value).lower() if isinstance(value, bool) \
        else str(value)


def _retry_after(response: requests.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", 1.0)))
    except ValueError:
        return 1.0


def _message(body: Any, text: str) -> str:
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
