"""Few-shot prototypes: N-way K-shot nearest-centroid classification on the embedding, explained by FAM.

:meth:`Gallery.prototypes <camserve.engine.methods.similarity.gallery.Gallery.prototypes>` already
gives plain class means ``p_c = mean e(x)`` and mean feature maps, which ``FamSpec(gallery_topk=1)``
explains with the product weights. This module adds what an *episode* needs, after SimpleShot
(Wang et al. 2019, "CL2N" features):

* **centre and L2-normalise** every embedding by the support set's mean ``μ = mean_{support} e``:
  ``x̃ = (e − μ) / ‖e − μ‖``; prototypes ``p_c = (1/K) Σ_{i: y_i = c} x̃_i`` (not re-normalised);
* **nearest centroid**: the query's class is ``argmin_c ‖q̃ − p_c‖²`` (score ``−‖q̃ − p_c‖²``);
* **the query's map against the winning prototype** ``p`` — the FAM map ``ReLU(Σ_k w_k A_k)``,
  ``w = c / max|c|``, with Jacobian channel weights of the class-dependent part of the score,
  ``−‖q̃ − p‖² = 2 q̃·p − ‖p‖² − 1``, linearised in the query (norms ``‖u‖``, ``‖e − μ‖`` held
  constant, as FAM's Jacobian route does):

      s̃ = 2 q̃·p,   c_k = f_k ∂s̃/∂f_k   (f = GAP(A) of the query; one backward for the batch)

  On a model whose embedding is the normalised pooled map this is ``c_k = 2 e_k p_k / ‖e − μ‖`` and
  ``Σ_k c_k = s̃ + 2 μ·p/‖e − μ‖`` (the centring term ``−2 μ·p/‖e − μ‖`` is carried by no channel of
  A: a constant of the episode, the same for every pixel). A projection head or user model gets the
  same formula through autograd;
* **each support image's map** of the winning class with the same weights ``w`` (the prototype's
  weights for this query): ``ReLU(Σ_k w_k A^s_k)``, which parts of each shot the query matched;
* **below the last map** (:func:`prototype_spec`): the same class-dependent score is linear in the
  query's embedding, ``s̃ ∝ e·p`` with the norms held constant, so its Jacobian contributions
  ``c_k = f_k p_k / ‖e − μ‖`` are FAM's Jacobian weights of the dot product with ``p`` up to one positive
  factor: a ``FamSpec(reference_embedding=p, similarity="dot", weights="jacobian", layer=L)`` seeds
  that relevance at the pooled feature and propagates it to ``L`` (the relevance route), and at the
  last map gives the query map above exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from camserve.engine.errors import InvalidReferenceError
from camserve.engine.imaging.render import prepare_maps
from camserve.engine.methods.similarity.channel_weights import jacobian_weights
from camserve.engine.methods.similarity.fam import FamSpec, normalised_weights, weighted_map

EPS = 1e-12


def centre_and_normalise(embeddings: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """SimpleShot's CL2N: ``x̃ = (e − μ) / ‖e − μ‖`` row-wise."""
    centred = embeddings - mean
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(EPS)


@dataclass
class FewShotEpisode:
    """The support set of one episode: ``classes`` (N, first-seen order), ``mean`` μ ``(D,)``,
    ``prototypes (N, D)``, and per support image its label, embedding and feature map."""

    classes: List[str]
    mean: torch.Tensor
    prototypes: torch.Tensor
    support_labels: List[str]
    support_embeddings: torch.Tensor
    support_maps: torch.Tensor

    def members(self, label: str) -> List[int]:
        return [i for i, y in enumerate(self.support_labels) if y == label]


@dataclass
class FewShotExplanation:
    """One query: ``label`` (the winning class), ``scores`` ``−‖q̃ − p_c‖²`` per class, ``contributions``
    ``c (C,)``, ``query_map (H, W)`` and, for the winning class's support images (``support_indices``),
    ``support_maps (K, H, W)`` with the same weights."""

    label: str
    scores: torch.Tensor
    contributions: torch.Tensor
    linearised_score: float
    query_map: torch.Tensor
    support_indices: List[int]
    support_maps: torch.Tensor
    embedding: Optional[torch.Tensor] = None            # the query's embedding (D,)
    query_map_layer: Optional[torch.Tensor] = None      # the maps at the feature map's own resolution
    support_maps_layer: Optional[torch.Tensor] = None
    support_similarities: Optional[torch.Tensor] = None  # cosine of the query to each shot (K,)


