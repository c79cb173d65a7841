"""Channel weights of the FAM family: how much channel ``k`` of the pooled map carries of a similarity.

Every weighting returns per-channel scores ``c (C,)`` that FAM turns into a map
``ReLU(Σ_k w_k A_k)`` with ``w = c / max_k |c_k|`` (:mod:`.fam`), or, below the last map, seeds as the
relevance at the pooled feature (:mod:`.layers`). ``q``, ``r`` are the embeddings of query and
reference (on the pooled route: the L2-normalised or raw pooled map ``GAP(A)``), ``D = C``.

* :func:`product_weights` — FAM's product decomposition (the default): ``c_k = q_k r_k`` (dot),
  ``q_k r_k / (‖q‖‖r‖)`` (cosine), ``2 q_k r_k − r_k²`` (euclidean, the reference-dependent part of
  ``−‖q − r‖²``). ``Σ_k c_k`` is the similarity exactly (euclidean: up to ``−‖q‖²``).
* :func:`sfam_weights` — the channel-wise contribution importance score (CIS) of SFAM (Liao et al.
  2025, arXiv 2506.01636), as implemented here (see its docstring for what could not be verified).
* :func:`neighbour_weights` — the contributions averaged over the query's ``k`` nearest gallery items
  of one label (the label that wins the neighbours' vote), after the same authors' DINO code
  (``DynamicAccumulatedAttentionMap``: per-channel products of L2-normalised embeddings averaged over
  the same-class neighbours); :func:`select_neighbours` picks them.
* :func:`jacobian_weights` — ``c_k = f_k ∂s̃/∂f_k`` at the pooled feature ``f`` (FAM's Jacobian
  route, for a projection head or a user embedding model; ``s̃`` linearised in the query, see
  :mod:`.fam`). On a model whose embedding is the pooled map it equals the product decomposition
  (dot, cosine) up to float error.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

EPS = 1e-12
WEIGHTINGS = ("auto", "product", "sfam", "neighbour", "jacobian")
#: temperature of the neighbours' label vote, ``exp(cos / T)`` (DINO's k-NN classifier and the DAAM code)
VOTE_TEMPERATURE = 0.07


def product_weights(query: torch.Tensor, reference: torch.Tensor, similarity: str) -> torch.Tensor:
    """FAM's product decomposition, ``c_k = q_k r_k`` (dot), ``c_k = q_k r_k / (‖q‖ ‖r‖)`` (cosine),
    ``c_k = 2 q_k r_k − r_k²`` (euclidean; ``−‖q − r‖² = Σ_k c_k − ‖q‖²``)."""
    if similarity == "dot":
        return query * reference
    if similarity == "cosine":
        return query * reference / (query.norm() * reference.norm()).clamp_min(EPS)
    return 2 * query * reference - reference ** 2


def sfam_weights(query: torch.Tensor, reference: torch.Tensor, similarity: str) -> torch.Tensor:
    """SFAM's channel-wise contribution importance score (CIS), as implemented here.

    The paper (Liao et al. 2025, "Visual Explanation via Similar Feature Activation for Metric
    Learning", arXiv 2506.01636) derives CIS "from the similarity measurement between two image
    embeddings", for Euclidean distance or cosine similarity, and combines CIS linearly with the
    feature map. Only its abstract and introduction could be read here (the stored copy's search
    excerpts stop before the method section), so the equations below are **our reading, not checked
    against the paper's**:

    * cosine — the similarity a channel carries, judged by removing it from both embeddings:
      ``CIS_k = cos(q, r) − cos(q_∖k, r_∖k)``, with
      ``cos(q_∖k, r_∖k) = (q·r − q_k r_k) / sqrt((‖q‖² − q_k²)(‖r‖² − r_k²))``
      (unlike the product ``q_k r_k/(‖q‖‖r‖)`` it also counts how channel k changes the norms);
    * euclidean — a channel is similar when its squared difference is below the average channel's:
      ``CIS_k = (1/D) ‖q − r‖² − (q_k − r_k)²`` (``Σ_k CIS_k = 0``; positive on the channels that
      bring q and r together, negative on those that drive them apart);
    * dot — removing channel ``k`` lowers ``q·r`` by ``q_k r_k``: the product decomposition.
    """
    if similarity == "dot":
        return query * reference
    if similarity == "cosine":
        dot = query @ reference
        qq, rr = query @ query, reference @ reference
        full = dot / (qq * rr).sqrt().clamp_min(EPS)
        rest_q = (qq - query ** 2).clamp_min(0)
        rest_r = (rr - reference ** 2).clamp_min(0)
        without = (dot - query * reference) / (rest_q * rest_r).sqrt().clamp_min(EPS)
        return full - without
    squared = (query - reference) ** 2
    return squared.mean() - squared


def neighbour_weights(query: torch.Tensor, neighbours: torch.Tensor, similarity: str) -> torch.Tensor:
    """Neighbour-averaged weights: ``c_k = (1/|N|) Σ_{n∈N} c_k(q, r_n)`` with ``c(q, r_n)`` the product
    decomposition (:func:`product_weights`) against each neighbour's embedding ``r_n`` (``neighbours``
    ``(|N|, D)``, from :func:`select_neighbours`). For L2-normalised embeddings and cosine this is the
    DAAM code's ``mean_n q̂ ⊙ r̂_n``; ``Σ_k c_k`` is the mean similarity to the neighbours."""
    return torch.stack([product_weights(query, n, similarity) for n in neighbours]).mean(dim=0)


