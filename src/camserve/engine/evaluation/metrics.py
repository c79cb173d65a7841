"""Faithfulness metrics: RISE deletion and insertion (Petsiuk et al., BMVC 2018).

Pixels are ranked by the saliency map at model-input resolution, most salient first. With ``S``
steps, step ``k`` (``k = 0 … S``) modifies the top ``⌈k·HW/S⌉`` pixels (all channels):

- **deletion** replaces them with zeros in normalised space, starting from the clean image;
- **insertion** starts from a Gaussian blur (kernel 11, σ 5) of the input and restores them.

The score after each step is the softmax probability of the class predicted on the clean image
(classifiers), or the cosine similarity of the modified query's embedding to a reference embedding
(embedding models). ``AUC = trapezoid(scores, dx=1/S)`` on a [0, 1] axis, and
``overall = AUC(insertion) − AUC(deletion)`` (higher is better: deleting what the map points at
kills the score fast, restoring it brings the score back fast).

Everything is batched on the model's device: the step images of many (image, step) pairs go through
the model in one forward of ``batch_size`` images; nothing is copied to the host but the scores.

**Ties** in the pixel order (the flat zero plateaus of ReLU'd maps, the constant blocks of a
nearest-upsampled map) are broken by a seeded random permutation per image (``tie_seed``, default
0), not in raster order: a stable sort would delete a plateau top row first, which biases the
curves (the top of a photograph is mostly background). ``tie_seed=None`` restores the old order.

:func:`perturbation_curves` is the general form used by the evaluation: several perturbation kinds
(``deletion_zero``, ``deletion_blur``, ``insertion_blur``) in one batched pass, with a score
function that may return several scores per image (e.g. the probabilities of the top-1 and top-2
classes, for the contrastive deletion score). :func:`spearman` (average ranks for ties) and
:func:`paired` (paired difference, SEM, win counts) are the statistics the evaluation reports.
Every curve starts at an unperturbed source image and ends at another (clean, blurred or all
zeros), whatever the map: :func:`source_scores` scores those once, and ``perturbation_curves(…,
fixed=…)`` then forwards only the interior steps of each map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from camserve.engine.core.rank_correlation import spearman_rows
from camserve.engine.errors import InvalidInputError

#: ``score_fn(step_images (B, 3, H, W), owners (B,) index of the source image) → scores (B,)``
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Curves:
    """Deletion and insertion scores ``(N, S + 1)`` on the axis ``fractions`` ``(S + 1,)``."""

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> torch.Tensor:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> torch.Tensor:
        return auc(self.insertion)

    @property
    def overall(self) -> torch.Tensor:
        """``AUC(insertion) − AUC(deletion)`` per image ``(N,)``."""
        return self.insertion_auc - self.deletion_auc

    def record(self) -> dict:
        """Plain lists for a JSON record: the per-image AUCs and overall, and the mean curves."""
        return {"deletion_auc": self.deletion_auc.tolist(), "insertion_auc": self.insertion_auc.tolist(),
                "overall": self.overall.tolist(),
                "mean_deletion_curve": self.deletion.mean(0).tolist(),
                "mean_insertion_curve": self.insertion.mean(0).tolist(),
                "fractions": self.fractions.tolist()}


def mean_and_sem(values) -> tuple:
    """``(mean, standard error of the mean)`` of a list of numbers (SEM 0 for a single value)."""
    t = torch.tensor(values, dtype=torch.float64)
    sem = float(t.std(unbiased=True) / len(t) ** 0.5) if len(t) > 1 else 0.0
    return float(t.mean()), sem


def auc(scores: torch.Tensor) -> torch.Tensor:
    """Area under ``scores`` ``(..., S + 1)`` sampled evenly on [0, 1]: the trapezoid rule."""
    steps = scores.shape[-1] - 1
    if steps < 1:
        raise InvalidInputError("a curve needs at least two points")
    return torch.trapezoid(scores, dx=1.0 / steps, dim=-1)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Depthwise separable Gaussian blur with reflect padding, on the images' device."""
    half = kernel_size // 2
    x = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - half
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (half, half, half, half), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def pixel_ranks(maps: torch.Tensor, tie_seed: Optional[int] = 0) -> torch.Tensor:
    """``ranks[i, p]`` = position of pixel ``p`` in image ``i``'s descending saliency order ``(N, HW)``.

    Ties are broken by a random permutation of the pixels, seeded with ``tie_seed`` (the same
    permutation for every call with the same seed and shape, so two maps of one image that tie in
    the same places are ranked alike); ``tie_seed=None`` breaks them in pixel index order.
    """
    flat = maps.flatten(1)
    n, pixels = flat.shape
    if tie_seed is None:
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    else:
        generator = torch.Generator().manual_seed(int(tie_seed))
        shuffle = torch.rand(n, pixels, generator=generator).argsort(dim=1).to(flat.device)
        within = torch.sort(flat.gather(1, shuffle), dim=1, descending=True, stable=True).indices
        order = shuffle.gather(1, within)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=maps.device).expand_as(order))
    return ranks


