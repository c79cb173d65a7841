"""The asyncio client: :class:`AsyncClient` is :class:`~camserve.client.Client` on ``httpx`` — the same
protocols, keys, retries, typed answers and :class:`~camserve.client.CamserveError` — for services and
notebooks that already run an event loop.

    async with AsyncClient("http://127.0.0.1:8080", key_file="logs/key_file.json") as client:
        answer = await client.predict("effnet_lite0", "photo.jpg", explain="gradcam")
        answers = await client.predict_many("effnet_lite0", paths, concurrency=8)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import httpx
from tqdm import tqdm

from camserve.client.errors import CamserveError
from camserve.client.wire import (RETRY_STATUSES, Answer, build_request, check_protocol, default_management_url,
                                  read_answer, read_key, refused_key, retry_after)


class AsyncClient:
    """Requests to the server at ``url`` from coroutines; use it as ``async with`` (or ``await aclose()``)."""

    def __init__(self, url: str, inference_key: Optional[str] = None, key_file: Optional[str] = None,
                 management_url: Optional[str] = None, protocol: str = "torchserve", timeout: float = 300.0,
                 retries: int = 3):
        self.url, self.protocol, self.retries = url.rstrip("/"), check_protocol(protocol), retries
        self.key_file = Path(key_file) if key_file else None
        self.management_url = (management_url or default_management_url(self.url)).rstrip("/")
        self._key = inference_key if inference_key is not None else read_key(self.key_file, "inference")
        self._key_lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def inference_key(self) -> Optional[str]:
        """The inference key in use (a regenerated one after a refusal)."""
        return self._key

    async def regenerate_key(self, refused: Optional[str]) -> bool:
        """A new inference key from the management API with the key file's ``API`` key (see
        :meth:`camserve.client.Client.regenerate_key`); coroutines that met the same refused key
        regenerate it once."""
        if self.key_file is None:
            return False
        async with self._key_lock:
            if self._key != refused:
                return True
            api_key = read_key(self.key_file, "API")
            try:
                response = await self._http.get(f"{self.management_url}/token", params={"type": "inference"},
                                                headers={"Authorization": f"Bearer {api_key}"})
            except httpx.HTTPError as error:
                raise CamserveError(None, f"regenerating the inference key at {self.management_url}: {error}") from None
            if response.status_code != 200:
                raise CamserveError(response.status_code, f"regenerating the inference key: {response.text[:300]}")
            self._key = read_key(self.key_file, "inference")
            return True

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """One POST with the inference key, regenerating a refused key and retrying a busy server."""
        attempt, regenerated = 0, False
        while True:
            key = self._key
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                response = await self._http.post(f"{self.url}{path}", headers=headers, **kwargs)
            except httpx.HTTPError as error:
                raise CamserveError(None, f"{self.url}{path}: {type(error).__name__} {error}") from None
            if not regenerated and refused_key(response.status_code, response.text):
                regenerated = True
                if await self.regenerate_key(key):
                    continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                await asyncio.sleep(retry_after(response.headers))
                continue
            return response

    async def predict(self, model: str, image: Any, **options: Any) -> Answer:
        """One image's typed answer (see :meth:`camserve.client.Client.predict`)."""
        request = build_request(self.protocol, model, image, options)
        response = await self.post(request.path, **request.kwargs)
        return read_answer(self.protocol, response.status_code, response.text, request)

    async def predict_many(self, model: str, images: Sequence[Any], concurrency: int = 4, progress: bool = True,
                           **options: Any) -> List[Union[Answer, CamserveError]]:
        """Answers for ``images`` in input order, at most ``concurrency`` requests in flight, a progress
        bar as they finish; a refused image's :class:`CamserveError` in its place."""
        gate = asyncio.Semaphore(max(1, concurrency))
        bar = tqdm(total=len(images), disable=not progress, unit="image", desc=f"camserve {model}")

        async def one(image: Any) -> Union[Answer, CamserveError]:
            async with gate:
                try:
                    return await self.predict(model, image, **options)
                except CamserveError as error:
                    return error
                finally:
                    bar.update(1)
        try:
            return list(await asyncio.gather(*(one(image) for image in images)))
        finally:
            bar.close()
