"""``camserve batch --task embed --gallery G.npz``: explain a folder of images *against a gallery*.

An embedding model has no classes, so an embedding run answers the retrieval question an audit
asks of it: for every image, which gallery items does the model find most similar, and what in the
image made it find them? Per image, one batched FAM call (:class:`~camserve.engine.FamExplainer`)
embeds it, ranks the gallery by similarity and draws the query's map against each of the top-k
matches; the run writes those maps exactly as a classifier run writes its per-target maps:

- ``--target topK`` — the k best matches (default ``top1``); the record's ``topk`` lists them as
  ``{index: gallery item, label: its label, score: the similarity}`` and ``targets`` / ``target_names``
  are the matched items and their labels, so ``report.html``, the Parquet file and resuming work
  unchanged;
- ``--method`` — ``fam`` (default) or ``gradcam_similarity``; ``--layer`` — a layer below the last map
  (module path or ``stageN``) for FAM's relevance route; ``--option key=value`` — the other
  :class:`~camserve.engine.FamSpec` fields (``similarity=dot``, ``route=jacobian`` …);
- ``--method prototypes`` — few-shot classification instead of retrieval: the gallery is the support
  set of a SimpleShot episode (its labels the classes, :func:`~camserve.engine.episode_from_gallery`),
  each image's ``topk`` the K classes with the best nearest-centroid scores ``{index: class, label,
  score}``, its one map the query's against the winning prototype (``targets`` = that class; FAM with
  Jacobian weights, at the last map or at ``--layer`` by the relevance route); no ``--option``;
- the gallery file's sha256 is part of the model version, so the settings id (the resume key) changes
  with the gallery.

Refused with a clear message: a target that is not ``topK``, an option FAM does not have,
``--scores`` (the deletion scores are defined on a class score), ``--server`` (TorchServe's embedding
endpoint answers one reference per request; a gallery run is local or ``--ray``). The same backend
serves a local run and every ``--ray`` actor: :func:`local_backend` picks it for ``--task embed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from camserve.cli.batch_steps import DEFAULT_MODEL, Item, LocalBackend, Result, run_device, spec_model_version
from camserve.commands.model_args import load_for_cli, spec_from_args
from camserve.engine import (FamExplainer, FamSpec, Gallery, InvalidReferenceError, episode_from_gallery, explain_queries,
                             prototype_spec)
from camserve.engine.errors import InvalidOptionError
from camserve.engine.imaging.preprocess import crop_box
from camserve.engine.models.loader import embedding_model_for
from camserve.engine.runtime import RUNTIME_ENV, RuntimeSettings
from camserve.engine.runtime.embedding_features import fast_features
from camserve.engine.timing import clock
from camserve.serving.answer import Prediction

logger = logging.getLogger(__name__)

#: FamSpec fields a batch run sets itself (the reference is the gallery; method and layer have flags)
_FIXED_FIELDS = {"reference_image", "reference_embedding", "gallery_topk", "method", "layer"}
EMBED_METHODS = ("fam", "gradcam_similarity", "prototypes")


def is_embedding_run(args: argparse.Namespace) -> bool:
    """``--task embed``, or a ``--gallery`` given without a task."""
    task = getattr(args, "task", None)
    return task == "embed" or (task is None and getattr(args, "gallery", None) is not None)


def check_embedding_args(args: argparse.Namespace) -> None:
    """The refusals of an embedding run that need no model (``SystemExit`` with the reason)."""
    if getattr(args, "gallery", None) is None:
        raise SystemExit("camserve batch: an embedding run (--task embed) explains each image against its best "
                         "gallery matches: give --gallery FILE (.npz or .pt, e.g. written by camserve gallery)")
    if not Path(args.gallery).is_file():
        raise SystemExit(f"camserve batch: --gallery {args.gallery}: no such file")
    if getattr(args, "server", None):
        raise SystemExit("camserve batch: --server explains with a classifier archive; an embedding run against a "
                         "gallery runs locally or with --ray")
    if getattr(args, "scores", False):
        raise SystemExit("camserve batch: --scores measures deletion/insertion of a class score; an embedding run "
                         "has none (use camserve evaluate-embedding for similarity maps' faithfulness)")
    method = (args.method or "fam").lower()
    if method not in EMBED_METHODS:
        raise SystemExit(f"camserve batch: --method {args.method!r} is not an embedding method; "
                         f"choose from {', '.join(EMBED_METHODS)}")
    if method == "prototypes" and getattr(args, "option", None):
        raise SystemExit("camserve batch: --method prototypes explains each image against the gallery's class "
                         "prototypes with Jacobian weights: drop --option")


def run_method_and_layer(args: argparse.Namespace, backend) -> tuple:
    """``(method, layer)`` of a run: the flags, else ``fam`` at the map the embedding pools (``""``) for an
    embedding run and ``shallowcam`` at the profile's default layer for a classifier."""
    if is_embedding_run(args):
        return (args.method or "fam").lower(), args.layer or ""
    layer = args.layer
    if layer is None:
        layer = (backend.profile.default_layer or "") if backend.profile is not None else ""
    return (args.method or "shallowcam").lower(), layer