def build_episode(embedding_model, images: torch.Tensor, labels: Sequence[str], batch_size: int = 64) -> FewShotEpisode:
    """Embed the support set once and form μ and the CL2N prototypes."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise InvalidReferenceError("a few-shot episode needs a non-empty (M, 3, H, W) support batch")
    labels = [str(y) for y in labels]
    if len(labels) != images.shape[0]:
        raise InvalidReferenceError(f"{images.shape[0]} support images but {len(labels)} labels")
    embeddings, maps = [], []
    for start in range(0, images.shape[0], batch_size):
        trace = embedding_model.trace(images[start:start + batch_size], grad=False)
        embeddings.append(trace.embedding)
        maps.append(trace.maps)
    return _episode(labels, torch.cat(embeddings), torch.cat(maps), "got")


def _episode(labels: List[str], embeddings: torch.Tensor, maps: torch.Tensor, where: str) -> FewShotEpisode:
    """μ and the CL2N prototypes of labelled support embeddings (at least 2 classes)."""
    classes = list(dict.fromkeys(labels))
    if len(classes) < 2:
        raise InvalidReferenceError(f"a few-shot episode needs at least 2 classes; {where} {classes}")
    mean = embeddings.mean(dim=0)
    normalised = centre_and_normalise(embeddings, mean)
    prototypes = torch.stack([normalised[[i for i, y in enumerate(labels) if y == c]].mean(dim=0) for c in classes])
    return FewShotEpisode(classes, mean, prototypes, labels, embeddings, maps)


def episode_from_gallery(gallery) -> FewShotEpisode:
    """The episode whose support set is a labelled :class:`~camserve.engine.methods.similarity.gallery.Gallery`
    (an archive's: its stored embeddings and last feature maps, no forward). Needs the feature maps
    (the shots' maps) and at least 2 labels."""
    if gallery is None or not len(gallery):
        raise InvalidReferenceError("few-shot prototypes need a labelled gallery (the support set); this one is empty")
    if gallery.feature_maps is None:
        raise InvalidReferenceError("few-shot prototypes explain each shot with its feature map, but this gallery "
                                    "keeps none: rebuild it with feature maps")
    return _episode(list(gallery.labels), gallery.embeddings.float(), gallery.feature_maps, "the gallery has")


def classify(episode: FewShotEpisode, embeddings: torch.Tensor) -> Tuple[List[str], torch.Tensor]:
    """Nearest centroid: labels and scores ``−‖q̃ − p_c‖² (n, N)``."""
    q = centre_and_normalise(embeddings, episode.mean)
    scores = -((q[:, None, :] - episode.prototypes[None]) ** 2).sum(dim=-1)
    return [episode.classes[i] for i in scores.argmax(dim=1).tolist()], scores


def explain_queries(embedding_model, episode: FewShotEpisode, queries: torch.Tensor,
                    output_size: Optional[Tuple[int, int]] = None) -> List[FewShotExplanation]:
    """Classify ``queries (n, 3, H, W)`` against the episode and explain each against its winning
    prototype (one forward, one backward for the batch). Maps are in [0, 1] at ``output_size``
    (default: the input's)."""
    size = tuple(output_size) if output_size is not None else tuple(queries.shape[-2:])
    trace = embedding_model.trace(queries, grad=True)
    with torch.enable_grad():
        raw = trace.raw
        e = raw / raw.detach().norm(dim=-1, keepdim=True).clamp_min(EPS) if embedding_model.normalize else raw
        centred = e - episode.mean
        q = centred / centred.detach().norm(dim=-1, keepdim=True).clamp_min(EPS)
        scores = -((q.detach()[:, None, :] - episode.prototypes[None]) ** 2).sum(dim=-1)
        winners = scores.argmax(dim=1)
        linearised = 2 * (q * episode.prototypes[winners]).sum(dim=-1)
        grads = torch.autograd.grad(linearised.sum(), trace.maps)[0].detach()
    out = []
    with torch.no_grad():
        for i, win in enumerate(winners.tolist()):
            c = jacobian_weights(trace.pooled[i].detach(), grads[i])
            w = normalised_weights(c)
            label = episode.classes[win]
            members = episode.members(label)
            raw_query = weighted_map(w, trace.maps[i].detach())[None]
            raw_support = torch.stack([weighted_map(w, episode.support_maps[j].float()) for j in members])
            query_map = prepare_maps(raw_query, size)[0]
            support = prepare_maps(raw_support, size)
            shots = episode.support_embeddings[members]
            cosine = torch.nn.functional.cosine_similarity(trace.embedding[i].detach()[None].float(), shots.float())
            out.append(FewShotExplanation(label, scores[i], c, float(linearised[i]), query_map, members, support,
                                          embedding=trace.embedding[i].detach(),
                                          query_map_layer=prepare_maps(raw_query, None)[0],
                                          support_maps_layer=prepare_maps(raw_support, None),
                                          support_similarities=cosine))
    return out


def prototype_spec(episode: FewShotEpisode, label: str, layer: Optional[str] = None) -> FamSpec:
    """The FAM request that explains a query against the prototype of ``label`` at ``layer`` (a module
    path or stage alias; ``None`` = the last map): the Jacobian weights of ``e·p`` (see the module
    docstring), the map :func:`explain_queries` gives at the last map, anywhere the relevance route
    reaches."""
    if label not in episode.classes:
        raise InvalidReferenceError(f"no prototype {label!r} in this episode; it has {episode.classes}")
    prototype = episode.prototypes[episode.classes.index(label)]
    return FamSpec(reference_embedding=prototype, similarity="dot", weights="jacobian", layer=layer)
