"""The embedding handler: the embedding of each image and, when asked, its FAM explanation.

Per request: ``image`` plus at most one reference — ``reference`` (an image: multipart field or
base64 JSON), ``reference_embedding`` (``D`` floats, JSON list or a JSON text field) or
``gallery=k`` (the k best matches in the archive's gallery). The answer holds the embedding, and
with a reference the similarity and the FAM pair (query map, reference map: base64 8-bit PNGs at
the model input's size); with a gallery, the k matches each with their pair. Options:
``similarity=cosine|dot|euclidean``, ``method=fam|gradcam_similarity``, ``embedding=0`` to omit the
vector, ``overlay=1`` (query map over the query crop), ``colormap``.

One batch = one ``to_model_input`` (queries and reference images together) and one
``FamExplainer.explain`` (one forward over queries + reference images).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.embedding import load_effnet_lite0_embedding
from ..engine.errors import ExplanationInputError
from ..engine.fam import FamExplainer, FamSpec
from ..engine.gallery import Gallery
from ..engine.models import EFFNET_LITE0, ModelProfile, load_effnet_lite0
from ..engine.preprocess import crop_box, to_model_input
from ..engine.render import overlay, to_uint8
from .base import CamserveHandler
from .classifier import image_bytes
from .encode import b64png
from .errors import InvalidRequestOptionError, MissingInputError
from .images import decode_image, image_size
from .metrics import record_explanations
from .options import as_text, parse_colormap, parse_flag, parse_int
from .requests import EMBED_FIELDS, ParsedRequest


@dataclass
class EmbedItem:
    request: int
    position: int
    image: torch.Tensor
    reference: Optional[torch.Tensor]
    spec: Optional[FamSpec]
    include_embedding: bool
    overlay: bool
    colormap: str


def parse_embedding(value: Any) -> List[float]:
    """A JSON list of numbers, or a text field holding one."""
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = json.loads(as_text(value))
        except ValueError as error:
            raise InvalidRequestOptionError(f"reference_embedding is not a JSON list of numbers ({error})") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in value):
        raise InvalidRequestOptionError("reference_embedding must be a non-empty list of numbers")
    return [float(v) for v in value]


class EmbeddingHandler(CamserveHandler):
    """TorchServe handler for an embedding model (EfficientNet-Lite0 features, D = 1280)."""

    payload_fields = EMBED_FIELDS
    profile: ModelProfile = EFFNET_LITE0
    embedding_decimals = 5

    def load(self, context) -> None:
        backbone = load_effnet_lite0(weights_path=self.serialized_file(), device=self.device)
        self.model = load_effnet_lite0_embedding(normalize=True, backbone=backbone, device=self.device)
        gallery_path = self.artifact(self.settings.gallery_file)
        self.gallery = Gallery.load(gallery_path, device=self.device) if gallery_path else None
        self.fam = FamExplainer(self.model, self.gallery, (self.profile.crop, self.profile.crop))

    def prepare(self, index: int, request: ParsedRequest) -> List[EmbedItem]:
        items = []
        s = self.settings
        for position, item in enumerate(request.items):
            what = "image" if len(request.items) == 1 else f"image {position}"
            image = decode_image(image_bytes(item.payloads["image"], what), s.max_pixels, what)
            raw = {k: as_text(v) for k, v in item.options.items()}
            unknown = sorted(set(raw) - {"similarity", "method", "explain", "gallery", "topk", "embedding", "overlay",
                                         "colormap", "model_name"})
            if unknown:
                raise InvalidRequestOptionError(f"unknown options {unknown} for the embedding model")
            method = str(raw.get("method") or raw.get("explain") or "fam").lower()
            if method in ("1", "true"):
                method = "fam"
            similarity = str(raw.get("similarity") or s.similarity).lower()
            references = [k for k in ("reference", "reference_embedding") if k in item.payloads]
            gallery_k = raw.get("gallery", raw.get("topk"))
            if len(references) + (gallery_k is not None) > 1:
                raise InvalidRequestOptionError("give at most one of reference, reference_embedding, gallery")
            reference = None
            spec = None
            if "reference" in item.payloads:
                reference = decode_image(image_bytes(item.payloads["reference"], "reference"), s.max_pixels, "reference")
                spec = FamSpec(similarity=similarity, method=method)
            elif "reference_embedding" in item.payloads:
                spec = FamSpec(reference_embedding=parse_embedding(item.payloads["reference_embedding"]),
                               similarity=similarity, method=method)
            elif gallery_k is not None:
                if self.gallery is None or not len(self.gallery):
                    raise MissingInputError("this archive has no gallery; send a reference or reference_embedding")
                k = parse_int("gallery", gallery_k, 1, min(s.max_gallery_topk, len(self.gallery)))
                spec = FamSpec(gallery_topk=k, similarity=similarity, method=method)
            colormap = parse_colormap(raw.get("colormap") or s.colormap)
            items.append(EmbedItem(index, position, image, reference, spec,
                                   parse_flag("embedding", raw.get("embedding", True)),
                                   parse_flag("overlay", raw.get("overlay", False)), colormap))
        return items

    def run_batch(self, requests: Sequence[Tuple[int, ParsedRequest]], context) -> Dict[int, Any]:
        items, outcomes = self.prepare_all(requests)
        if not items:
            return outcomes
        try:
            results = self.explain_items(items)
        except ExplanationInputError:
            results = {}
            for index in dict.fromkeys(i.request for i in items):  # isolate the failing request
                try:
                    results.update(self.explain_items([i for i in items if i.request == index]))
                except Exception as error:  # noqa: BLE001
                    outcomes[index] = self._guard(error)
        return self.in_request_order(items, results, outcomes)

    def explain_items(self, items: List[EmbedItem]) -> Dict[Tuple[int, int], Dict[str, Any]]:
        p = self.profile
        pixels = [i.image for i in items] + [i.reference for i in items if i.reference is not None]
        batch, crops = to_model_input(pixels, p.resize, p.crop, p.mean, p.std, self.device)
        n = len(items)
        cursor = n
        for item in items:
            if item.reference is not None:
                item.spec.reference_image = batch[cursor]
                cursor += 1
        result = self.fam.explain(batch[:n], [i.spec for i in items])
        out: Dict[Tuple[int, int], Dict[str, Any]] = {}
        seconds, counts = {}, Counter()
        for row, (item, fam) in enumerate(zip(items, result.items)):
            height_width = tuple(reversed(image_size(item.image)))
            answer: Dict[str, Any] = {"dim": int(result.embeddings.shape[-1]), "batch_size": n}
            if item.include_embedding:
                scale = 10 ** self.embedding_decimals
                answer["embedding"] = (torch.round(result.embeddings[row].float() * scale) / scale).cpu().tolist()
            answer["crop_box"] = crop_box(height_width, p.resize, p.crop)
            if fam is not None:
                answer.update({
                    "similarity": round(float(fam.similarity), 6), "metric": fam.metric, "method": fam.method,
                    "route": fam.route, "reference": fam.reference,
                    "query_map": b64png(to_uint8(fam.query_map)),
                    "reference_map": b64png(to_uint8(fam.reference_map)) if fam.reference_map is not None else None,
                    "size": [int(fam.query_map.shape[-1]), int(fam.query_map.shape[-2])],
                    "passes": dict(fam.passes), "seconds": round(fam.seconds, 4),
                })
                if item.overlay:
                    answer["overlay"] = b64png(overlay(fam.query_map[None], crops[row:row + 1], item.colormap,
                                                       self.settings.overlay_alpha)[0])
                if fam.matches is not None:
                    answer["matches"] = [{
                        "index": int(m["index"]), "label": m["label"], "similarity": round(float(m["similarity"]), 6),
                        "query_map": b64png(to_uint8(m["query_map"])),
                        "reference_map": b64png(to_uint8(m["reference_map"])) if m["reference_map"] is not None else None,
                    } for m in fam.matches]
                seconds[fam.method] = fam.seconds
                counts[fam.method] += 1
            out[(item.request, item.position)] = answer
        record_explanations(self.context, seconds, counts)
        return out
