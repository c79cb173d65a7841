"""The client: requests to one server, answers as typed answers, one exception type.

Protocols (``protocol=``, see :mod:`camserve.client.wire`): ``torchserve`` (multipart to
``/predictions/<model>``), ``v1`` (KServe v1 ``:predict``), ``v2`` (Open Inference Protocol ``/infer``
with ``json_output``). Each works against TorchServe's routes; ``v1`` and ``v2`` also against
``camserve kserve``. Keys: an ``inference_key``, or a TorchServe ``key_file`` (``key_file.json``);
with the key file, a refused key (TorchServe's keys expire after ``token_expiration_min``:
``400 InvalidKeyException``) is regenerated once on the management API with the file's ``API`` key
and the request sent again. ``503``/``507`` answers are retried after the server's ``Retry-After``
(default 1 s), ``retries`` times. ``predict_many`` sends many images at a time (``concurrency`` in
flight) with a progress bar, and returns the answers in input order.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import requests
from tqdm import tqdm

from camserve.client.errors import CamserveError
from camserve.client.wire import (PROTOCOLS, RETRY_STATUSES, Answer, build_request, check_protocol,
                                  default_management_url, read_answer, read_key, refused_key, retry_after)

__all__ = ["PROTOCOLS", "Answer", "Client"]


class Client:
    """Requests to the server at ``url`` (its inference address)."""

    def __init__(self, url: str, inference_key: Optional[str] = None, key_file: Optional[str] = None,
                 management_url: Optional[str] = None, protocol: str = "torchserve", timeout: float = 300.0,
                 retries: int = 3):
        self.url, self.protocol, self.timeout, self.retries = url.rstrip("/"), check_protocol(protocol), timeout, retries
        self.key_file = Path(key_file) if key_file else None
        self.management_url = (management_url or default_management_url(self.url)).rstrip("/")
        self._key = inference_key if inference_key is not None else read_key(self.key_file, "inference")
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

    def regenerate_key(self, refused: Optional[str]) -> bool:
        """A new inference key from the management API (``/token?type=inference`` with the key file's
        ``API`` key, which does not expire), read back from the key file; ``False`` without a key file.
        Threads that met the same refused key regenerate it once."""
        if self.key_file is None:
            return False
        with self._key_lock:
            if self._key != refused:  # another thread already did
                return True
            api_key = read_key(self.key_file, "API")
            try:
                response = self._session.get(f"{self.management_url}/token", params={"type": "inference"},
                                             headers={"Authorization": f"Bearer {api_key}"}, timeout=self.timeout)
            except requests.RequestException as error:
                raise CamserveError(None, f"regenerating the inference key at {self.management_url}: {error}") from None
            if response.status_code != 200:
                raise CamserveError(response.status_code, f"regenerating the inference key: {response.text[:300]}")
            self._key = read_key(self.key_file, "inference")
            return True

    # -- requests ---------------------------------------------------------------------------------
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
            if not regenerated and refused_key(response.status_code, response.text):
                regenerated = True
                if self.regenerate_key(key):
                    continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                time.sleep(retry_after(response.headers))
                continue
            return response

    def predict(self, model: str, image: Any, **options: Any) -> Answer:
        """One image's typed answer; ``options`` are the request options (``explain``, ``layer``,
        ``target``, ``compare``, ``format``, ``overlay``, ``reference``…)."""
        request = build_request(self.protocol, model, image, options)
        response = self.post(request.path, **request.kwargs)
        return read_answer(self.protocol, response.status_code, response.text, request)

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
