"""The image-classifier handler: top-k predictions and, per request, an explanation from the same pass.

Batch flow (:meth:`ClassifierHandler.run_batch`):

1. per request, per image: decode (limits), parse options, validate the :class:`ExplainSpec` against
   the model (method, layer, target, method options) — a failure fails only that request;
2. all valid images → one ``to_model_input`` on the device → **one** ``Explainer.explain`` with one
   spec per image (``None`` for plain predictions) at layer resolution;
3. per image: its :class:`~camserve.serving.answer.ClassifierAnswer` — softmax top-k, maps encoded as
   asked (PNG at the model input's size, array, colour, overlay over the crop), crop box in original
   pixels, passes and time.

An image asking ``compare=<m1>,<m2>`` is validated the same way (every method, layer, option and
target before any forward) but runs outside the batched call: :func:`camserve.engine.comparison.compare`
explains it with each method in its own call (each explanation's ``seconds`` is its whole cost) and
its answer carries ``explanations`` (one per method, maps at the model input's size) and
``comparison`` (methods, target, seconds, Spearman ρ matrix over pixels).

Captum baselines (``captum.*``) are capped by the ``handler.captum`` section of ``model-config.yaml``
(:class:`~camserve.engine.CaptumLimits`: ``max_steps``, ``max_samples``,
``max_internal_batch_size``, ``max_evaluations``); a request beyond a cap is a 400. The batch as a
whole is bounded by ``max_batch_evaluations`` (:meth:`ImageClassifierHandler.budget`): requests are
admitted in batch order while their model evaluations (a Captum row: evaluations × targets; a
``compare``: each method's, at least 1) fit; the rest are answered 503 with ``Retry-After`` (sent
again they land in a later batch), and a request that alone exceeds the cap is a 400.

Faults are isolated with :meth:`CamserveHandler.run_isolated`: the batched call, and each compare
request on its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

from camserve.engine.methods import REGISTRY
from camserve.engine import CaptumLimits
from camserve.engine.comparison import compare, comparison_json
from camserve.engine.pipeline import Explainer
from camserve.engine.runtime import configure_runtime
from camserve.engine.models import EFFNET_LITE0, ModelProfile, labels_for, load_spec, profile_with_layers
from camserve.engine.imaging.preprocess import crop_box
from camserve.engine.imaging.summary import summarise
from camserve.engine.core.targets import validate_target
from camserve.engine.timing import clock
from camserve.serving.answer import (ClassifierAnswer, ComparisonAnswer, ExplanationAnswer, Prediction, RenderedMaps,
                                     summary_entries)
from camserve.serving.base import BatchBudgetExceededError, CamserveHandler
from camserve.serving.errors import InvalidRequestOptionError, MissingInputError
from camserve.serving.images import b64decode, decode_image, image_size
from camserve.serving.monitor import MonitorSettings
from camserve.ops.drift_monitor import DriftMonitor
from camserve.ops.metrics import record_explanations
from camserve.serving.options import ExplainOptions, parse_options
from camserve.serving.requests import ParsedRequest
from camserve.serving.settings import HandlerSettings, model_spec, runtime_settings
from camserve.ops.metrics import record_counters

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


def build_explainer(model, profile: ModelProfile, settings: HandlerSettings) -> Explainer:
    """The served explainer (:meth:`Explainer.for_profile`) with the archive's settings: default layer,
    targets cap, Captum caps, ``graph_rows``, LRP composite and canonizer (``handler.runtime`` is
    checked here and applied by :func:`serving_explainer`)."""
    runtime_settings(settings)
    return Explainer.for_profile(model, profile, settings.default_layer, composite=settings.composite,
                                 max_topk=settings.max_targets, captum_limits=captum_limits(settings.extra.get("captum")),
                                 graph_rows=settings.graph_rows, canonizer=settings.canonizer)


def serving_explainer(model, profile: ModelProfile, settings: HandlerSettings, device: torch.device) -> Explainer:
    """:func:`build_explainer` run the way ``handler.runtime`` asks (:func:`~camserve.engine.runtime.configure_runtime`:
    memory format measured or set, the fast path for the rows that need only the last map and the
    head when it can be built); the log says what was chosen and why."""
    explainer = build_explainer(model, profile, settings)
    logger.info("camserve runtime: %s", configure_runtime(explainer, runtime_settings(settings), device))
    return explainer


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
    limits = CaptumLimits(**section)
    if limits.max_batch_evaluations < limits.max_evaluations:
        raise ValueError(f"handler.captum: max_batch_evaluations ({limits.max_batch_evaluations}) must be ≥ "
                         f"max_evaluations ({limits.max_evaluations}), or a request within the caps could never run")
    return limits


def calibration_scores(settings: HandlerSettings, model_dir: str) -> List[Dict[str, Any]]:
    """The calibrated readings of ``handler.calibration`` (a ``calibration.json`` in the model dir
    written by ``camserve calibrate``): its ``scores``, each ``{method, layer, options (resolved),
    overall, vs_layercam, sem, n}``; ``[]`` when the section names none. A named file that is missing
    or unreadable is a configuration error that stops the worker from loading."""
    name = settings.extra.get("calibration")
    if not name:
        return []
    path = os.path.join(model_dir, str(name))
    try:
        with open(path, encoding="utf-8") as f:
            scores = json.load(f).get("scores")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"handler.calibration {name!r}: cannot read it from the model dir ({error})") from None
    if not isinstance(scores, list):
        raise ValueError(f"handler.calibration {name!r}: no 'scores' list (not a camserve calibrate model card)")
    return scores


def calibrated(scores: Sequence[Dict[str, Any]], method: str, layer: str, options: Dict[str, Any]) -> Any:
    """``{overall, vs_layercam, sem, n}`` of the calibrated reading equal to (method, layer, resolved
    options), else ``None``."""
    plain = json.loads(json.dumps(dict(options), default=str))
    for score in scores:
        if score.get("method") == method and score.get("layer") == layer and score.get("options") == plain:
            return {key: score.get(key) for key in ("overall", "vs_layercam", "sem", "n")}
    return None


class ImageClassifierHandler(CamserveHandler):
    """TorchServe handler for an image classifier: the archive's model spec (EfficientNet-Lite0 by default)."""

    profile: ModelProfile = EFFNET_LITE0

    def load(self, context) -> None:
        """Build the archive's model from its spec (``handler.model``; the bundled EfficientNet-Lite0
        when absent), the explainer (one probe forward: layers, stages, class count) and the labels."""
        spec = model_spec(self.settings, self.manifest, "classify")
        loaded = load_spec(spec, self.model_dir, self.device, self.manifest.get("model", {}).get("serializedFile"))
        self.model = loaded.module
        self.explainer = serving_explainer(self.model, loaded.profile, self.settings, self.device)
        self.profile = profile_with_layers(loaded.profile, self.explainer.catalog)
        self.labels = labels_for(spec, self.model_dir, self.explainer.num_classes)
        self.calibration = calibration_scores(self.settings, self.model_dir)

    def initialize(self, context) -> None:
        super().initialize(context)
        self.monitor = MonitorSettings.from_config(self.settings, self.explainer, self.audit is not None)
        self.drift = DriftMonitor.from_settings(self.settings.extra["monitor"], self.model_name, self.monitor.method,
                                                self.monitor.layer) if self.monitor is not None else None

    # -- per image ----------------------------------------------------------------------------
    def prepare(self, index: int, request: ParsedRequest) -> List[Prepared]:
        prepared = []
        for position, item in enumerate(request.items):
            what = "image" if len(request.items) == 1 else f"image {position}"
            pixels = decode_image(image_bytes(item.payloads["image"], what), self.settings.max_pixels, what)
            options = parse_options(item.options, self.settings, request.explain_route)
            for spec in options.compare or [s for s in [options.spec()] if s is not None]:
                self.explainer.validate(spec)  # the engine's own validation, before any forward
            if options.compare:
                self.check_compare_target(options.target)
            prepared.append(Prepared(index, position, pixels, options))
        return prepared

    def after_batch(self, answered, context) -> None:
        """The audit log's records (:meth:`CamserveHandler.after_batch`), then the monitored maps to the
        drift monitor and its latest score out as the ``ExplanationDrift`` gauge."""
        super().after_batch(answered, context)
        drift = getattr(self, "drift", None)
        if drift is None:
            return
        for _index, _request, outcome in answered:
            if isinstance(outcome, list):
                for answer in outcome:
                    drift.observe(getattr(answer, "monitored", None) or ())
        if not math.isnan(drift.score):
            record_counters(context, {}, gauges={"ExplanationDrift": round(drift.score, 4)})

    def check_compare_target(self, target: Any) -> None:
        """A comparison explains one class per method: the predicted one (``top1``) or an index."""
        normalised = validate_target(target, self.explainer.num_classes, self.explainer.max_topk)
        if isinstance(normalised, list) or (isinstance(normalised, str) and normalised != "top1"):
            raise InvalidRequestOptionError(f"compare explains one target per method: use target=top1 or a class "
                                            f"index, got target={target!r}")

    # -- batch --------------------------------------------------------------------------------
    def run_batch(self, requests: Sequence[Tuple[int, ParsedRequest]], context) -> Dict[int, Any]:
        deadline = clock(self.device) + self.retry_window_s  # fault retries end in time for responseTimeout
        images, outcomes = self.prepare_all(requests)
        outcomes.update(self.budget(images))
        images = [p for p in images if p.request not in outcomes]
        if not images:
            return outcomes
        batched = [p for p in images if not p.options.compare]
        # one batched engine call; a failure is split down to the request(s) that cause it
        results, failed = self.run_isolated(batched, self.explain_images, deadline=deadline)
        outcomes.update(failed)
        for index in dict.fromkeys(p.request for p in images if p.options.compare):
            if index in outcomes:
                continue
            own = [p for p in images if p.request == index]  # compare runs per request, serially
            done, failed = self.run_isolated(own, self.compare_images, deadline=deadline)
            results.update(done)
            outcomes.update(failed)
        return self.in_request_order(images, results, outcomes)

    def evaluations(self, prepared: Prepared) -> int:
        """Model evaluations one image costs against ``max_batch_evaluations``: a Captum row its
        ``steps × nt_samples`` (or ``nt_samples``, or 1) per target; a ``compare`` each method's own
        (non-Captum methods 1); CAM-family rows 0 (they share the batch's one forward/backward)."""
        compared = bool(prepared.options.compare)
        specs = prepared.options.compare or [s for s in [prepared.options.spec()] if s is not None]
        limits = self.explainer.captum_limits
        total = 0
        for spec in specs:
            method = REGISTRY.lookup(spec.method)
            if method.family != "captum":
                total += 1 if compared else 0
                continue
            _, options = method.resolve(spec.options, limits)
            per_target = method.evaluations(options)
            target = validate_target(spec.target, self.explainer.num_classes, self.explainer.max_topk)
            targets = len(target) if isinstance(target, list) else (
                int(target[3:]) if isinstance(target, str) and target.startswith("top") else 1)
            total += per_target * targets
        return total

    def budget(self, images: Sequence[Prepared]) -> Dict[int, Exception]:
        """Admit requests in batch order while their evaluations fit ``max_batch_evaluations``; the
        others get a 503 (:class:`BatchBudgetExceededError`), a request over the cap on its own a 400."""
        limits = self.explainer.captum_limits
        cap = limits.max_batch_evaluations
        cost: Dict[int, int] = {}
        refused: Dict[int, Exception] = {}
        for prepared in images:
            try:
                cost[prepared.request] = cost.get(prepared.request, 0) + self.evaluations(prepared)
            except Exception as error:  # noqa: BLE001 - isolated per request (validated before: unexpected)
                refused[prepared.request] = self._guard(error)
        for index in refused:
            cost.pop(index, None)
        used = 0
        for index, evaluations in cost.items():
            if evaluations > cap:
                refused[index] = InvalidRequestOptionError(
                    f"this request would evaluate the model {evaluations} times (Captum steps × samples × targets, "
                    f"each compare method at least once); this server's cap per batch is max_batch_evaluations={cap}")
            elif used + evaluations > cap:
                refused[index] = BatchBudgetExceededError(
                    f"this batch's work budget is spent: the request needs {evaluations} model evaluations and "
                    f"{cap - used} of max_batch_evaluations={cap} are left; send it again (Retry-After: 1 s)")
            else:
                used += evaluations
        if refused:
            record_counters(getattr(self, "context", None), {"BatchBudgetRejected": len(refused)})
        return refused

    def compare_images(self, images: List[Prepared]) -> Dict[Tuple[int, int], ClassifierAnswer]:
        """:meth:`compare_image` for each image, keyed by (request, position)."""
        return {(p.request, p.position): self.compare_image(p) for p in images}

    def explain_images(self, images: List[Prepared]) -> Dict[Tuple[int, int], ClassifierAnswer]:
        """One preprocessing and one engine call for all ``images``; answers keyed by (request, position)."""
        p = self.profile
        start = clock(self.device)
        batch, crops = p.model_input([i.image for i in images], self.device)
        specs = [i.options.spec() for i in images]
        monitor = getattr(self, "monitor", None)
        monitored = [spec is None and monitor is not None and monitor.draw() for spec in specs]
        specs = [monitor.spec() if drawn else spec for spec, drawn in zip(specs, monitored)]
        result = self.explainer.explain(batch, specs, layer_resolution=True)
        probabilities = torch.softmax(result.logits.float(), dim=-1)
        engine_seconds = clock(self.device) - start
        out: Dict[Tuple[int, int], ClassifierAnswer] = {}
        seconds_by_method: Dict[str, float] = {}
        counts: Counter = Counter()
        for row, (prepared, explanation) in enumerate(zip(images, result.explanations)):
            width, height = image_size(prepared.image)
            answer = ClassifierAnswer(Prediction.top(probabilities[row], self.labels, prepared.options.topk),
                                      batch_size=len(images), runtime=result.path(row))
            if monitored[row]:  # a plain answer: the map's summary is recorded, not answered
                answer.monitored = summary_entries(summarise(explanation.maps), explanation.method,
                                                   explanation.layer, explanation.targets)
            elif explanation is not None:
                answer.explanation = self.explanation_answer(
                    explanation, prepared.options, crops[row:row + 1], (height, width), len(images))
                # each row's share of the batch's passes, summed per method (not the batch's time per row)
                seconds_by_method[explanation.method] = seconds_by_method.get(explanation.method, 0.0) + explanation.seconds
                counts[explanation.method] += 1
            out[(prepared.request, prepared.position)] = answer
        record_explanations(self.context, seconds_by_method, counts)
        logger.info("camserve batch of %d images (%d explained) in %.3f s", len(images), sum(counts.values()),
                    engine_seconds)
        return out

    def compare_image(self, prepared: Prepared) -> ClassifierAnswer:
        """Explain one image with each compared method (one engine call each) and correlate the maps."""
        p = self.profile
        batch, crops = p.model_input([prepared.image], self.device)
        comparison = compare(self.explainer, batch, prepared.options.compare, output_size=(p.crop, p.crop))
        width, height = image_size(prepared.image)
        probabilities = torch.softmax(comparison.logits.float(), dim=-1)
        answer = ClassifierAnswer(
            Prediction.top(probabilities[0], self.labels, prepared.options.topk), batch_size=1,
            explanations=[self.explanation_answer(e, prepared.options, crops, (height, width), 1)
                          for e in comparison.explanations],
            comparison=ComparisonAnswer.from_json(comparison_json(comparison)))
        seconds: Dict[str, float] = {}
        for e in comparison.explanations:  # each method's own call (a method named twice: both)
            seconds[e.method] = seconds.get(e.method, 0.0) + e.seconds
        record_explanations(self.context, seconds,
                            Counter(e.method for e in comparison.explanations))
        logger.info("camserve comparison of %s in %.3f s", comparison.methods, sum(comparison.seconds))
        return answer

    def explanation_answer(self, explanation, options: ExplainOptions, crop01: torch.Tensor,
                           original_hw: Tuple[int, int], batch_size: int) -> ExplanationAnswer:
        """The engine's explanation of one image as its typed answer: maps rendered as the request asked
        (at the model input's size), crop box in original pixels, times rounded to 0.1 ms."""
        p = self.profile
        return ExplanationAnswer(
            method=explanation.method, layer=explanation.layer, targets=list(explanation.targets),
            labels=[self.labels[t] for t in explanation.targets], layer_shape=list(explanation.layer_shape),
            maps=RenderedMaps.render(explanation.maps, crop01, options, (p.crop, p.crop), self.settings.array_decimals),
            colormap=options.colormap or None, crop_box=crop_box(original_hw, p.resize, p.crop),
            image_size=[original_hw[1], original_hw[0]], options=dict(explanation.options),
            passes=dict(explanation.passes), seconds=round(explanation.seconds, 4),
            batch_seconds=round(getattr(explanation, "batch_seconds", 0.0) or explanation.seconds, 4),
            batch_size=batch_size, summaries=summarise(explanation.maps) if self.summarising else None,
            calibration=calibrated(getattr(self, "calibration", ()), explanation.method, explanation.layer,
                                   dict(explanation.options)))
