"""The embedding handler: the embedding of each image and, when asked, its FAM explanation.

Per request: ``image`` plus at most one reference — ``reference`` (an image: multipart field or
base64 JSON), ``reference_embedding`` (``D`` floats, JSON list or a JSON text field) or
``gallery=k`` (the k best matches in the archive's gallery; ``gallery=true``: its ``gallery_topk``) or
``prototypes=true`` (a few-shot episode whose support set is the archive's labelled gallery:
SimpleShot nearest centroid, the query's map against the winning prototype and the maps of that
class's shots most similar to the query, ``topk`` of them, default the archive's ``gallery_topk``;
with ``layer=`` below the last map, the query's map there by the relevance route and no shot maps).
The answer holds the embedding, and with a reference the similarity and the FAM pair (query map,
reference map: base64 8-bit PNGs at the model input's size); with a gallery, the k matches each with
their pair. Options:
``similarity=cosine|dot|euclidean``, ``method=fam|gradcam_similarity``, ``embedding=0`` to omit the
vector, ``overlay=1`` (query map over the query crop), ``colormap``. Every option is validated
(:func:`parse_embed_options`) whether the request has a reference or not.

One batch = one ``to_model_input`` (queries and reference images together) and one
``FamExplainer.explain`` (one forward over queries + reference images); the batch's few-shot rows
get one more forward and backward of their own (:func:`camserve.engine.explain_queries`), and those
with a layer below the last map one more ``FamExplainer.explain`` (:func:`camserve.engine.prototype_spec`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from camserve.engine import (FAM_WEIGHTINGS as WEIGHTINGS, REGISTRY, SIMILARITIES, FamExplainer, FamSpec, Gallery,
                             ExplanationInputError, InvalidReferenceError, episode_from_gallery, explain_queries, get_composite,
                             prototype_spec)
from camserve.engine.core.values import truth
from camserve.engine.models import EFFNET_LITE0, ModelProfile, embedding_model_for, load_spec
from camserve.engine.imaging.preprocess import crop_box
from camserve.engine.imaging.summary import summarise
from camserve.engine.imaging.render import overlay, to_uint8
from camserve.engine.runtime import EAGER, OPENVINO
from camserve.engine.runtime.embedding_features import fast_features
from camserve.serving.answer import EmbeddingAnswer, FamAnswer, FamMatch
from camserve.serving.base import CamserveHandler
from camserve.serving.classifier import image_bytes
from camserve.serving.encode import b64png
from camserve.serving.errors import InvalidRequestOptionError, MissingInputError
from camserve.serving.images import decode_image, image_size
from camserve.ops.metrics import record_explanations
from camserve.serving.options import FORMATS, as_text, parse_colormap, parse_flag, parse_int
from camserve.serving.protocol import EMBED_FIELDS
from camserve.serving.requests import ParsedRequest
from camserve.serving.settings import model_spec, runtime_settings

logger = logging.getLogger(__name__)


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
    format: str = "png"
    shots: int = 0                 # prototypes=true: how many of the winning class's shots to show (0: none)
    prototype_layer: Optional[str] = None  # prototypes=true with a layer (its module path; the last map's too)


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


EMBED_OPTIONS = ("similarity", "method", "explain", "gallery", "topk", "embedding", "overlay", "colormap",
                 "layer", "weights", "neighbours", "format", "prototypes", "model_name")


@dataclass
class EmbedOptions:
    """One embedding request's options, every one validated whether the request uses it or not.
    ``method`` None: ``explain=0`` (no explanation); ``gallery``: None (no gallery), True (the
    archive's ``gallery_topk``) or the k asked for (range-checked against the gallery later)."""

    similarity: str
    method: Optional[str]
    gallery: Any
    embedding: bool
    overlay: bool
    colormap: str
    layer: Optional[str] = None
    weights: str = "auto"
    neighbours: Optional[int] = None
    format: str = "png"
    prototypes: Any = None         # None, or the number of shots asked for (True: the archive's gallery_topk)

    def spec(self, **reference) -> FamSpec:
        """The engine's request for this item: the reference given, with the options' FAM fields."""
        return FamSpec(similarity=self.similarity, method=self.method, layer=self.layer, weights=self.weights,
                       neighbours=self.neighbours, **reference)


def parse_embed_options(raw: Dict[str, Any], settings) -> EmbedOptions:
    """Validate the embedding model's options: unknown names, similarity, method, gallery/topk,
    embedding/overlay flags and colormap — a bad value is a 400 even when no reference uses it.

    ``gallery=true|yes|on`` → the archive's ``gallery_topk`` matches (``topk=k`` overrides it),
    ``gallery=<k>`` → k matches, ``gallery=0|false|no|off`` → none; ``topk=<k>`` alone → k matches."""
    raw = {str(k).lower(): as_text(v, str(k)) for k, v in raw.items()}
    unknown = sorted(set(raw) - set(EMBED_OPTIONS))
    if unknown:
        raise InvalidRequestOptionError(f"unknown option(s) {unknown} for the embedding model; "
                                        f"options: {sorted(set(EMBED_OPTIONS) - {'model_name'})}")
    prototypes = parse_flag("prototypes", raw.pop("prototypes")) if raw.get("prototypes") not in (None, "") else False
    if prototypes:
        return prototype_options(raw, settings)
    given = [str(raw[k]).strip().lower() for k in ("method", "explain") if raw.get(k) not in (None, "")]
    words = ["fam" if truth(w) is True else w for w in given]
    if len(set(words)) > 1:
        raise InvalidRequestOptionError(f"options 'method' and 'explain' disagree: {raw.get('method')!r} vs "
                                        f"{raw.get('explain')!r}")
    method: Optional[str] = words[0] if words else "fam"
    if method is not None and truth(method) is False:
        method = None
    elif method not in REGISTRY.names(task="embed"):
        raise InvalidRequestOptionError(f"unknown FAM method {method!r}; choose one of {REGISTRY.names(task='embed')}")
    similarity = str(raw.get("similarity") or settings.similarity).strip().lower()
    if similarity not in SIMILARITIES:
        raise InvalidRequestOptionError(f"unknown similarity {similarity!r}; choose one of {list(SIMILARITIES)}")
    gallery, topk = raw.get("gallery"), raw.get("topk")
    topk = None if topk in (None, "") else parse_int("topk", topk, 1, settings.max_gallery_topk)
    if gallery in (None, ""):
        chosen: Any = topk
    elif isinstance(gallery, bool) or (truth(gallery) is not None and str(gallery).strip() not in ("0", "1")):
        chosen = (topk if topk is not None else True) if parse_flag("gallery", gallery) else None
        if chosen is None and topk is not None:
            raise InvalidRequestOptionError("topk counts gallery matches, but gallery is off: add gallery=true")
    else:
        chosen = parse_int("gallery", gallery, 0, settings.max_gallery_topk)
        if topk is not None and topk != chosen:
            raise InvalidRequestOptionError(f"gallery={gallery!r} and topk={topk!r} disagree: give one of them")
        chosen = chosen or None  # gallery=0: no gallery
    colormap = parse_colormap(raw.get("colormap") or settings.colormap)
    layer = str(raw.get("layer") or "").strip() or None
    weights = str(raw.get("weights") or "auto").strip().lower()
    if weights not in WEIGHTINGS:
        raise InvalidRequestOptionError(f"unknown FAM weights {weights!r}; choose one of {list(WEIGHTINGS)}")
    if weights != "auto" and method == "gradcam_similarity":
        raise InvalidRequestOptionError(f"weights={weights!r} chooses FAM's channel weights; gradcam_similarity has "
                                        f"its own (Grad-CAM's): drop one of them")
    neighbours = raw.get("neighbours")
    neighbours = None if neighbours in (None, "") else parse_int("neighbours", neighbours, 1, settings.max_gallery_topk)
    if neighbours is not None and weights != "neighbour":
        raise InvalidRequestOptionError("neighbours counts the gallery items neighbour weights average: add "
                                        "weights=neighbour")
    fmt = str(raw.get("format") or "png").strip().lower()
    if fmt not in FORMATS:
        raise InvalidRequestOptionError(f"option 'format' must be one of {list(FORMATS)}, got {fmt!r}")
    return EmbedOptions(similarity, method, chosen, parse_flag("embedding", raw.get("embedding", True)),
                        parse_flag("overlay", raw.get("overlay", False)), colormap, layer, weights, neighbours, fmt)


def prototype_options(raw: Dict[str, Any], settings) -> EmbedOptions:
    """``prototypes=true``: the few-shot episode over the archive's gallery. ``topk`` counts the shots
    shown (default the archive's ``gallery_topk``); the maps are FAM's with Jacobian weights, at the
    last map or at ``layer`` (the relevance route). Options that choose another reference, method or
    weighting are a 400."""
    clash = [k for k in ("gallery", "neighbours", "similarity") if raw.get(k) not in (None, "")]
    if clash:
        raise InvalidRequestOptionError(f"prototypes=true explains the query against the gallery's class prototypes "
                                        f"(nearest centroid) with Jacobian weights; drop {clash}")
    options = parse_embed_options(raw, settings)
    if options.method != "fam":
        raise InvalidRequestOptionError(f"prototypes=true is explained by FAM; method {options.method!r} "
                                        f"is not served for it")
    if options.weights not in ("auto", "jacobian"):
        raise InvalidRequestOptionError(f"prototypes=true uses Jacobian weights (the class-dependent part of the "
                                        f"nearest-centroid score); weights={options.weights!r} is not served for it")
    options.prototypes = options.gallery if options.gallery is not None else True  # topk=k → k shots
    options.gallery = None
    return options


class EmbeddingHandler(CamserveHandler):
    """TorchServe handler for an embedding model: the archive's model spec (EfficientNet-Lite0 features,
    D = 1280, by default)."""

    payload_fields = EMBED_FIELDS
    profile: ModelProfile = EFFNET_LITE0
    embedding_decimals = 5

    def load(self, context) -> None:
        """The archive's model spec (``handler.model``, task ``embed``; EfficientNet-Lite0 features by
        default) as an :class:`EmbeddingModel`, its gallery and the FAM explainer."""
        spec = model_spec(self.settings, self.manifest, "embed")
        loaded = load_spec(spec, self.model_dir, self.device, self.manifest.get("model", {}).get("serializedFile"))
        self.model, self.route = embedding_model_for(loaded)
        self.model.to(self.device)
        features, why = fast_features(self.model, loaded.profile.input_size, runtime_settings(self.settings), self.device)
        if features is not None:  # the feature map on OpenVINO; the head A → embedding stays in PyTorch
            self.model.fast_features = features
        self.map_on_runtime = features is not None
        logger.info("camserve runtime: fast path: %s", why)
        self.profile = loaded.profile
        gallery_path = self.artifact(self.settings.gallery_file)
        self.gallery = Gallery.load(gallery_path, device=self.device) if gallery_path else None
        composite = get_composite(self.settings.composite) if self.settings.composite else None
        self.fam = FamExplainer(self.model, self.gallery, self.profile.input_size, composite=composite,
                                canonizer=self.settings.canonizer, stages=self.profile.stages or None)
        for task, layer in self.settings.task_layers.items():   # a layer the route cannot reach stops the load
            try:
                self.fam.resolve_layer(layer)
            except ExplanationInputError as error:
                raise ValueError(f"handler.task_layers.{task}: {error}") from None
        self.episode, self.episode_problem = None, "this archive has no gallery (the support set of prototypes=true)"
        if self.gallery is not None:   # read-only after load: every request's episode is the same
            try:
                self.episode = episode_from_gallery(self.gallery)
            except InvalidReferenceError as error:
                self.episode_problem = str(error)

    def prepare(self, index: int, request: ParsedRequest) -> List[EmbedItem]:
        items = []
        s = self.settings
        for position, item in enumerate(request.items):
            what = "image" if len(request.items) == 1 else f"image {position}"
            image = decode_image(image_bytes(item.payloads["image"], what), s.max_pixels, what)
            options = parse_embed_options(item.options, s)
            references = [k for k in ("reference", "reference_embedding") if k in item.payloads]
            if len(references) + (options.gallery is not None) > 1:
                raise InvalidRequestOptionError("give at most one of reference, reference_embedding, gallery")
            if options.method is None and (references or options.gallery is not None):
                raise InvalidRequestOptionError("explain=0 asks for no explanation, but the request has a "
                                                "reference or gallery (each is explained): drop one of them")
            task = ("prototypes" if options.prototypes is not None else "pair" if references
                    else "gallery" if options.gallery is not None else None)
            if options.layer is None and task is not None and options.method == "fam":
                options.layer = s.task_layers.get(task)   # the archive's measured best layer for the task
            reference = None
            spec = None
            shots = 0
            prototype_layer = None
            if options.prototypes is not None:
                if references:
                    raise InvalidRequestOptionError(f"prototypes=true explains the query against the gallery's "
                                                    f"class prototypes; drop {references}")
                if self.episode is None:
                    raise MissingInputError(f"prototypes=true: {self.episode_problem}")
                high = min(s.max_gallery_topk, len(self.gallery))
                shots = min(s.gallery_topk, high) if options.prototypes is True else options.prototypes
                shots = parse_int("topk", shots, 1, high)
                if options.layer is not None:
                    resolved = self.fam.resolve_layer(options.layer)  # the engine's 400s, before any forward
                    prototype_layer = resolved.path
            elif "reference" in item.payloads:
                reference = decode_image(image_bytes(item.payloads["reference"], "reference"), s.max_pixels, "reference")
                spec = options.spec()
            elif "reference_embedding" in item.payloads:
                spec = options.spec(reference_embedding=parse_embedding(item.payloads["reference_embedding"]))
            elif options.gallery is not None:
                if self.gallery is None or not len(self.gallery):
                    raise MissingInputError("this archive has no gallery; send a reference or reference_embedding")
                high = min(s.max_gallery_topk, len(self.gallery))
                k = min(s.gallery_topk, high) if options.gallery is True else options.gallery
                k = parse_int("gallery", k, 1, high)
                spec = options.spec(gallery_topk=k)
            if options.layer is not None and not shots:
                if spec is None:
                    raise InvalidRequestOptionError(f"layer={options.layer!r} places the FAM map, but this request "
                                                    f"asks for no explanation (no reference or gallery)")
                resolved = self.fam.resolve_layer(options.layer)  # the engine's 400s, before any forward
                if not resolved.last and spec.method == "gradcam_similarity":
                    raise InvalidRequestOptionError(f"gradcam_similarity is served at the last map only; layer "
                                                    f"{resolved.path!r} lies below it (use method 'fam')")
            if spec is None and not shots and (options.weights != "auto" or options.format != "png"):
                raise InvalidRequestOptionError("weights and format shape a FAM explanation, but this request asks "
                                                "for none (no reference or gallery)")
            items.append(EmbedItem(index, position, image, reference, spec, options.embedding, options.overlay,
                                   options.colormap, options.format, shots, prototype_layer))
        return items

    def run_batch(self, requests: Sequence[Tuple[int, ParsedRequest]], context) -> Dict[int, Any]:
        items, outcomes = self.prepare_all(requests)
        if not items:
            return outcomes
        # one batched call; an unexpected error or out-of-memory is split down to the request causing it
        results, failed = self.run_isolated(items, self.explain_items)
        outcomes.update(failed)
        return self.in_request_order(items, results, outcomes)

    def runtime_of(self, result) -> str:
        """The forward that served a call's rows: the feature map came from OpenVINO (``map_on_runtime``)
        unless a row propagated relevance, which runs the whole batch through the backbone's own modules."""
        relevance = any(fam is not None and fam.route == "relevance" for fam in result.items)
        return OPENVINO if getattr(self, "map_on_runtime", False) and not relevance else EAGER

    def prototype_answer(self, item: EmbedItem, few, deep, batch_seconds: float, rows: int) -> FamAnswer:
        """The few-shot answer of one query: the winning class (``prototype``), the query's map against
        its prototype and the ``item.shots`` shots of that class most similar to the query, each with
        its own map (``reference_map``) under the same weights. Below the last map (``deep``: the FAM
        explanation of :func:`prototype_spec`) the query's map is the relevance route's, and the shots
        carry no map (the gallery keeps their last feature maps only, as for gallery matches)."""
        encode = self.map_encoder(item.format)
        source = deep if deep is not None else few
        shown = source.query_map_layer if item.format == "array" else source.query_map
        order = few.support_similarities.argsort(descending=True)[:item.shots].tolist()
        scores = few.scores.float().cpu().tolist()
        passes = {"forward": 1, "backward": 1}
        if deep is not None:
            passes = {"forward": 2, "backward": 1, "relevance": int(deep.passes.get("relevance", 1))}
        layer_shape = (list(deep.layer_shape) if deep is not None
                       else list(few.query_map_layer.shape[-2:]) if item.prototype_layer else None)
        return FamAnswer(
            similarity=round(float(max(scores)), 6), metric="nearest_centroid",
            method=deep.method if deep is not None else "fam", route=deep.route if deep is not None else "jacobian",
            reference="prototype", query_map=encode(source.query_map, source.query_map_layer), reference_map=None,
            size=[int(shown.shape[-1]), int(shown.shape[-2])], passes=passes,
            seconds=round(batch_seconds / max(rows, 1), 4), batch_seconds=round(batch_seconds, 4),
            layer=item.prototype_layer, layer_shape=layer_shape, weights="jacobian", format=item.format,
            prototype={"label": few.label, "shots": len(few.support_indices),
                       "scores": {c: round(v, 6) for c, v in zip(self.episode.classes, scores)}},
            matches=[FamMatch(index=int(few.support_indices[k]), label=few.label,
                              similarity=round(float(few.support_similarities[k]), 6), query_map=None,
                              reference_map=None if deep is not None
                              else encode(few.support_maps[k], few.support_maps_layer[k]))
                     for k in order])

    def map_encoder(self, fmt: str):
        """``(map at the output size, the same at its own resolution) → answer value``: a base64 PNG of
        the first (``png``), or the second as nested lists rounded to ``handler.array_decimals``
        (``array``); ``None`` stays ``None``."""
        scale = 10 ** self.settings.array_decimals

        def encode(full, layer):
            if full is None:
                return None
            if fmt == "array":
                return (torch.round(layer.float() * scale) / scale).cpu().tolist()
            return b64png(to_uint8(full))
        return encode

    def explain_items(self, items: List[EmbedItem]) -> Dict[Tuple[int, int], EmbeddingAnswer]:
        """One preprocessing and one FAM call for all ``items`` (the few-shot rows: one
        :func:`explain_queries` call of their own); answers keyed by (request, position)."""
        p = self.profile
        pixels = [i.image for i in items] + [i.reference for i in items if i.reference is not None]
        batch, crops = p.model_input(pixels, self.device)
        n = len(items)
        cursor = n
        for item in items:
            if item.reference is not None:
                item.spec.reference_image = batch[cursor]
                cursor += 1
        explained: Dict[int, Tuple[torch.Tensor, Any, str]] = {}   # row → (embedding, explanation, runtime)
        fam_rows = [r for r, item in enumerate(items) if not item.shots]
        shot_rows = [r for r, item in enumerate(items) if item.shots]
        if fam_rows:
            queries = batch[:n] if len(fam_rows) == n else batch[fam_rows]
            result = self.fam.explain(queries, [items[r].spec for r in fam_rows])
            runtime = self.runtime_of(result)
            for k, r in enumerate(fam_rows):
                explained[r] = (result.embeddings[k], result.items[k], runtime)
        shot_seconds = 0.0
        deeper: Dict[int, Any] = {}   # few-shot rows below the last map: row → FAM of the winning prototype
        if shot_rows:
            started = time.perf_counter()
            few = explain_queries(self.model, self.episode, batch[shot_rows])
            for k, r in enumerate(shot_rows):
                explained[r] = (few[k].embedding, few[k], EAGER)
            deep = [(k, r) for k, r in enumerate(shot_rows) if items[r].prototype_layer is not None
                    and not self.fam.resolve_layer(items[r].prototype_layer).last]
            if deep:  # one more forward: the relevance route from the winning prototype to the layer
                result = self.fam.explain(batch[[r for _, r in deep]],
                                          [prototype_spec(self.episode, few[k].label, items[r].prototype_layer)
                                           for k, r in deep])
                deeper = {r: fam for (_, r), fam in zip(deep, result.items)}
            shot_seconds = time.perf_counter() - started
        out: Dict[Tuple[int, int], EmbeddingAnswer] = {}
        seconds, counts = {}, Counter()
        for row, item in enumerate(items):
            embedding, fam, runtime = explained[row]
            height_width = tuple(reversed(image_size(item.image)))
            answer = EmbeddingAnswer(dim=int(embedding.shape[-1]), batch_size=n,
                                     crop_box=crop_box(height_width, p.resize, p.crop),
                                     runtime=runtime)
            if item.include_embedding:
                scale = 10 ** self.embedding_decimals
                answer.embedding = (torch.round(embedding.float() * scale) / scale).cpu().tolist()
            if item.shots:
                answer.fam = self.prototype_answer(item, fam, deeper.get(row), shot_seconds, len(shot_rows))
            elif fam is not None:
                encode = self.map_encoder(item.format)
                shown = fam.query_map_layer if item.format == "array" else fam.query_map
                answer.fam = FamAnswer(
                    similarity=round(float(fam.similarity), 6), metric=fam.metric, method=fam.method,
                    route=fam.route, reference=fam.reference,
                    query_map=encode(fam.query_map, fam.query_map_layer),
                    reference_map=encode(fam.reference_map, fam.reference_map_layer),
                    size=[int(shown.shape[-1]), int(shown.shape[-2])],
                    passes=dict(fam.passes), seconds=round(fam.seconds, 4),
                    batch_seconds=round(getattr(fam, "batch_seconds", 0.0) or fam.seconds, 4),
                    layer=fam.layer, layer_shape=list(fam.layer_shape) if fam.layer is not None else None,
                    weights=fam.weights, neighbours=fam.neighbours, format=item.format)
                if fam.matches is not None:
                    answer.fam.matches = [FamMatch(
                        index=int(m["index"]), label=m["label"], similarity=round(float(m["similarity"]), 6),
                        query_map=encode(m["query_map"], m["query_map_layer"]),
                        reference_map=encode(m["reference_map"], m["reference_map_layer"]),
                    ) for m in fam.matches]
            if answer.fam is not None:   # a FAM pair or match list, or a few-shot episode: both have query_map
                if self.summarising:
                    pair = [fam.query_map] + ([fam.reference_map] if getattr(fam, "reference_map", None) is not None
                                              else [])
                    answer.fam.summaries = summarise(torch.stack([m.float() for m in pair]))
                if item.overlay:
                    answer.fam.overlay = b64png(overlay(fam.query_map[None], crops[row:row + 1], item.colormap,
                                                        self.settings.overlay_alpha)[0])
                share = shot_seconds / len(shot_rows) if item.shots else fam.seconds
                seconds[answer.fam.method] = seconds.get(answer.fam.method, 0.0) + share  # the rows' shares, summed
                counts[answer.fam.method] += 1
            out[(item.request, item.position)] = answer
        record_explanations(self.context, seconds, counts)
        return out