def step_counts(pixels: int, steps: int, device=None) -> torch.Tensor:
    """Pixels modified after each step ``k = 0 … S``: ``⌈k · pixels / S⌉``."""
    k = torch.arange(steps + 1, device=device, dtype=torch.float64)
    return torch.ceil(k * pixels / steps).long()


def classifier_score(model: torch.nn.Module, classes: torch.Tensor) -> ScoreFn:
    """Softmax probability of ``classes[owner]`` (the class predicted on each clean image)."""

    def score(batch: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(model(batch).float(), dim=-1)
        return probs.gather(1, classes[owners][:, None])[:, 0]

    return score


def similarity_score(embed: Callable[[torch.Tensor], torch.Tensor], references: torch.Tensor) -> ScoreFn:
    """Cosine similarity of each modified query's embedding to ``references[owner]`` ``(N, D)``."""

    def score(batch: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(embed(batch).flatten(1).float(), references[owners].float(), dim=-1)

    return score


@dataclass
class Endpoints:
    """Map-independent scores ``(N,)``: the clean image (deletion step 0, insertion step S), the
    blurred image (insertion step 0) and the all-zero image (deletion step S)."""

    clean: torch.Tensor
    blurred: torch.Tensor
    zeros: torch.Tensor


def endpoint_scores(score_fn: ScoreFn, images: torch.Tensor, blurred: torch.Tensor, batch_size: int = 64) -> Endpoints:
    """Score the clean, blurred and all-zero versions of every image once (shared by all maps)."""
    n = images.shape[0]
    owners = torch.arange(n, device=images.device)
    out = []
    with torch.inference_mode():
        for stack in (images, blurred, torch.zeros_like(images)):
            out.append(torch.cat([score_fn(stack[i:i + batch_size], owners[i:i + batch_size])
                                  for i in range(0, n, batch_size)]))
    return Endpoints(*out)


def deletion_insertion(score_fn: ScoreFn, images: torch.Tensor, maps: torch.Tensor, steps: int = 25,
                       batch_size: int = 64, blurred: Optional[torch.Tensor] = None,
                       endpoints: Optional[Endpoints] = None,
                       progress: Optional[Callable[[int], None]] = None, tie_seed: Optional[int] = 0,
                       deletion_fill: str = "zero") -> Curves:
    """RISE deletion and insertion curves of ``images`` ``(N, 3, H, W)`` (normalised model input)
    under ``maps`` ``(N, H, W)`` (or ``(N, 1, H, W)``) at the same resolution.

    The ``2 · N · (S − 1)`` interior step images are built chunk by chunk and scored ``batch_size``
    at a time under ``torch.inference_mode``; the endpoints (clean, blurred, zeros) do not depend on
    the map and are scored once (pass ``endpoints`` to share them between maps).
    ``progress(n)`` is called with the number of images scored. ``deletion_fill="blur"`` deletes to
    the blurred image instead of zeros (its last step is then the blurred image's score).
    """
    if deletion_fill not in ("zero", "blur"):
        raise InvalidInputError(f"deletion_fill must be 'zero' or 'blur', got {deletion_fill!r}")
    if images.dim() != 4:
        raise InvalidInputError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if maps.dim() == 4:
        maps = maps[:, 0]
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise InvalidInputError(f"maps {tuple(maps.shape)} must match images {tuple(images.shape)} "
                                "(rank at model-input resolution)")
    if steps < 1 or batch_size < 1:
        raise InvalidInputError("steps and batch_size must be ≥ 1")
    n, c, h, w = images.shape
    device = images.device
    if blurred is None:
        blurred = gaussian_blur(images)
    if endpoints is None:
        endpoints = endpoint_scores(score_fn, images, blurred, batch_size)
    ranks = pixel_ranks(maps.to(device), tie_seed)
    counts = step_counts(h * w, steps, device)
    scores = torch.empty(2, n, steps + 1, device=device)
    scores[0, :, 0] = endpoints.clean
    scores[0, :, steps] = endpoints.zeros if deletion_fill == "zero" else endpoints.blurred
    scores[1, :, 0], scores[1, :, steps] = endpoints.blurred, endpoints.clean
    interior = steps - 1
    if interior > 0:
        # every (kind, image, interior step) job, kind 0 = deletion, 1 = insertion
        kinds = torch.arange(2, device=device).repeat_interleave(n * interior)
        owners = torch.arange(n, device=device).repeat_interleave(interior).repeat(2)
        step_index = torch.arange(1, steps, device=device).repeat(2 * n)
        flat = torch.empty(kinds.shape[0], device=device)
        with torch.inference_mode():
            for start in range(0, kinds.shape[0], batch_size):
                sl = slice(start, start + batch_size)
                own, kind = owners[sl], kinds[sl]
                modified = (ranks[own] < counts[step_index[sl]][:, None]).view(-1, 1, h, w)
                clean = images[own]
                deleted = clean.masked_fill(modified, 0.0) if deletion_fill == "zero" else \
                    torch.where(modified, blurred[own], clean)
                inserted = torch.where(modified, clean, blurred[own])
                batch = torch.where((kind == 0).view(-1, 1, 1, 1), deleted, inserted)
                flat[sl] = score_fn(batch, own)
                if progress is not None:
                    progress(int(own.shape[0]))
        scores[:, :, 1:steps] = flat.view(2, n, interior)
    fractions = counts.double() / (h * w)
    return Curves(fractions.float(), scores[0], scores[1])


def random_maps(n: int, size, seed: int = 0, device=None) -> torch.Tensor:
    """Uniform random maps ``(n, H, W)`` (the floor every method must beat), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *size, generator=generator).to(device or "cpu")


#: perturbation kinds of :func:`perturbation_curves`: (start image, image the ranked pixels come from)
KINDS = {"deletion_zero": ("clean", "zeros"), "deletion_blur": ("clean", "blurred"),
         "insertion_blur": ("blurred", "clean")}


def perturbation_curves(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                        maps: torch.Tensor, steps: int = 16, kinds=tuple(KINDS), batch_size: int = 64,
                        blurred: Optional[torch.Tensor] = None, tie_seed: Optional[int] = 0,
                        fixed: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Scores ``{kind: (N, S + 1, K)}`` of every perturbation kind in one batched pass.

    ``score_fn(batch, owners)`` returns ``(B,)`` or ``(B, K)`` scores (``K`` = 1 for the former).
    Step ``k`` of a kind ``(start, source)`` is ``start`` with the top ``⌈k·HW/S⌉`` pixels of the
    map's order taken from ``source``: ``deletion_zero`` (clean → zeros), ``deletion_blur`` (clean
    → blur), ``insertion_blur`` (blur → clean).

    Step 0 is the unmodified ``start`` image and step ``S`` the whole ``source`` image, whatever the
    map. Without ``fixed`` every step is forwarded; with ``fixed`` — the scores ``(N, K)`` of the
    ``"clean"``, ``"blurred"`` and ``"zeros"`` images (:func:`source_scores`, computed once and shared
    by every map of the images) — only the ``S − 1`` interior steps are, and the endpoints are copied
    from it: the same values, ``2 / (S + 1)`` fewer forwards.
    """
    if images.dim() != 4:
        raise InvalidInputError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if maps.dim() == 4:
        maps = maps[:, 0]
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise InvalidInputError(f"maps {tuple(maps.shape)} must match images {tuple(images.shape)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or steps < 1:
        raise InvalidInputError(f"unknown kinds {unknown} (choose from {list(KINDS)}) or steps < 1")
    n, _, h, w = images.shape
    device = images.device
    if blurred is None:
        blurred = gaussian_blur(images)
    sources = {"clean": images, "blurred": blurred, "zeros": torch.zeros_like(images[:1]).expand_as(images)}
    ranks = pixel_ranks(maps.to(device), tie_seed)
    counts = step_counts(h * w, steps, device)
    all_kind = torch.arange(len(kinds), device=device).repeat_interleave(n * (steps + 1))
    all_owner = torch.arange(n, device=device).repeat_interleave(steps + 1).repeat(len(kinds))
    all_step = torch.arange(steps + 1, device=device).repeat(n * len(kinds))
    forwarded = torch.arange(all_kind.shape[0], device=device)
    if fixed is not None:
        forwarded = forwarded[(all_step > 0) & (all_step < steps)]
    jobs_kind, jobs_owner, jobs_step = all_kind[forwarded], all_owner[forwarded], all_step[forwarded]
    pieces = []
    with torch.inference_mode():
        for start in range(0, jobs_kind.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            own, kind = jobs_owner[sl], jobs_kind[sl]
            modified = (ranks[own] < counts[jobs_step[sl]][:, None]).view(-1, 1, h, w)
            batch = torch.empty(own.shape[0], *images.shape[1:], device=device, dtype=images.dtype)
            for k, name in enumerate(kinds):
                sel = kind == k
                if sel.any():
                    first, second = KINDS[name]
                    o = own[sel]
                    batch[sel] = torch.where(modified[sel], sources[second][o], sources[first][o])
            out = score_fn(batch, own)
            pieces.append(out.reshape(out.shape[0], -1).float())
    if fixed is None:
        flat = torch.cat(pieces)
    else:
        width = fixed["clean"].reshape(n, -1).shape[1]
        flat = torch.empty(all_kind.shape[0], width, device=device)
        if pieces:
            flat[forwarded] = torch.cat(pieces).to(device)
        for k, name in enumerate(kinds):  # step 0 = the start image, step S = the source image
            first, second = KINDS[name]
            base = k * n * (steps + 1) + torch.arange(n, device=device) * (steps + 1)
            flat[base] = fixed[first].reshape(n, -1).float().to(device)
            flat[base + steps] = fixed[second].reshape(n, -1).float().to(device)
    flat = flat.view(len(kinds), n, steps + 1, -1)
    return {name: flat[k] for k, name in enumerate(kinds)}


def source_scores(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                  blurred: torch.Tensor, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Scores ``(N, K)`` of the three unperturbed sources of :data:`KINDS` — ``"clean"`` (the images),
    ``"blurred"`` and ``"zeros"`` — under ``score_fn``: every curve's first and last step, whatever
    the map (pass them as :func:`perturbation_curves`' ``fixed``)."""
    n = images.shape[0]
    owners = torch.arange(n, device=images.device)
    out = {}
    with torch.inference_mode():
        for name, stack in (("clean", images), ("blurred", blurred), ("zeros", torch.zeros_like(images))):
            scores = [score_fn(stack[i:i + batch_size], owners[i:i + batch_size]) for i in range(0, n, batch_size)]
            out[name] = torch.cat([s.reshape(s.shape[0], -1).float() for s in scores])
    return out


def class_probabilities(model: torch.nn.Module, classes: torch.Tensor) -> Callable:
    """``(B, K)`` softmax probabilities of the classes ``classes[owner]`` ``(N, K)`` (e.g. top-1, top-2)."""

    def score(batch: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(model(batch).float(), dim=-1)
        return probs.gather(1, classes[owners])

    return score


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of ``a``, ``b`` ``(N, ...)`` (average ranks for ties), 0 where
    a row is constant: :func:`~camserve.engine.core.rank_correlation.spearman_rows` with the lab's
    convention that a constant map is uncorrelated with any other."""
    return spearman_rows(a, b, constant=0.0)


def paired(a, b) -> dict:
    """Paired comparison of per-image scores ``a`` vs ``b``: mean of ``a − b``, its SEM, and how
    many images ``a`` wins, loses and ties (``|a − b| < 1e-9``)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = a - b
    mean, sem = mean_and_sem(diff.tolist())
    return {"diff": mean, "sem": sem, "wins": int((diff > 1e-9).sum()), "losses": int((diff < -1e-9).sum()),
            "ties": int((diff.abs() <= 1e-9).sum()), "n": int(diff.numel())}