def matches_wanted(target: str) -> int:
    """``top1`` / ``topK`` → K (the gallery matches explained per image)."""
    found = re.fullmatch(r"top(\d+)", str(target).strip().lower())
    if not found or int(found.group(1)) < 1:
        raise InvalidOptionError(f"an embedding run explains each image against its best gallery matches: "
                                 f"--target must be topK (K ≥ 1), got {target!r}")
    return int(found.group(1))


def fam_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """``--option key=value`` pairs → :class:`FamSpec` keyword arguments (numbers as numbers)."""
    known = {f.name for f in dataclasses.fields(FamSpec)} - _FIXED_FIELDS
    out = {}
    for key, value in options.items():
        if key not in known:
            raise InvalidOptionError(f"option {key!r} is not a FAM option of a gallery run; known: {sorted(known)}")
        text = str(value)
        out[key] = int(text) if re.fullmatch(r"-?\d+", text) else float(text) if re.fullmatch(r"-?\d*\.\d+", text) \
            else text
    return out


class EmbeddingBackend:
    """The embedding model and its gallery in this process: one batched FAM call per batch of images."""

    def __init__(self, args: argparse.Namespace):
        self.device = run_device(args)
        self.description = f"local:{self.device}"
        spec, _config = spec_from_args(args, task_default="embed")
        loaded = load_for_cli(spec, self.device)
        self.model, self.route = embedding_model_for(loaded)
        self.model.to(self.device)
        self.profile = loaded.profile
        self.gallery = Gallery.load(str(args.gallery), device=self.device)
        if not len(self.gallery):
            raise SystemExit(f"camserve batch: --gallery {args.gallery} has no items")
        self.fam = FamExplainer(self.model, self.gallery, self.profile.input_size, stages=self.profile.stages or None)
        try:   # the few-shot episode of --method prototypes: read-only once built
            self.episode, self.episode_problem = episode_from_gallery(self.gallery), None
        except InvalidReferenceError as error:
            self.episode, self.episode_problem = None, str(error)
        self._fast = None
        gallery_digest = hashlib.sha256(Path(args.gallery).read_bytes()).hexdigest()[:12]
        self.model_version = f"{spec_model_version(spec)}+gallery:{gallery_digest}"
        self.model_name = args.model if args.model != DEFAULT_MODEL else (
            f"{spec.arch or spec.class_name or spec.source}:embed")

    @property
    def names(self) -> List[str]:
        """The gallery's labels: a match's ``target_names`` entry."""
        return self.gallery.labels

    @property
    def explainer(self) -> FamExplainer:
        """The FAM explainer, with the feature map on the runtime's fast path where it applies (first use)."""
        if self._fast is None:
            settings = RuntimeSettings().overridden(os.environ.get(RUNTIME_ENV, ""), f"${RUNTIME_ENV}")
            features, why = fast_features(self.model, self.profile.input_size, settings, self.device)
            if features is not None:
                self.model.fast_features = features
            logger.info("camserve batch runtime (embedding): %s", why)
            self._fast = features is not None
        return self.fam

    def run(self, items: List[Item], settings) -> List[Any]:
        """Per item a :class:`~camserve.cli.batch_steps.Result` whose ``topk`` are the gallery matches."""
        import torch

        k = matches_wanted(settings.target)
        if settings.method == "prototypes":
            return self.run_prototypes(items, k, settings.layer or None)
        fam = self.explainer
        spec = FamSpec(gallery_topk=k, method=settings.method, layer=settings.layer or None,
                       **fam_options(settings.options))
        if spec.layer is not None:
            fam.resolve_layer(spec.layer)  # an unknown layer is refused before any forward
        p = self.profile
        start = clock(self.device)
        batch, _crops = p.model_input([it.image for it in items], self.device)
        prep = clock(self.device) - start
        result = fam.explain(batch, [dataclasses.replace(spec) for _ in items])
        total = clock(self.device) - start
        results = []
        for item, explanation in zip(items, result.items):
            matches = explanation.matches or []
            topk = [Prediction(int(m["index"]), str(m["label"]), round(float(m["similarity"]), 6)) for m in matches]
            maps = [m["query_map"] for m in matches]
            seconds = {"preprocess": prep / len(items), "explain_batch": explanation.batch_seconds,
                       "batch_size": len(items), "per_image": total / len(items)}
            layer = explanation.layer or (self.model.feature_layer or "")
            results.append(Result(topk, [m.index for m in topk], torch.stack(maps),
                                  crop_box(item.hw, p.resize, p.crop), layer, seconds))
        return results


    def run_prototypes(self, items: List[Item], k: int, layer: Optional[str] = None) -> List[Any]:
        """``--method prototypes``: per item the K best classes of the episode and the query's map against
        the winning prototype (one forward and one backward for the batch); with a ``layer`` below the
        last map, that map there by the relevance route (one more forward, :func:`prototype_spec`)."""
        if self.episode is None:
            raise InvalidOptionError(f"--method prototypes: {self.episode_problem}")
        classes = self.episode.classes
        if k > len(classes):
            raise InvalidOptionError(f"--target top{k}: the gallery has {len(classes)} classes")
        resolved = self.fam.resolve_layer(layer) if layer else None  # an unknown layer before any forward
        p = self.profile
        start = clock(self.device)
        batch, _crops = p.model_input([it.image for it in items], self.device)
        prep = clock(self.device) - start
        explained = explain_queries(self.model, self.episode, batch)
        maps = [few.query_map for few in explained]
        where = resolved.path if resolved is not None else (self.model.feature_layer or "")
        if resolved is not None and not resolved.last:
            deep = self.fam.explain(batch, [prototype_spec(self.episode, few.label, resolved.path) for few in explained])
            maps = [item.query_map for item in deep.items]
        total = clock(self.device) - start
        results = []
        for item, few, heatmap in zip(items, explained, maps):
            order = few.scores.argsort(descending=True)[:k].tolist()
            topk = [Prediction(i, classes[i], round(float(few.scores[i]), 6)) for i in order]
            seconds = {"preprocess": prep / len(items), "explain_batch": total - prep, "batch_size": len(items),
                       "per_image": total / len(items)}
            results.append(Result(topk, [order[0]], heatmap[None], crop_box(item.hw, p.resize, p.crop),
                                  where, seconds, names=classes))
        return results


def local_backend(args: argparse.Namespace):
    """The in-process backend a run's flags ask for: :class:`EmbeddingBackend` for ``--task embed``
    (or a bare ``--gallery``), else the classifier's :class:`~camserve.cli.batch_steps.LocalBackend`."""
    if is_embedding_run(args):
        return EmbeddingBackend(args)
    return LocalBackend(args)
