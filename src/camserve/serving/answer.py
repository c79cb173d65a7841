"""Typed answers: what the servers (TorchServe, the KServe predictor) and ``camserve batch`` say about
one image, built once per image and written out by each door.

One concept per type:

- :class:`Prediction` — one of the top-k classes: ``index``, ``label``, ``score`` (softmax probability);
- :class:`RenderedMaps` — an explanation's maps as sent: PNGs (grayscale, colour, overlay) or arrays;
- :class:`ExplanationAnswer` — one classifier explanation (method, layer, targets, maps, crop box …);
- :class:`ComparisonAnswer` — the ``comparison`` of a ``compare=`` answer (methods, target, seconds, ρ);
- :class:`ClassifierAnswer` — one image's classifier answer: predictions and an explanation, or a
  comparison (one explanation per method);
- :class:`FamMatch` / :class:`FamAnswer` / :class:`EmbeddingAnswer` — the embedding model's answer:
  the embedding and, with a reference or a gallery, its FAM explanation and matches.

Every image answer has three writers, one per door, and they are the only places where the field
names of each door are spelled:

- ``to_json()`` — the JSON answer of the plain and KServe v1 envelopes (and the JSON-in-BYTES v2 form);
- ``to_v2_tensors()`` — its KServe v2 (Open Inference Protocol) named output tensors, no batch
  dimension (:func:`camserve.serving.encode.v2_outputs` stacks a request's images);
- ``to_audit_record()`` — the answer's part of an audit record (:func:`camserve.ops.audit.record_answers`),
  ``None`` when it explains nothing.

``from_json`` reads an answer back (``camserve batch --server`` reads the server's answers with it);
``Prediction.from_json`` also reads the batch records of earlier versions (``{class, name, prob}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from camserve.engine.imaging.render import colorize, overlay, upsample
from camserve.engine.imaging.summary import MapSummary
from camserve.ops.audit import Base64
from camserve.serving.display import Displayable, Panel, classifier_panels, embedding_panels
from camserve.serving.encode import Tensor, b64png, dumps, flat, stack, tensor
from camserve.serving.protocol import PNG

JSON_TEXT = {"content_type": "application/json"}


def _extra_tensors(extra: Mapping[str, Any], out: Dict[str, Tensor]) -> None:
    """Fields the answer type does not model (kept from a newer server's JSON) keep their name:
    numbers, strings and lists of them as tensors of their own type, anything else as JSON text."""
    for key, value in extra.items():
        if key in out or value is None:
            continue
        if isinstance(value, dict) or not all(isinstance(v, (bool, int, float, str)) for v in flat(value)):
            out[key] = tensor(dumps(value), "BYTES", JSON_TEXT)
        else:
            out[key] = tensor(value)


def _several(single: str, values: Optional[List[Any]], body: Dict[str, Any]) -> None:
    """The first value under the singular name; with several, all of them under the plural one."""
    if values is None:
        return
    body[single] = values[0]
    if len(values) > 1:
        body[single + "s"] = list(values)


def _read_several(body: Mapping[str, Any], single: str) -> Optional[List[Any]]:
    if body.get(single + "s") is not None:
        return list(body[single + "s"])
    return None if body.get(single) is None else [body[single]]


def summary_entries(summaries: Optional[Sequence[MapSummary]], method: str, layer: Optional[str],
                    targets: Sequence[Any]) -> List[Dict[str, Any]]:
    """The records' form of map summaries: ``{method, layer, target, …the summary}``, one per map."""
    return [{"method": method, "layer": layer, "target": target, **summary.to_json()}
            for summary, target in zip(summaries or (), targets)]


def _as_b64(values: Sequence[Any]) -> List[Any]:
    """Encoded maps for the audit writer: base64 PNG text as :class:`Base64` (decoded off the request
    thread), arrays as they are."""
    return [Base64(v) if isinstance(v, str) else v for v in values]


# -- predictions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes of an image: ``index`` (class index), ``label`` (class name, the index
    as text when the label map has none) and ``score`` (softmax probability, 6 decimals)."""

    index: int
    label: str
    score: float

    @staticmethod
    def top(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> List["Prediction"]:
        """The top-``k`` of one image's softmax ``(C,)`` (like TorchServe's ImageClassifier)."""
        scores, indices = probabilities.topk(min(k, probabilities.shape[-1]))
        return [Prediction(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), round(float(s), 6))
                for s, i in zip(scores.tolist(), indices.tolist())]

    def to_json(self) -> Dict[str, Any]:
        return {"index": self.index, "label": self.label, "score": self.score}

    @classmethod
    def from_json(cls, body: Mapping[str, Any], labels: Sequence[str] = ()) -> "Prediction":
        """``{index, label, score}``; also the batch records of earlier versions, ``{class, name, prob}``.
        A missing label is taken from ``labels`` (else the index as text)."""
        index = int(body["index"] if "index" in body else body.get("class", -1))
        label = body.get("label", body.get("name"))
        if label is None:
            label = labels[index] if 0 <= index < len(labels) else str(index)
        return cls(index, str(label), float(body["score"] if "score" in body else body.get("prob", 0.0)))


def predictions_tensors(predictions: Sequence[Prediction]) -> Dict[str, Tensor]:
    return {"scores": tensor([p.score for p in predictions], "FP32"),
            "indices": tensor([p.index for p in predictions], "INT64"),
            "labels": tensor([p.label for p in predictions], "BYTES")}


# -- classifier explanations ----------------------------------------------------------------------


@dataclass
class RenderedMaps:
    """An explanation's maps as the request asked for them, one entry per target.

    ``format`` ``png``: ``heatmaps`` (base64 8-bit grayscale PNGs at the model input's size),
    ``heatmap_colors`` (RGB renderings, with ``colormap``) and ``overlays`` (the colour map blended over
    the model-input crop, with ``overlay=1``); ``format`` ``array``: ``arrays`` (the maps at layer
    resolution, nested lists rounded to the archive's decimals). ``size``: ``[width, height]`` of the maps.
    """

    format: str
    size: List[int]
    heatmaps: Optional[List[str]] = None
    heatmap_colors: Optional[List[str]] = None
    overlays: Optional[List[str]] = None
    arrays: Optional[List[Any]] = None

    @classmethod
    def render(cls, maps: torch.Tensor, crop01: Optional[torch.Tensor], options, output_size,
               decimals: int) -> "RenderedMaps":
        """Encode ``maps`` ``(k, h, w)`` (layer resolution, [0, 1]) as the request asked, on their device.

        ``format=png``: 8-bit grayscale PNGs at ``output_size``; ``colormap`` adds an RGB rendering,
        ``overlay=1`` the colour map blended over the model-input crop ``crop01`` (the request's
        ``colormap``, else ``options.default_colormap``: the archive's ``handler.colormap``).
        ``format=array``: the maps at layer resolution rounded to ``decimals``."""
        if options.format == "array":
            arrays = torch.round(maps.float() * 10 ** decimals) / 10 ** decimals
            return cls("array", [int(maps.shape[-1]), int(maps.shape[-2])], arrays=arrays.cpu().tolist())
        full = upsample(maps, tuple(output_size))
        rendered = cls("png", [int(full.shape[-1]), int(full.shape[-2])], heatmaps=[b64png(m) for m in full])
        if options.colormap:
            rendered.heatmap_colors = [b64png(c) for c in colorize(full, options.colormap)]
        if options.overlay and crop01 is not None:
            colormap = options.colormap or getattr(options, "default_colormap", None) or "jet"
            blended = overlay(full, crop01.expand(full.shape[0], -1, -1, -1), colormap, options.alpha)
            rendered.overlays = [b64png(b) for b in blended]
        return rendered

    def encoded(self) -> List[Any]:
        """The maps themselves, one per target: the grayscale PNGs, else the arrays."""
        return list(self.heatmaps if self.heatmaps is not None else self.arrays or [])

    def to_json(self) -> Dict[str, Any]:
        """``array``/``arrays`` + ``size``, or ``size`` + ``heatmap``/``heatmaps`` (+ ``heatmap_color(s)``,
        ``overlay(s)``): the singular name holds the first target's, the plural all (several targets)."""
        body: Dict[str, Any] = {}
        if self.arrays is not None:
            _several("array", self.arrays, body)
            body["size"] = list(self.size)
            return body
        body["size"] = list(self.size)
        _several("heatmap", self.heatmaps, body)
        _several("heatmap_color", self.heatmap_colors, body)
        _several("overlay", self.overlays, body)
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "RenderedMaps":
        arrays = _read_several(body, "array")
        return cls(str(body.get("format") or ("array" if arrays is not None else "png")),
                   list(body.get("size") or []), heatmaps=_read_several(body, "heatmap"),
                   heatmap_colors=_read_several(body, "heatmap_color"), overlays=_read_several(body, "overlay"),
                   arrays=arrays)

    def to_v2_tensors(self) -> Dict[str, Tensor]:
        """``heatmap_array`` (FP32), ``heatmap``/``heatmap_color``/``overlay`` (base64 PNG BYTES), each
        with a leading target dimension, then ``size``."""
        out: Dict[str, Tensor] = {}
        if self.arrays is not None:
            out["heatmap_array"] = tensor(list(self.arrays), "FP32")
        for name, pngs in (("heatmap", self.heatmaps), ("heatmap_color", self.heatmap_colors),
                           ("overlay", self.overlays)):
            if pngs is not None:
                out[name] = tensor(list(pngs), "BYTES", PNG)
        out["size"] = tensor(list(self.size), "INT64")
        return out


@dataclass
class ExplanationAnswer:
    """One classifier explanation of one image.

    ``method``, ``layer`` (resolved names); ``targets`` (class indices explained, one map each) and
    their ``labels``; ``layer_shape`` (``[h, w]`` of the maps at layer resolution); ``maps``
    (:class:`RenderedMaps`, which carries ``format`` and ``size``); ``colormap`` (the request's, if it
    asked for one); ``crop_box`` (the model input's crop in original pixels, ``[x0, y0, x1, y1]``) and
    ``image_size`` (``[width, height]`` of the original); ``options`` (the method options used);
    ``passes`` (forward/backward/relevance passes of the image's share); ``seconds`` (the image's share
    of the explanation time), ``batch_seconds`` (the batched call's) and ``batch_size`` (images in it).
    ``summaries``: one :class:`~camserve.engine.imaging.summary.MapSummary` per target when the server
    keeps records (the audit log) — for the records only, never in the answer a client gets.
    ``calibration``: when the archive was calibrated (``camserve calibrate``) and this (method, layer,
    options) is a calibrated reading, its report-half score ``{overall, vs_layercam, sem, n}``
    (``overall = mean_i (AUC(ins_i) − (AUC(del0_i) + AUC(delB_i)) / 2)``, ``vs_layercam`` the paired
    mean difference to LayerCAM at that layer, ``sem`` its standard error over the ``n`` images);
    absent otherwise (answers of uncalibrated archives are unchanged).
    """

    method: str
    layer: str
    targets: List[int]
    labels: List[str]
    layer_shape: List[int]
    maps: RenderedMaps
    crop_box: List[float]
    image_size: List[int]
    options: Dict[str, Any] = field(default_factory=dict)
    passes: Dict[str, int] = field(default_factory=dict)
    seconds: Optional[float] = None
    batch_seconds: Optional[float] = None
    batch_size: Optional[int] = None
    colormap: Optional[str] = None
    summaries: Optional[List[MapSummary]] = field(default=None, compare=False, repr=False)
    calibration: Optional[Dict[str, Any]] = None

    @property
    def format(self) -> str:
        return self.maps.format

    @property
    def target(self) -> int:
        return self.targets[0]

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"method": self.method, "layer": self.layer, "target": self.target,
                                "targets": list(self.targets), "labels": list(self.labels), "format": self.format,
                                "layer_shape": list(self.layer_shape)}
        body.update(self.maps.to_json())
        if self.colormap:
            body["colormap"] = self.colormap
        body.update({"crop_box": list(self.crop_box), "image_size": list(self.image_size),
                     "options": dict(self.options), "passes": dict(self.passes)})
        for name in ("seconds", "batch_seconds", "batch_size"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.calibration is not None:
            body["calibration"] = dict(self.calibration)
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "ExplanationAnswer":
        targets = body.get("targets")
        if targets is None:
            target = body.get("target")
            targets = target if isinstance(target, list) else ([] if target is None else [target])
        return cls(method=body.get("method"), layer=body.get("layer"), targets=[int(t) for t in targets],
                   labels=list(body.get("labels") or []), layer_shape=list(body.get("layer_shape") or []),
                   maps=RenderedMaps.from_json(body), crop_box=list(body.get("crop_box") or []),
                   image_size=list(body.get("image_size") or []), options=dict(body.get("options") or {}),
                   passes=dict(body.get("passes") or {}), seconds=body.get("seconds"),
                   batch_seconds=body.get("batch_seconds"), batch_size=body.get("batch_size"),
                   colormap=body.get("colormap"), calibration=body.get("calibration"))

    def to_v2_tensors(self) -> Dict[str, Tensor]:
        """``method``, ``layer``, ``colormap``, ``targets``, ``target_labels``, ``layer_shape``, the maps
        (:meth:`RenderedMaps.to_v2_tensors`), ``crop_box``, ``image_size``, ``options`` (JSON text),
        ``passes_<kind>``, ``seconds``, ``batch_seconds``, ``calibration`` (JSON text, when calibrated)
        (``target`` is ``targets[0]``, ``format`` is
        implied by ``heatmap`` vs ``heatmap_array``, ``batch_size`` is the image's)."""
        out: Dict[str, Tensor] = {"method": tensor(str(self.method), "BYTES"),
                                  "layer": tensor(str(self.layer), "BYTES")}
        if self.colormap:
            out["colormap"] = tensor(str(self.colormap), "BYTES")
        out["targets"] = tensor(list(self.targets), "INT64")
        out["target_labels"] = tensor(list(self.labels), "BYTES")
        out["layer_shape"] = tensor(list(self.layer_shape), "INT64")
        out.update(self.maps.to_v2_tensors())
        out["crop_box"] = tensor(list(self.crop_box), "FP32")
        out["image_size"] = tensor(list(self.image_size), "INT64")
        if self.options:
            out["options"] = tensor(dumps(self.options), "BYTES", JSON_TEXT)
        for kind, count in self.passes.items():
            out[f"passes_{kind}"] = tensor(int(count), "INT64")
        if self.seconds is not None:
            out["seconds"] = tensor(float(self.seconds), "FP32")
        if self.batch_seconds is not None:
            out["batch_seconds"] = tensor(float(self.batch_seconds), "FP32")
        if self.calibration is not None:
            out["calibration"] = tensor(dumps(self.calibration), "BYTES", JSON_TEXT)
        return out


@dataclass
class ComparisonAnswer:
    """The ``comparison`` of a ``compare=<m1>,<m2>…`` answer: ``methods`` (in the request's order),
    ``target`` (the one class every method explains), ``seconds`` (each method's own call) and
    ``spearman`` (the methods × methods Spearman ρ of their maps, ``None`` where undefined)."""

    methods: List[str]
    target: int
    seconds: List[float]
    spearman: List[List[Optional[float]]]

    def to_json(self) -> Dict[str, Any]:
        return {"methods": list(self.methods), "target": self.target, "seconds": list(self.seconds),
                "spearman": [list(row) for row in self.spearman]}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "ComparisonAnswer":
        return cls(list(body.get("methods") or []), body.get("target"), list(body.get("seconds") or []),
                   [list(row) for row in body.get("spearman") or []])

    def to_v2_tensors(self) -> Dict[str, Tensor]:
        """``spearman`` (FP32 methods × methods; as JSON text, ``null`` kept, when a ρ is undefined — a
        constant map — since FP32 has no JSON spelling for it), ``comparison_target``, ``comparison_seconds``."""
        rows = [list(row) for row in self.spearman]
        undefined = any(value is None for row in rows for value in row)
        out: Dict[str, Tensor] = {"spearman": tensor(dumps(rows), "BYTES", JSON_TEXT) if undefined
                                  else tensor(rows, "FP32")}
        if self.target is not None:
            out["comparison_target"] = tensor(int(self.target), "INT64")
        out["comparison_seconds"] = tensor(list(self.seconds), "FP32")
        return out


@dataclass
class ClassifierAnswer(Displayable):
    """One image's answer from the image classifier.

    ``predictions`` (top-k :class:`Prediction`); ``batch_size`` (images in the engine call); ``runtime``
    (the forward that served the image: ``"eager"``, or ``"openvino"`` for the fast path of
    :mod:`camserve.engine.runtime.fast_path`); then either
    ``explanation`` (an :class:`ExplanationAnswer`, when one was asked for) or, for ``compare=``,
    ``explanations`` (one per method, same target) and ``comparison`` (:class:`ComparisonAnswer`).
    ``extra``: fields this type does not know (read from a newer server's JSON), kept in order.
    ``monitored``: the summaries of a plain request's map drawn for monitoring (``handler.monitor``) —
    recorded, never answered. Shown in a notebook, or with ``show()``, as its top-k and maps (:mod:`camserve.serving.display`)."""

    predictions: List[Prediction]
    batch_size: Optional[int] = None
    explanation: Optional[ExplanationAnswer] = None
    explanations: Optional[List[ExplanationAnswer]] = None
    comparison: Optional[ComparisonAnswer] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    monitored: Optional[List[Dict[str, Any]]] = field(default=None, compare=False, repr=False)
    runtime: Optional[str] = None

    KEYS = ("predictions", "batch_size", "runtime", "explanation", "explanations", "comparison")

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"predictions": [p.to_json() for p in self.predictions]}
        if self.batch_size is not None:
            body["batch_size"] = self.batch_size
        if self.runtime is not None:
            body["runtime"] = self.runtime
        if self.explanation is not None:
            body["explanation"] = self.explanation.to_json()
        if self.explanations is not None:
            body["explanations"] = [e.to_json() for e in self.explanations]
        if self.comparison is not None:
            body["comparison"] = self.comparison.to_json()
        body.update({k: v for k, v in self.extra.items() if k not in body})
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any], labels: Sequence[str] = ()) -> "ClassifierAnswer":
        """An answer's JSON form (a one-image list is unwrapped); labels missing from a prediction come
        from ``labels``."""
        if isinstance(body, list) and len(body) == 1:
            body = body[0]
        if not isinstance(body, Mapping):
            raise ValueError(f"expected a JSON object, got {type(body).__name__}")
        explanation, explanations = body.get("explanation"), body.get("explanations")
        return cls([Prediction.from_json(p, labels) for p in body.get("predictions") or []], body.get("batch_size"),
                   ExplanationAnswer.from_json(explanation) if explanation else None,
                   [ExplanationAnswer.from_json(e) for e in explanations] if explanations is not None else None,
                   ComparisonAnswer.from_json(body["comparison"]) if body.get("comparison") else None,
                   {k: v for k, v in body.items() if k not in cls.KEYS}, runtime=body.get("runtime"))

    def panels(self) -> List[Panel]:
        """The maps as pictures: each explained target's, or each compared method's."""
        return classifier_panels(self, self._images[0])

    @property
    def explained(self) -> Optional[ExplanationAnswer]:
        """The explanation (the first method's for a comparison), or ``None``."""
        return self.explanation or (self.explanations[0] if self.explanations else None)

    def to_v2_tensors(self) -> Dict[str, Tensor]:
        """``scores``, ``indices``, ``labels``, ``batch_size``, ``runtime``, the explanation's tensors; for a comparison
        every explanation tensor gets a leading method dimension (``crop_box``, ``image_size``: one per
        image) and the comparison's tensors follow."""
        out = predictions_tensors(self.predictions)
        if self.batch_size is not None:
            out["batch_size"] = tensor(self.batch_size, "INT64")
        if self.runtime is not None:
            out["runtime"] = tensor(self.runtime, "BYTES")
        if self.explanation is not None:
            out.update(self.explanation.to_v2_tensors())
        if self.explanations is not None:
            stacked = stack([e.to_v2_tensors() for e in self.explanations])
            for name in ("crop_box", "image_size"):  # the same for every method: one per image
                if name in stacked:
                    first = stacked.pop(name)
                    width = len(first.data) // first.shape[0]
                    stacked[name] = Tensor(first.datatype, first.shape[1:], first.data[:width], first.parameters)
            out.update(stacked)
            if self.comparison is not None:
                out.update(self.comparison.to_v2_tensors())
        _extra_tensors(self.extra, out)
        return out

    def to_audit_record(self) -> Optional[Dict[str, Any]]:
        """``kind`` (``explanation`` | ``compare`` | ``monitor``), ``heatmaps`` (the encoded maps),
        ``explanation_seconds``, ``options`` (method, layer, targets, options, format; for a comparison:
        compare, target, layers, method_options, format), ``topk`` (the predictions), ``batch_size``,
        ``summaries`` (one per map, when the server summarised them) and, for a comparison,
        ``comparison`` (seconds, spearman); ``monitor``: a plain prediction whose map was drawn for
        monitoring (summaries only); ``None`` for a plain prediction."""
        topk = [p.to_json() for p in self.predictions]
        if self.explanation is not None:
            e = self.explanation
            return {"kind": "explanation", "heatmaps": _as_b64(e.maps.encoded()), "explanation_seconds": e.seconds,
                    "options": {"method": e.method, "layer": e.layer, "targets": list(e.targets),
                                "options": dict(e.options), "format": e.format},
                    "topk": topk, "batch_size": self.batch_size,
                    "summaries": summary_entries(e.summaries, e.method, e.layer, e.targets)}
        if self.explanations and self.comparison is not None:
            c = self.comparison
            return {"kind": "compare", "heatmaps": _as_b64([h for e in self.explanations for h in e.maps.encoded()]),
                    "explanation_seconds": round(sum(float(e.seconds or 0) for e in self.explanations), 4),
                    "options": {"compare": list(c.methods), "target": c.target,
                                "layers": [e.layer for e in self.explanations],
                                "method_options": [dict(e.options) for e in self.explanations],
                                "format": self.explanations[0].format},
                    "topk": topk, "batch_size": self.batch_size,
                    "summaries": [entry for e in self.explanations
                                  for entry in summary_entries(e.summaries, e.method, e.layer, e.targets)],
                    "comparison": {"seconds": list(c.seconds), "spearman": [list(r) for r in c.spearman]}}
        if self.monitored:
            first = self.monitored[0]
            return {"kind": "monitor", "heatmaps": [], "explanation_seconds": None,
                    "options": {"method": first["method"], "layer": first["layer"]}, "topk": topk,
                    "batch_size": self.batch_size, "summaries": list(self.monitored)}
        return None


