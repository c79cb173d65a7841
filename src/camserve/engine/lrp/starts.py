"""Relevance starts: the initial relevance at the logits of an LRP pass (the seeds: target,
contrastive, margin, softmax with its temperature, rival), and the ``start`` / ``contrastive`` /
``temperature`` options of the LRP-based methods, resolved in one place for every method that seeds
a relevance pass.

A method mixes :class:`RelevanceStartOptions` in before :class:`~.base.CamMethod` and adds
:data:`START_OPTION_CHOICES` (with its own ``contrastive`` default) to its ``option_choices``.
"""

from __future__ import annotations

import torch

from camserve.engine.core.targets import one_hot_seed
from camserve.engine.core.values import parse_number
from camserve.engine.errors import InvalidOptionError
from camserve.engine.lrp.rules import stabilize


def contrastive_seed(logits: torch.Tensor, targets: torch.Tensor, contrastive=True) -> torch.Tensor:
    """Initial relevance at the logits: ``+1`` on the target and ``−1/N`` on the other classes
    (``N`` = number of classes) where ``contrastive`` (a bool or a ``(B, 1)`` 0/1 tensor), else a
    one-hot. Shape ``(B, N)``."""
    one_hot = one_hot_seed(logits, targets)
    weight = contrastive if isinstance(contrastive, torch.Tensor) else float(bool(contrastive))
    return one_hot - (1.0 - one_hot) * weight / logits.shape[1]


#: the initial relevances of LRP-based methods (the ``start`` option; see :func:`relevance_seed`)
STARTS = ("target", "contrastive", "margin", "softmax", "rival")


def resolve_start(method: str, resolved: dict, start, contrastive_given: bool, default: str) -> dict:
    """Reconcile a method's ``start`` option (``start``: the request's value, ``None`` when not
    given) with its ``contrastive`` option (``resolved``: the other options, already resolved;
    ``contrastive_given``: whether the request named ``contrastive``); ``default`` is the method's
    start when the request names neither.

    ``contrastive`` stays the alias it always was: ``0`` = ``start=target``, ``1`` =
    ``start=contrastive``. The resolved options keep ``contrastive`` (``True`` for every
    class-contrastive start) and carry ``start`` only for the starts that ``contrastive`` cannot
    name (``margin``, ``softmax``), so requests, echoed options and grouping keys of the old
    spellings are what they were. An unknown ``start``, or one that contradicts an explicit
    ``contrastive``, is an :class:`InvalidOptionError`."""
    resolved.pop("start", None)  # the base resolution's placeholder
    if start is not None:
        text = str(start).strip().lower()
        if text not in STARTS:
            raise InvalidOptionError(f"option 'start' of {method!r} must be one of {list(STARTS)}, got {start!r}")
        start = text
    if start is None:
        start = ("contrastive" if resolved["contrastive"] else "target") if contrastive_given else default
    elif contrastive_given and resolved["contrastive"] != (start != "target"):
        raise InvalidOptionError(
            f"options of {method!r} conflict: start={start!r} with contrastive={resolved['contrastive']!r} "
            f"(contrastive is an alias: 0 = start 'target', 1 = start 'contrastive')")
    resolved["contrastive"] = start != "target"
    if start in ("margin", "softmax", "rival"):
        resolved["start"] = start
    return resolved


#: the softmax start's temperatures a request may ask for: colder is the rival start (``y / T`` of
#: float32 logits stays finite), warmer the uniform contrast to float precision
TEMPERATURE_RANGE = (1e-3, 1e6)


def check_temperature(method: str, resolved: dict, temperature) -> dict:
    """Validate a method's softmax ``temperature`` (``None``: not given) against its resolved
    start: a number in :data:`TEMPERATURE_RANGE`, and only for ``start=softmax`` (the other starts have no
    temperature: ``rival`` is its limit ``T → 0``, ``margin`` — the plain maps — is ``T → ∞``).
    ``T = 1`` is left out of the resolved options, so an echoed answer and its grouping key are
    what they were before the option existed."""
    resolved.pop("temperature", None)  # the base resolution's placeholder
    if temperature is None:
        return resolved
    try:
        value = parse_number("temperature", temperature, ValueError)
    except ValueError:
        raise InvalidOptionError(f"option 'temperature' of {method!r} must be a positive number, got {temperature!r}") from None
    if isinstance(temperature, bool) or not (TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]):
        raise InvalidOptionError(f"option 'temperature' of {method!r} must be a positive number in "
                                 f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], got {temperature!r}")
    if start_of(resolved) != "softmax":
        raise InvalidOptionError(
            f"option 'temperature' of {method!r} applies to start='softmax' only, not start={start_of(resolved)!r}")
    if value != 1.0:
        resolved["temperature"] = value
    return resolved


def temperature_of(options) -> float:
    """The softmax start's temperature in resolved options (1 when not given)."""
    return float(options.get("temperature", 1.0))


def start_of(options) -> str:
    """The initial relevance that resolved options ask for (:func:`resolve_start`); options of a
    method without the option (a probe's ``{"contrastive": …}``) read as before."""
    start = options.get("start")
    if start:
        return start
    return "contrastive" if options.get("contrastive", True) else "target"


