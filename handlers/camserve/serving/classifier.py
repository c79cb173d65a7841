"""The image-classifier handler: top-k predictions and, per request, an explanation from the same pass.

Batch flow (:meth:`ClassifierHandler.run_batch`):

1. per request, per image: decode (limits), parse options, validate the :class:`ExplainSpec` against
   the model (method, layer, target, method options) — a failure fails only that request;
2. all valid images → one ``to_model_input`` on the device → **one** ``Explainer.explain`` with one
   spec per image (``None`` for plain predictions) at layer resolution;
3. per image: softmax top-k, maps encoded as asked (PNG at the model input's size, array, colour,
   overlay over the crop), crop box in original pixels, passes and time.

An image asking ``compare=<m1>,<m2>`` is validated the same way (every method, layer, option and
target before any forward) but runs outside the batched call: :func:`camserve.engine.compare.compare`
explains it with each method in its own call (each explanation's ``seconds`` is its whole cost) and
its answer carries ``explanations`` (one per method, maps at the model input's size) and
``comparison`` (methods, target, seconds, Spearman ρ matrix over pixels).

Captum baselines (``captum.*``) are capped by the ``handler.captum`` section of ``model-config.yaml``
(:class:`~camserve.engine.captum_methods.CaptumLimits`: ``max_steps``, ``max_samples``,
``max_internal_batch_size``, ``max_evaluations``); a request beyond a cap is a 400.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.captum_methods import CaptumLimits
from ..engine.compare import compare, comparison_json
from ..engine.errors import ExplanationInputError
from ..engine.explainer import Explainer
from ..engine.models import EFFNET_LITE0, ModelProfile, imagenet_class_names, load_effnet_lite0
from ..engine.preprocess import crop_box, to_model_input
from ..engine.targets import validate_target
from .base import CamserveHandler
from .encode import heatmap_fields, top_predictions
from .errors import InvalidRequestOptionError, MissingInputError
from .images import b64decode, decode_image, image_size
from .metrics import record_explanations
from .options import ExplainOptions, parse_options
from .requests import ParsedRequest

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One image ready for the batch: decoded pixels, options and where it came from."""

    request: int
    position: int
    image: torch.Tensor
    options: ExplainOptions


def image_bytes(payload: Any, what: str = "image") -> bytes:
    """Raw bytes stay bytes; text (JSON, text parts) is base64."""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return b64decode(payload, what)
    raise MissingInputError(f"{what}: expected image bytes or a base64 string, got {type(payload).__name__}")


def build_explainer(model, profile: ModelProfile, default_layer: Optional[str], max_targets: int) -> Explainer:
    return Explainer(model, (profile.crop, profile.crop), default_layer=default_layer or profile.default_layer,
                     max_topk=max_targets)