# -- embedding model --------------------------------------------------------------------------------


@dataclass
class FamMatch:
    """One gallery match: ``index`` and ``label`` of the gallery entry, ``similarity`` to the query, and
    the FAM pair (``query_map``, ``reference_map``: base64 PNGs, or nested lists with ``format=array``;
    the reference map may be ``None``)."""

    index: int
    label: str
    similarity: float
    query_map: Any
    reference_map: Any = None

    def to_json(self) -> Dict[str, Any]:
        return {"index": self.index, "label": self.label, "similarity": self.similarity,
                "query_map": self.query_map, "reference_map": self.reference_map}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "FamMatch":
        return cls(int(body["index"]), str(body["label"]), float(body["similarity"]), body["query_map"],
                   body.get("reference_map"))


@dataclass
class FamAnswer:
    """The FAM explanation of a query against its reference (an image, an embedding or the gallery's
    best match): ``similarity`` and its ``metric``; ``method`` (``fam``, ``fam-jacobian``,
    ``gradcam_similarity``) and ``route``; ``reference`` (what the reference was: image, embedding,
    gallery); ``query_map``/``reference_map`` (base64 PNGs at the model input's size, ``size``
    ``[width, height]``; ``reference_map`` ``None`` without a reference image); ``passes``, ``seconds``
    (the image's share), ``batch_seconds``; ``overlay`` (with ``overlay=1``); ``matches`` (gallery);
    ``summaries`` (the query's and the reference's map, when the server keeps records; never answered);
    ``layer``, ``layer_shape`` (when the request named a layer: the module path and the map's ``[h, w]``);
    ``weights`` (the channel weighting of the FAM family that drew the maps: ``product``, ``sfam``,
    ``neighbour``, ``jacobian``, or ``gradcam`` for the baseline) and ``neighbours`` (neighbour weights:
    the gallery items averaged and their label); ``prototype`` (``prototypes=true``: the few-shot
    episode over the archive's gallery — ``label`` the winning class, ``scores`` ``−‖q̃ − p_c‖²`` per
    class, ``shots`` its support images; ``matches`` then lists the shots shown, each with its map as
    ``reference_map`` and no ``query_map`` of its own); ``format``: ``png`` (the maps as base64 PNGs at the
    model input's size) or ``array`` (nested lists at the map's own resolution, ``size`` then that
    resolution's ``[width, height]``)."""

    similarity: float
    metric: str
    method: str
    route: str
    reference: Optional[str]
    query_map: Any
    reference_map: Any
    size: List[int]
    passes: Dict[str, int] = field(default_factory=dict)
    seconds: Optional[float] = None
    batch_seconds: Optional[float] = None
    overlay: Optional[str] = None
    matches: Optional[List[FamMatch]] = None
    summaries: Optional[List[MapSummary]] = field(default=None, compare=False, repr=False)
    layer: Optional[str] = None
    layer_shape: Optional[List[int]] = None
    weights: Optional[str] = None
    neighbours: Optional[Dict[str, Any]] = None
    format: str = "png"
    prototype: Optional[Dict[str, Any]] = None

    KEYS = ("similarity", "metric", "method", "route", "reference", "weights", "neighbours", "prototype", "layer",
            "layer_shape", "format", "query_map", "reference_map", "size", "passes", "seconds", "batch_seconds",
            "overlay", "matches")

    def to_json(self) -> Dict[str, Any]:
        body = {"similarity": self.similarity, "metric": self.metric, "method": self.method, "route": self.route,
                "reference": self.reference}
        if self.weights is not None:
            body["weights"] = self.weights
        if self.neighbours is not None:
            body["neighbours"] = dict(self.neighbours)
        if self.prototype is not None:
            body["prototype"] = dict(self.prototype)
        if self.layer is not None:
            body["layer"] = self.layer
            body["layer_shape"] = list(self.layer_shape or [])
        body.update({"format": self.format, "query_map": self.query_map, "reference_map": self.reference_map,
                     "size": list(self.size),
                     "passes": dict(self.passes), "seconds": self.seconds, "batch_seconds": self.batch_seconds})
        if self.overlay is not None:
            body["overlay"] = self.overlay
        if self.matches is not None:
            body["matches"] = [m.to_json() for m in self.matches]
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "FamAnswer":
        matches = body.get("matches")
        return cls(body.get("similarity"), body.get("metric"), body.get("method"), body.get("route"),
                   body.get("reference"), body.get("query_map"), body.get("reference_map"),
                   list(body.get("size") or []), dict(body.get("passes") or {}), body.get("seconds"),
                   body.get("batch_seconds"), body.get("overlay"),
                   [FamMatch.from_json(m) for m in matches] if matches is not None else None,
                   layer=body.get("layer"), layer_shape=body.get("layer_shape"), weights=body.get("weights"),
                   neighbours=body.get("neighbours"), prototype=body.get("prototype"),
                   format=body.get("format") or ("array" if isinstance(body.get("query_map"), list) else "png"))

    def maps(self) -> List[str]:
        """Every map of the explanation: the pair, then each match's pair (absent ones left out)."""
        maps = [self.query_map, self.reference_map]
        for match in self.matches or ():
            maps += [match.query_map, match.reference_map]
        return [m for m in maps if m]


