"""``camserve.client``: one Python client for camserve's doors — TorchServe (plain multipart) and the
KServe predictor or TorchServe's KServe routes (v1 and v2) — answering with the typed answers the
servers build (:mod:`camserve.serving.answer`); :class:`Client` on ``requests``, :class:`AsyncClient`
on ``httpx`` for asyncio.

    from camserve.client import Client
    client = Client("http://127.0.0.1:8080", key_file="logs/key_file.json")
    answer = client.predict("effnet_lite0", "photo.jpg", explain="gradcam", layer="_blocks.4")
    answer.predictions[0].label, heatmap_arrays(answer.explanation)[0].shape
    answer.show()  # in a notebook the answer also displays itself: top-k and the maps over the photo
"""

from camserve.client.async_client import AsyncClient
from camserve.client.errors import CamserveError
from camserve.client.images import heatmap_arrays, image_bytes, overlay_images
from camserve.client.session import Client
from camserve.client.wire import PROTOCOLS

__all__ = ["PROTOCOLS", "AsyncClient", "CamserveError", "Client", "heatmap_arrays", "image_bytes", "overlay_images"]