def captum_limits(section: Any) -> CaptumLimits:
    """The ``handler.captum`` caps of ``model-config.yaml`` (absent: Captum's defaults); unknown keys or
    non-positive values are a configuration error that stops the worker from loading."""
    section = dict(section or {})
    known = set(CaptumLimits.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"handler.captum: unknown key(s) {unknown}; known: {sorted(known)}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in section.values()):
        raise ValueError(f"handler.captum: caps must be positive integers, got {section}")
    return CaptumLimits(**section)


class ImageClassifierHandler(CamserveHandler):
    """TorchServe handler for an ImageNet classifier (EfficientNet-Lite0 by default)."""

    profile: ModelProfile = EFFNET_LITE0

    def load(self, context) -> None:
        weights = self.serialized_file()
        self.model = load_effnet_lite0(weights_path=weights, device=self.device)
        self.labels = imagenet_class_names()
        self.explainer = build_explainer(self.model, self.profile, self.settings.default_layer,
                                         self.settings.max_targets)
        self.explainer.captum_limits = captum_limits(self.settings.extra.get("captum"))

    # -- per image ----------------------------------------------------------------------------
    def prepare(self, index: int, request: ParsedRequest) -> List[Prepared]:
        prepared = []
        for position, item in enumerate(request.items):
            what = "image" if len(request.items) == 1 else f"image {position}"
            pixels = decode_image(image_bytes(item.payloads["image"], what), self.settings.max_pixels, what)
            options = parse_options(item.options, self.settings, request.explain_route)
            for spec in options.compare or [s for s in [options.spec()] if s is not None]:
                self.explainer._plan(0, spec)  # the engine's own validation, before any forward
            if options.compare:
                self.check_compare_target(options.target)
            prepared.append(Prepared(index, position, pixels, options))
        return prepared

    def check_compare_target(self, target: Any) -> None:
        """A comparison explains one class per method: the predicted one (``top1``) or an index."""
        normalised = validate_target(target, self.explainer.num_classes, self.explainer.max_topk)
        if isinstance(normalised, list) or (isinstance(normalised, str) and normalised != "top1"):
            raise InvalidRequestOptionError(f"compare explains one target per method: use target=top1 or a class "
                                            f"index, got target={target!r}")

    # -- batch --------------------------------------------------------------------------------
    def run_batch(self, requests: Sequence[Tuple[int, ParsedRequest]], context) -> Dict[int, Any]:
        images, outcomes = self.prepare_all(requests)
        if not images:
            return outcomes
        batched = [p for p in images if not p.options.compare]
        results: Dict[Tuple[int, int], Dict[str, Any]] = {}
        try:
            if batched:
                results = self.explain_images(batched)
        except ExplanationInputError:
            # cannot happen after per-image validation; answer request by request to isolate it
            logger.warning("batch failed validation; retrying request by request", exc_info=True)
            results = {}
            for index in dict.fromkeys(p.request for p in batched):
                own = [p for p in batched if p.request == index]
                try:
                    results.update(self.explain_images(own))
                except Exception as error:  # noqa: BLE001
                    outcomes[index] = self._guard(error)
        for prepared in images:
            if prepared.options.compare and prepared.request not in outcomes:
                try:
                    results[(prepared.request, prepared.position)] = self.compare_image(prepared)
                except Exception as error:  # noqa: BLE001 - isolated per request
                    outcomes[prepared.request] = self._guard(error)
        return self.in_request_order(images, results, outcomes)

    def explain_images(self, images: List[Prepared]) -> Dict[Tuple[int, int], Dict[str, Any]]:
        """One preprocessing and one engine call for all ``images``; results keyed by (request, position)."""
        p = self.profile
        start = time.perf_counter()
        batch, crops = to_model_input([i.image for i in images], p.resize, p.crop, p.mean, p.std, self.device)
        specs = [i.options.spec() for i in images]
        result = self.explainer.explain(batch, specs, layer_resolution=True)
        probabilities = torch.softmax(result.logits.float(), dim=-1)
        engine_seconds = time.perf_counter() - start
        out: Dict[Tuple[int, int], Dict[str, Any]] = {}
        seconds_by_method: Dict[str, float] = {}
        counts: Counter = Counter()
        for row, (prepared, explanation) in enumerate(zip(images, result.explanations)):
            width, height = image_size(prepared.image)
            answer: Dict[str, Any] = {
                "predictions": top_predictions(probabilities[row], self.labels, prepared.options.topk),
                "batch_size": len(images),
            }
            if explanation is not None:
                answer["explanation"] = self.explanation_json(
                    explanation, prepared.options, crops[row:row + 1], (height, width), len(images))
                seconds_by_method[explanation.method] = explanation.seconds
                counts[explanation.method] += 1
            out[(prepared.request, prepared.position)] = answer
        record_explanations(self.context, seconds_by_method, counts)
        logger.info("camserve batch of %d images (%d explained) in %.3f s", len(images), sum(counts.values()),
                    engine_seconds)
        return out

    def compare_image(self, prepared: Prepared) -> Dict[str, Any]:
        """Explain one image with each compared method (one engine call each) and correlate the maps."""
        p = self.profile
        batch, crops = to_model_input([prepared.image], p.resize, p.crop, p.mean, p.std, self.device)
        comparison = compare(self.explainer, batch, prepared.options.compare, output_size=(p.crop, p.crop))
        width, height = image_size(prepared.image)
        probabilities = torch.softmax(comparison.logits.float(), dim=-1)
        answer = {
            "predictions": top_predictions(probabilities[0], self.labels, prepared.options.topk),
            "batch_size": 1,
            "explanations": [self.explanation_json(e, prepared.options, crops, (height, width), 1)
                             for e in comparison.explanations],
            "comparison": comparison_json(comparison),
        }
        record_explanations(self.context, {e.method: e.seconds for e in comparison.explanations},
                            Counter(e.method for e in comparison.explanations))
        logger.info("camserve comparison of %s in %.3f s", comparison.methods, sum(comparison.seconds))
        return answer

    def explanation_json(self, explanation, options: ExplainOptions, crop01: torch.Tensor,
                         original_hw: Tuple[int, int], batch_size: int) -> Dict[str, Any]:
        p = self.profile
        body: Dict[str, Any] = {
            "method": explanation.method,
            "layer": explanation.layer,
            "target": explanation.targets[0],
            "targets": list(explanation.targets),
            "labels": [self.labels[t] for t in explanation.targets],
            "format": options.format,
            "layer_shape": list(explanation.layer_shape),
        }
        body.update(heatmap_fields(explanation.maps, crop01, options, (p.crop, p.crop), self.settings.array_decimals))
        if options.colormap:
            body["colormap"] = options.colormap
        body.update({
            "crop_box": crop_box(original_hw, p.resize, p.crop),
            "image_size": [original_hw[1], original_hw[0]],
            "options": dict(explanation.options),
            "passes": dict(explanation.passes),
            "seconds": round(explanation.seconds, 4),
            "batch_size": batch_size,
        })
        return body
