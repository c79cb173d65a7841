"""The typed answers of one page submission, laid out for the page (plain JSON, no tensors).

A classifier: ``predictions`` (top-k), the grid's axes (``methods`` × ``layers``), one ``cell`` per
method and layer (its maps, one per explained class, as base64 PNGs at the model input's size, with
the ``crop_box`` that places them on the photograph) or the server's error for it, the
``comparisons`` (Spearman ρ of the methods at a layer) and ``notes``. An embedding model: one ``pair``
per method and reference (similarity, the FAM query/reference maps, gallery ``matches``) or its error.
When no request was answered at all, the first refusal is the page's answer (:class:`ViewError`
with the server's status and message).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from camserve.client import CamserveError
from camserve.serving.answer import ClassifierAnswer, EmbeddingAnswer, ExplanationAnswer
from camserve.view.backend import Outcome
from camserve.view.choices import Choices, Planned
from camserve.view.errors import ViewError


def refused(error: CamserveError) -> Dict[str, Any]:
    """A refused request's part of the page: the server's status (``None``: no answer) and message."""
    return {"status": error.status, "error": error.message}


def first_refusal(outcomes: Sequence[Outcome]) -> Optional[ViewError]:
    """When every request was refused: the first refusal as the page's answer (502: no server answer)."""
    if not outcomes or not all(isinstance(o, CamserveError) for o in outcomes):
        return None
    error = outcomes[0]
    status = error.status if error.status is not None and 400 <= error.status < 600 else 502
    return ViewError(status, error.message)


def cell(method: str, layer: str, explanation: ExplanationAnswer) -> Dict[str, Any]:
    """One grid cell: the method's maps at the layer (one per target) and where they sit on the photo."""
    maps = explanation.maps
    return {"method": method, "layer": layer, "resolved_layer": explanation.layer,
            "layer_shape": list(explanation.layer_shape), "size": list(maps.size),
            "crop_box": list(explanation.crop_box), "image_size": list(explanation.image_size),
            "seconds": explanation.seconds,
            "maps": [{"target": target, "label": label, "png": png}
                     for target, label, png in zip(explanation.targets, explanation.labels, maps.heatmaps or [])]}


def classifier_page(choices: Choices, planned: Sequence[Planned], outcomes: Sequence[Outcome]) -> Dict[str, Any]:
    """The classifier's page JSON (see the module docstring)."""
    predictions: List[Dict[str, Any]] = []
    cells: List[Dict[str, Any]] = []
    comparisons: List[Dict[str, Any]] = []
    for plan, outcome in zip(planned, outcomes):
        if isinstance(outcome, CamserveError):
            cells += [{"method": m, "layer": plan.layer, **refused(outcome)} for m in plan.methods]
            continue
        if not isinstance(outcome, ClassifierAnswer):
            raise ViewError(502, f"the server answered with a {type(outcome).__name__}, not a classifier's answer")
        predictions = predictions or [p.to_json() for p in outcome.predictions]
        explanations = outcome.explanations or ([outcome.explanation] if outcome.explanation else [])
        cells += [cell(m, plan.layer, e) for m, e in zip(plan.methods, explanations)]
        if outcome.comparison is not None:
            c = outcome.comparison
            label = next((e.labels[0] for e in explanations if e.labels), str(c.target))
            comparisons.append({"layer": plan.layer, "resolved_layer": explanations[0].layer if explanations else "",
                                "methods": list(c.methods), "target": c.target, "label": label,
                                "spearman": [list(row) for row in c.spearman], "seconds": list(c.seconds)})
    return {"task": "classify", "predictions": predictions, "methods": list(choices.methods),
            "layers": list(choices.layers), "target": choices.target, "cells": cells,
            "comparisons": comparisons, "notes": choices.notes()}


def embedding_page(choices: Choices, planned: Sequence[Planned], outcomes: Sequence[Outcome]) -> Dict[str, Any]:
    """The embedding model's page JSON (see the module docstring)."""
    reference_box = next((list(o.crop_box) for p, o in zip(planned, outcomes)
                          if p.kind == "reference" and isinstance(o, EmbeddingAnswer)), None)
    pairs: List[Dict[str, Any]] = []
    dim = None
    for plan, outcome in zip(planned, outcomes):
        if plan.kind == "reference":
            continue
        if isinstance(outcome, CamserveError):
            pairs.append({"method": plan.methods[0], "kind": plan.kind, **refused(outcome)})
            continue
        if not isinstance(outcome, EmbeddingAnswer) or outcome.fam is None:
            raise ViewError(502, "the server answered without a FAM explanation: is this an embedding model?")
        fam, dim = outcome.fam, outcome.dim
        pairs.append({"method": plan.methods[0], "kind": plan.kind, "similarity": fam.similarity,
                      "metric": fam.metric, "route": fam.route, "size": list(fam.size),
                      "query_map": fam.query_map, "reference_map": fam.reference_map,
                      "crop_box": list(outcome.crop_box), "reference_crop_box": reference_box,
                      "seconds": fam.seconds,
                      "matches": [{"index": m.index, "label": m.label, "similarity": m.similarity,
                                   "query_map": m.query_map, "reference_map": m.reference_map}
                                  for m in fam.matches or ()]})
    return {"task": "embed", "dim": dim, "methods": list(choices.methods), "pairs": pairs, "notes": choices.notes()}


def page_json(choices: Choices, planned: Sequence[Planned], outcomes: Sequence[Outcome]) -> Dict[str, Any]:
    """The page's JSON for the answers of ``planned``; every request refused → that :class:`ViewError`."""
    refusal = first_refusal([o for p, o in zip(planned, outcomes) if p.kind != "reference"])
    if refusal is not None:
        raise refusal
    if choices.task == "embed":
        return embedding_page(choices, planned, outcomes)
    return classifier_page(choices, planned, outcomes)