def softmax_seed(logits: torch.Tensor, targets: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """``e_t − q`` with ``q_k = p_k / (1 − p_t)`` for ``k ≠ t`` (``q_t = 0``), ``p = softmax(y / T)``:
    at ``T = 1`` the softmax gradient ``∂ log p_t / ∂y = e_t − p`` (SGLRP, Iwana et al. 2019) divided by
    ``1 − p_t > 0``, a positive per-row scale that no map sees. ``q`` is the softmax of the other
    logits, computed directly (the target masked to ``−∞``), so a confident ``p_t = 1.0`` in float32
    loses nothing. ``temperature`` ``T`` (a number or a ``(B, 1)`` tensor) spreads ``q``: ``T → 0``
    is the rival seed (:func:`rival_seed`), ``T → ∞`` the uniform ``1/(N−1)`` (the margin start's
    contrast). Shape ``(B, N)``; the row sums are 0."""
    others = logits.detach().scatter(1, targets.view(-1, 1), float("-inf"))
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        others = others / temperature
    return one_hot_seed(logits, targets) - torch.softmax(others, dim=1).nan_to_num_(0.0)  # one class: no others


def rival_seed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``e_t − e_r`` with ``r = argmax_{k≠t} y_k``, the strongest competitor: the pairwise contrast
    ``y_t − y_r`` that the softmax start becomes as its temperature goes to 0 (``q`` → one-hot on
    ``r``). Shape ``(B, N)``; one class: the one-hot alone."""
    seed = one_hot_seed(logits, targets)
    if logits.shape[1] < 2:
        return seed
    rival = logits.detach().scatter(1, targets.view(-1, 1), float("-inf")).argmax(dim=1, keepdim=True)
    return seed.scatter_(1, rival, -1.0)


def relevance_seed(logits: torch.Tensor, targets: torch.Tensor, starts, temperatures=None) -> torch.Tensor:
    """The gradient that seeds a relevance backward at the logits, per row (``starts``: one
    :data:`STARTS` value per row; the LRP convention ``R_y = y ⊙ g_y``). Shape ``(B, N)``.

    - ``target``: ``R_y = e_t`` (``g = e_t / y``; ΣR = 1);
    - ``contrastive``: ``R_y = e_t − (1 − e_t)/N``, each class's relevance divided by its own logit
      in the ε-rule of the head (``g = R_y / y``; ΣR = 1/N) — near-zero logits amplify their ``−1/N``;
    - ``margin``: the contrastive start as one virtual output ``m = y_t − Σ_{c≠t} y_c / N`` with
      relevance 1 (``g = (e_t − (1 − e_t)/N) / m``; ΣR = 1);
    - ``softmax``: the virtual output ``z = Σ_k s_k y_k = y_t − Σ_{k≠t} q_k y_k`` with
      ``s = e_t − q`` (:func:`softmax_seed`, ``∝ ∂ log p_t / ∂y``) and relevance ``z`` itself:
      ``g = s``, ``R_y = y ⊙ s``, ΣR = z. The ε-rule of that one unit ``w_t − Σ_{k≠t} q_k w_k``
      (``R_x = x ⊙ (Wᵀs) · R_z / z``) is then a gradient × input with no division at all: ``z``
      may be negative (a runner-up class explained against the winner) without flipping the sign.
      The head's rows summing to ≈ 0 leaves this contrast intact, because ``q`` is not uniform.
      ``temperatures`` (one per row, default 1): ``q = softmax_{k≠t}(y / T)`` (:func:`softmax_seed`).
    - ``rival``: the same with ``s = e_t − e_r`` (:func:`rival_seed`): ``z = y_t − y_r``, the target
      against its strongest competitor only (the softmax start's zero-temperature limit).
    """
    logits = logits.detach()
    starts = list(starts)
    rows = lambda kind: torch.tensor([s == kind for s in starts], device=logits.device).view(-1, 1)  # noqa: E731
    contrastive = rows("contrastive").to(logits.dtype)
    seed = contrastive_seed(logits, targets, contrastive) / stabilize(logits, 1e-12)
    if "margin" in starts:
        uniform = contrastive_seed(logits, targets, True)
        margin = (uniform * logits).sum(dim=1, keepdim=True)
        seed = torch.where(rows("margin"), uniform / stabilize(margin, 1e-12), seed)
    if "softmax" in starts:
        temperature = 1.0 if temperatures is None or all(t == 1 for t in temperatures) else \
            torch.tensor([float(t) for t in temperatures], device=logits.device, dtype=logits.dtype).view(-1, 1)
        seed = torch.where(rows("softmax"), softmax_seed(logits, targets, temperature), seed)
    if "rival" in starts:
        seed = torch.where(rows("rival"), rival_seed(logits, targets), seed)
    return seed


#: ``start`` and ``temperature`` as ``option_choices`` placeholders: both are validated by
#: :meth:`RelevanceStartOptions.options` (``resolve_start``, ``check_temperature``), not by the base
START_OPTION_CHOICES = {"start": (None, (None,) + STARTS), "temperature": (None, (None,))}


class RelevanceStartOptions:
    """``options(given)``: the base resolution of the other options, then ``start`` reconciled with
    ``contrastive`` (``resolve_start``; :attr:`DEFAULT_START` when the request names neither) and the
    softmax start's ``temperature`` checked against it (``check_temperature``)."""

    #: a request naming one of these takes none of them from a deployment's defaults
    coupled_options = (("start", "contrastive", "temperature"),)
    #: the initial relevance when a request names neither ``start`` nor ``contrastive``
    DEFAULT_START = "contrastive"

    def options(self, given):
        given = dict(given or {})
        start = given.pop("start", None)
        temperature = given.pop("temperature", None)
        resolved = resolve_start(self.name, super().options(given), start, "contrastive" in given,
                                 self.DEFAULT_START)
        return check_temperature(self.name, resolved, temperature)