def neighbour_reference(neighbours: torch.Tensor, similarity: str) -> torch.Tensor:
    """The one reference whose linearised similarity equals the neighbours' mean: for cosine
    ``mean_n r_n/‖r_n‖`` (then scored as a dot product), else ``mean_n r_n``. Used by the Jacobian
    route, where ``s̃`` is linear in the reference, so ``jacobian_weights`` against it are the
    neighbour-averaged Jacobian weights."""
    if similarity == "cosine":
        return (neighbours / neighbours.norm(dim=-1, keepdim=True).clamp_min(EPS)).mean(dim=0)
    return neighbours.mean(dim=0)


def select_neighbours(query: torch.Tensor, gallery: torch.Tensor, labels: Sequence[str], k: int,
                      temperature: float = VOTE_TEMPERATURE) -> Tuple[List[int], str]:
    """The query's nearest gallery items of one label: the ``k`` nearest by cosine vote for a label
    with weight ``exp(cos/T)`` (DINO's weighted k-NN, ``T = 0.07``); the items of the winning label
    among those ``k`` are returned (indices, best first) with the label."""
    q = query / query.norm().clamp_min(EPS)
    g = gallery / gallery.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cosines = g @ q
    top = torch.topk(cosines, k)
    votes: dict = {}
    for score, index in zip(top.values.tolist(), top.indices.tolist()):
        votes[labels[index]] = votes.get(labels[index], 0.0) + float(torch.tensor(score / temperature).exp())
    label = max(votes, key=votes.get)
    return [i for i in top.indices.tolist() if labels[i] == label], label


def jacobian_weights(pooled: torch.Tensor, map_gradient: torch.Tensor) -> torch.Tensor:
    """``c_k = f_k ∂s̃/∂f_k`` at the pooled feature ``f = GAP(A)`` (``pooled (C,)``), computed from the
    gradient of ``s̃`` w.r.t. the map, ``map_gradient (C, h, w)``: ``∂s̃/∂f_k = Σ_ij ∂s̃/∂A_kij``
    (``∂f_k/∂A_kij = 1/hw``, so each pixel's gradient is ``(1/hw) ∂s̃/∂f_k``). For a head that is
    positively homogeneous in ``f`` (linear or a bias-free ReLU MLP) Euler's identity gives
    ``Σ_k c_k = s̃`` exactly."""
    return pooled * map_gradient.sum(dim=(1, 2))