@dataclass
class EmbeddingAnswer(Displayable):
    """One image's answer from the embedding model: ``dim`` (D), ``batch_size``, ``runtime`` (the forward
    that served it, as for the classifier), ``embedding`` (D floats,
    5 decimals; ``None`` with ``embedding=0``), ``crop_box`` (the model input's crop in original pixels)
    and, with a reference or a gallery, ``fam`` (:class:`FamAnswer`). ``extra``: fields this type does
    not know (read from a newer server's JSON). Shown in a notebook, or with ``show()``, as its FAM maps."""

    dim: int
    batch_size: Optional[int]
    crop_box: List[float]
    embedding: Optional[List[float]] = None
    fam: Optional[FamAnswer] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    runtime: Optional[str] = None

    KEYS = ("dim", "batch_size", "runtime", "embedding", "crop_box")

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"dim": self.dim, "batch_size": self.batch_size}
        if self.runtime is not None:
            body["runtime"] = self.runtime
        if self.embedding is not None:
            body["embedding"] = list(self.embedding)
        body["crop_box"] = list(self.crop_box)
        if self.fam is not None:
            body.update(self.fam.to_json())
        body.update({k: v for k, v in self.extra.items() if k not in body})
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "EmbeddingAnswer":
        fam = FamAnswer.from_json(body) if body.get("query_map") is not None else None
        known = cls.KEYS + (FamAnswer.KEYS if fam is not None else ())
        return cls(int(body["dim"]), body.get("batch_size"), list(body.get("crop_box") or []), body.get("embedding"),
                   fam, {k: v for k, v in body.items() if k not in known}, runtime=body.get("runtime"))

    def panels(self) -> List[Panel]:
        """The FAM maps as pictures: the query's, the reference's, each gallery match's."""
        return embedding_panels(self, *self._images)

    def to_v2_tensors(self) -> Dict[str, Tensor]:
        """``embedding``, ``dim``, ``batch_size``, ``runtime``; with FAM ``similarity``, ``metric``, ``route``,
        ``reference``, ``layer``/``layer_shape`` (a named layer), ``method``, ``query_map``, ``reference_map``, ``overlay``, ``size``,
        ``passes_<kind>``, ``seconds``, ``prototype`` (JSON text), the matches (``match_index``, ``match_label``,
        ``match_similarity``, ``match_query_map``, ``match_reference_map`` when every match has one); then ``crop_box`` and
        ``batch_seconds``."""
        out: Dict[str, Tensor] = {}
        if self.embedding is not None:
            out["embedding"] = tensor(list(self.embedding), "FP32")
        out["dim"] = tensor(self.dim, "INT64")
        if self.batch_size is not None:
            out["batch_size"] = tensor(self.batch_size, "INT64")
        if self.runtime is not None:
            out["runtime"] = tensor(self.runtime, "BYTES")
        fam = self.fam
        if fam is not None:
            for name, datatype in (("similarity", "FP32"), ("metric", "BYTES"), ("route", "BYTES"),
                                   ("reference", "BYTES"), ("weights", "BYTES"), ("layer", "BYTES"),
                                   ("layer_shape", "INT64")):
                if getattr(fam, name) is not None:
                    out[name] = tensor(getattr(fam, name), datatype)
            if fam.neighbours is not None:
                out["neighbours"] = tensor(dumps(fam.neighbours), "BYTES", JSON_TEXT)
            if fam.prototype is not None:
                out["prototype"] = tensor(dumps(fam.prototype), "BYTES", JSON_TEXT)
            out["method"] = tensor(str(fam.method), "BYTES")
            arrays = fam.format == "array"
            for name in ("query_map", "reference_map", "overlay"):
                if getattr(fam, name) is not None:
                    out[name + ("_array" if arrays and name != "overlay" else "")] = (
                        tensor(getattr(fam, name), "FP32") if arrays and name != "overlay"
                        else tensor(getattr(fam, name), "BYTES", PNG))
            out["size"] = tensor(list(fam.size), "INT64")
            for kind, count in fam.passes.items():
                out[f"passes_{kind}"] = tensor(int(count), "INT64")
            if fam.seconds is not None:
                out["seconds"] = tensor(float(fam.seconds), "FP32")
            if fam.matches is not None:
                matches = fam.matches
                out["match_index"] = tensor([m.index for m in matches], "INT64")
                out["match_label"] = tensor([str(m.label) for m in matches], "BYTES")
                out["match_similarity"] = tensor([m.similarity for m in matches], "FP32")
                suffix, datatype, parameters = ("_array", "FP32", None) if arrays else ("", "BYTES", PNG)
                if all(m.query_map is not None for m in matches):
                    out["match_query_map" + suffix] = tensor([m.query_map for m in matches], datatype, parameters)
                if all(m.reference_map is not None for m in matches):
                    out["match_reference_map" + suffix] = tensor([m.reference_map for m in matches], datatype,
                                                                 parameters)
        out["crop_box"] = tensor(list(self.crop_box), "FP32")
        if fam is not None and fam.batch_seconds is not None:
            out["batch_seconds"] = tensor(float(fam.batch_seconds), "FP32")
        _extra_tensors(self.extra, out)
        return out

    def to_audit_record(self) -> Optional[Dict[str, Any]]:
        """``kind`` ``embedding``, ``heatmaps`` (the FAM pair and each match's), ``explanation_seconds``,
        ``options`` (method, metric, route, reference), ``topk`` (``None``), ``batch_size``, ``summaries``
        (the query's and the reference's map, when summarised),
        ``similarity`` and ``matches`` (index, label, similarity each; ``None`` without a gallery);
        ``None`` for a plain embedding."""
        fam = self.fam
        if fam is None or (fam.query_map is None and not fam.matches):
            return None
        return {"kind": "embedding", "heatmaps": _as_b64(fam.maps()), "explanation_seconds": fam.seconds,
                "options": {"method": fam.method, "metric": fam.metric, "route": fam.route, "reference": fam.reference},
                "topk": None, "batch_size": self.batch_size, "similarity": fam.similarity,
                "summaries": summary_entries(fam.summaries, fam.method, None, ("query", "reference")),
                "matches": [{"index": m.index, "label": m.label, "similarity": m.similarity}
                            for m in fam.matches or ()] or None}

