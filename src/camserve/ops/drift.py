"""Explanation drift: has the model started looking somewhere else? Two-sample tests between a
reference window and a current window of map summaries, per predicted class and overall, with
prediction and confidence drift beside them for context. numpy, scipy and threadpoolctl (all BSD-3-Clause).

**The small maps: MMD with a Gaussian kernel.** For reference grids ``x₁…x_m`` and current grids
``y₁…y_n`` (16 × 16, flattened to ℝ²⁵⁶) and ``k(a, b) = exp(−‖a − b‖² / (2σ²))``, the unbiased

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j).

The bandwidth is the median heuristic on the reference: ``σ² = median_{i<j} ‖x_i − x_j‖²`` (over at
most :data:`MAX_SAMPLES` reference grids). The p-value is a permutation test: the ``m + n`` grids are
pooled, the kernel matrix ``K`` computed once, and ``B`` random relabellings (seeded RNG) give
statistics ``T_b``; with the observed ``T₀``

    p = (1 + #{b : T_b ≥ T₀}) / (1 + B).

Vectorised: with the label matrix ``A ∈ {0,1}^{(B+1)×N}`` (row 0 the observed split), ``KA = A K``
gives every split's sums at once, ``S_xx = Σ (KA ∘ A)``, ``S_xy = Σ KA − S_xx``, ``S_yy = 1ᵀK1 − S_xx −
2 S_xy`` (``k(a, a) = 1`` is subtracted for the ``i ≠ j`` sums) — one ``(B+1) × N × N`` product.
Each side is subsampled (seeded) to at most :data:`MAX_SAMPLES` grids, so a test costs at most
``1001 × 1000²`` multiply-adds (≈ 0.5 s on 2 cores). The permutations run in chunks of 100 and stop
early once ``(1 + #{T_b ≥ T₀}) / (1 + B)`` — a lower bound of the full p — exceeds ``α/2``: the MMD
enters a group's p as ``2·p_MMD``, so it could no longer reject, and BH's decisions are those of
all ``B`` permutations (a group with ``p > α`` is never rejected and moves no other group across
the threshold); the reported ``p_mmd`` is then the estimate from the permutations done
(``permutations`` in the JSON). Most groups of a quiet window stop after 100 permutations.
The bandwidth is at least :data:`MIN_SIGMA2` (a class served one repeated image has all distances 0).

**The statistics**: a two-sample Kolmogorov–Smirnov test per statistic (``STATISTICS``: centroid x/y,
spread, entropy, centre mass, border mass, coverage, peaks), combined by Bonferroni:
``p_stats = min(1, 8 · min_s p_s)``. A group's explanation p-value joins both tests by Bonferroni:
``p = min(1, 2 · min(p_MMD, p_stats))``.

**Groups and the false-discovery correction.** The groups of a window are ``overall`` and every
predicted class with at least ``min_samples`` rows in the reference *and* in the current window
(:data:`MIN_SAMPLES` = 20; smaller classes are reported as ``too few``, not tested). Benjamini–Hochberg
over the family of the ``k`` tested groups: with ``p_(1) ≤ … ≤ p_(k)``,

    q_(i) = min_{j ≥ i} min(1, k · p_(j) / j),

and a group drifts when ``q ≤ α``. The window's verdict is *drift* when any group drifts. Under no
drift at all (every null true) BH's chance of any rejection is ≤ α for independent or positively
dependent tests, so α bounds the false-alarm rate when reference and current windows are exchangeable.
The default :data:`ALPHA` = 0.025 keeps a margin below 5 % for what real pools add to that (a reference
and a current set of *other* images that differ a little by chance, e.g. other classes):
``benchmarks/drift_validation.py`` measures the false-alarm rate on real maps (``docs/monitoring.md``).
A permutation p-value is at least ``1/(B+1)``: with ``B`` = 1000 the MMD alone can pass BH's smallest
threshold ``α/k`` for ``k`` up to 25 tested groups (the KS tests have no such floor).

**Context, not part of the verdict**: prediction drift — the chi-square statistic of the 2 × C
table of predicted classes, its asymptotic p-value when every expected count is ≥ 5, else a
permutation p-value (valid for sparse tables with many classes);
confidence drift — a KS test on the top-1 score (overall and per class).

:class:`RollingDrift` is the online form for a server: a rolling window of the latest grids against a
fixed reference, scored every few records with the same MMD permutation test (fewer permutations).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Deque, Dict, List, Optional, Sequence

import numpy as np
from scipy import stats as sps
from threadpoolctl import ThreadpoolController

from camserve.engine.imaging.summary import STATISTICS
from camserve.ops.drift_records import Rows

ALPHA = 0.025
MIN_SAMPLES = 20
PERMUTATIONS = 1000
MAX_SAMPLES = 500
SEED = 0
OVERALL = "overall"
#: statistics this close to the observed one count as ties (≥ T₀): the float32 kernel sums of identical
#: grids (one image requested again and again) differ by rounding only, ~1e-7
TIE_TOLERANCE = 1e-5
#: squared grid distances below this are float rounding (8-bit grids differ by ≥ (1/255)² ≈ 1.5e-5)
DISTANCE_NOISE = 1e-9
#: below this many pooled rows a group's matrix products run on one BLAS thread: small products on
#: several threads cost more in synchronisation than they gain (4.5 s → 0.9 s for ~250 class groups)
SINGLE_THREAD_ROWS = 600
_BLAS = ThreadpoolController()
#: the smallest kernel bandwidth σ²: a reference of one repeated image still has a usable kernel
MIN_SIGMA2 = 1e-3


# -- the tests ---------------------------------------------------------------------------------------------------
def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``‖a_i − b_j‖²`` for rows of ``a`` (m × d) and ``b`` (n × d); float rounding below
    :data:`DISTANCE_NOISE` is set to 0 (identical grids are at distance 0, not 1e-13)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    d[d < DISTANCE_NOISE] = 0.0
    return d


def median_bandwidth(reference: np.ndarray, distances: Optional[np.ndarray] = None) -> float:
    """``σ² = median_{i<j} ‖x_i − x_j‖²`` of the reference rows (``distances``: their matrix, when
    already computed); the mean of the positive ones when most pairs are equal (repeated images),
    never below :data:`MIN_SIGMA2`."""
    n = reference.shape[0]
    if n < 2:
        return MIN_SIGMA2
    d = (squared_distances(reference, reference) if distances is None else distances)[np.triu_indices(n, 1)]
    sigma2 = float(np.median(d))
    if sigma2 <= 0:
        positive = d[d > 0]
        sigma2 = float(positive.mean()) if positive.size else MIN_SIGMA2
    return max(sigma2, MIN_SIGMA2)


def permutation_mmd(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, permutations: int = PERMUTATIONS,
                    sigma2: Optional[float] = None, stop_above: Optional[float] = None) -> Dict[str, float]:
    """The unbiased MMD² of rows ``x`` vs ``y`` with a Gaussian kernel and its permutation p-value
    (module docstring); ``sigma2`` defaults to the median heuristic on ``x``. ``stop_above``: stop
    early once ``(1 + #exceedances) / (1 + B)`` — a lower bound of the full p — exceeds it (then
    ``p`` is the estimate from the permutations done, ``permutations`` says how many)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("the MMD test needs at least two rows on each side")
    z = np.concatenate([x, y]).reshape(m + n, -1)
    distances = squared_distances(z, z)
    sigma2 = median_bandwidth(x, distances[:m, :m]) if sigma2 is None else sigma2
    kernel = np.exp(-distances / (2.0 * sigma2)).astype(np.float32)
    return _mmd_from_kernel(kernel, m, rng, permutations, stop_above) | {"sigma2": sigma2}


def _mmd_from_kernel(kernel: np.ndarray, m: int, rng: np.random.Generator, permutations: int,
                     stop_above: Optional[float] = None, chunk: int = 100) -> Dict[str, float]:
    size = kernel.shape[0]
    n = size - m
    diag = np.diag(kernel).astype(np.float64)
    total = float(kernel.sum(dtype=np.float64))

    def statistics(labels: np.ndarray) -> np.ndarray:
        ka = labels @ kernel
        s_xx = (ka * labels).sum(1, dtype=np.float64)
        s_xy = ka.sum(1, dtype=np.float64) - s_xx
        s_yy = total - s_xx - 2.0 * s_xy
        d_x = labels.astype(np.float64) @ diag
        d_y = float(diag.sum()) - d_x
        return (s_xx - d_x) / (m * (m - 1)) + (s_yy - d_y) / (n * (n - 1)) - 2.0 * s_xy / (m * n)

    observed = np.zeros((1, size), dtype=np.float32)
    observed[0, :m] = 1.0
    t0 = float(statistics(observed)[0])
    exceed, done = 0, 0
    while done < permutations:
        k = min(chunk, permutations - done)
        labels = rng.permuted(np.broadcast_to(observed[0], (k, size)), axis=1)
        exceed += int((statistics(labels) >= t0 - TIE_TOLERANCE).sum())
        done += k
        if stop_above is not None and (1.0 + exceed) / (1.0 + permutations) > stop_above:
            break
    return {"mmd2": t0, "p": (1.0 + exceed) / (1.0 + done), "permutations": done}


def ks_statistics(x: np.ndarray, y: np.ndarray) -> Dict[str, Any]:
    """Per statistic (columns of ``x``/``y``, named :data:`STATISTICS`) a two-sample KS test, and
    their Bonferroni combination ``p = min(1, S · min_s p_s)``."""
    result = sps.ks_2samp(x, y, axis=0)
    d, p = np.atleast_1d(result.statistic), np.atleast_1d(result.pvalue)
    p = np.where(np.isfinite(p), p, 1.0)
    per = {name: {"D": round(float(d[i]), 4), "p": float(p[i])} for i, name in enumerate(STATISTICS)}
    return {"per_statistic": per, "p": float(min(1.0, len(STATISTICS) * p.min()))}


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """BH-adjusted q-values ``q_(i) = min_{j≥i} min(1, k p_(j) / j)`` in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    k = p.size
    if not k:
        return p
    order = np.argsort(p)
    scaled = p[order] * k / np.arange(1, k + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    out = np.empty(k)
    out[order] = q
    return out


def class_histogram_test(reference: np.ndarray, current: np.ndarray, rng: np.random.Generator,
                         permutations: int = PERMUTATIONS) -> Dict[str, Any]:
    """Prediction drift: the chi-square statistic of the 2 × C table of predicted classes,
    ``χ² = Σ (O − E)² / E``. When every expected count is ≥ 5 its p-value is the asymptotic χ²(C − 1)
    tail; otherwise (sparse tables: many classes, small windows) a permutation p-value (relabel which
    rows are current, ``(1 + #{χ²_b ≥ χ²₀}) / (1 + B)``), computed in chunks of bounded memory."""
    m, n = reference.size, current.size
    if m == 0 or n == 0:
        return {"chi2": math.nan, "p": math.nan, "classes": 0, "method": "none"}
    _, codes = np.unique(np.concatenate([reference, current]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    c = int(codes.max()) + 1
    if c < 2:
        return {"chi2": 0.0, "p": 1.0, "classes": c, "method": "one class"}
    totals = np.bincount(codes, minlength=c).astype(np.float64)
    e_cur, e_ref = totals * n / (m + n), totals * m / (m + n)

    def chi2_of(cur_counts: np.ndarray) -> np.ndarray:
        ref_counts = totals - cur_counts
        return ((cur_counts - e_cur) ** 2 / e_cur).sum(-1) + ((ref_counts - e_ref) ** 2 / e_ref).sum(-1)

    observed = float(chi2_of(np.bincount(codes[m:], minlength=c).astype(np.float64)))
    if min(e_cur.min(), e_ref.min()) >= 5.0:
        return {"chi2": observed, "p": float(sps.chi2.sf(observed, c - 1)), "classes": c, "method": "asymptotic"}
    exceed, chunk = 0, max(1, 4_000_000 // (m + n))
    for first in range(0, permutations, chunk):
        k = min(chunk, permutations - first)
        shuffled = rng.permuted(np.broadcast_to(codes, (k, m + n)), axis=1)[:, m:]
        offsets = (np.arange(k)[:, None] * c + shuffled).reshape(-1)
        counts = np.bincount(offsets, minlength=k * c).reshape(k, c).astype(np.float64)
        exceed += int((chi2_of(counts) >= observed - 1e-9).sum())
    return {"chi2": observed, "p": (1.0 + exceed) / (1.0 + permutations), "classes": c, "method": "permutation"}


def confidence_test(reference: np.ndarray, current: np.ndarray) -> Dict[str, float]:
    """Confidence drift: a two-sample KS test on the top-1 scores (NaN scores left out)."""
    reference, current = reference[np.isfinite(reference)], current[np.isfinite(current)]
    if reference.size < 2 or current.size < 2:
        return {"D": math.nan, "p": math.nan, "reference_mean": math.nan, "current_mean": math.nan}
    result = sps.ks_2samp(reference, current)
    return {"D": round(float(result.statistic), 4), "p": float(result.pvalue),
            "reference_mean": round(float(reference.mean()), 4), "current_mean": round(float(current.mean()), 4)}


# -- a window against the reference ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftSettings:
    """The test's knobs (defaults: the validated ones)."""

    alpha: float = ALPHA
    min_samples: int = MIN_SAMPLES
    permutations: int = PERMUTATIONS
    max_samples: int = MAX_SAMPLES
    seed: int = SEED
    classes: bool = True  # per predicted class as well as overall


@dataclass
class GroupResult:
    """One group's test (``name`` ``overall`` or a class index as text)."""

    name: str
    label: str
    n_reference: int
    n_current: int
    status: str  # "drift" | "no drift" | "too few"
    p: float = math.nan
    q: float = math.nan
    mmd2: float = math.nan
    p_mmd: float = math.nan
    sigma2: float = math.nan
    permutations: int = 0
    p_statistics: float = math.nan
    statistics: Dict[str, Any] = field(default_factory=dict)
    confidence: Dict[str, float] = field(default_factory=dict)
    reference_mean: Dict[str, float] = field(default_factory=dict)
    current_mean: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return _finite(dict(self.__dict__))


@dataclass
class WindowResult:
    """A current window against the reference: its groups, the verdict, the context tests."""

    verdict: str  # "drift" | "no drift" | "too few"
    groups: List[GroupResult]
    prediction: Dict[str, float]
    confidence: Dict[str, float]
    n_reference: int
    n_current: int

    @property
    def drifted(self) -> bool:
        return self.verdict == "drift"

    def group(self, name: str) -> Optional[GroupResult]:
        return next((g for g in self.groups if g.name == name), None)

    def to_json(self) -> Dict[str, Any]:
        return {"verdict": self.verdict, "n_reference": self.n_reference, "n_current": self.n_current,
                "prediction_drift": _finite(self.prediction), "confidence_drift": _finite(self.confidence),
                "groups": [g.to_json() for g in self.groups]}


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) as ``None`` — JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _subsample(index: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return index if index.size <= limit else np.sort(rng.choice(index, size=limit, replace=False))


def compare_group(reference: Rows, current: Rows, ref_index: np.ndarray, cur_index: np.ndarray, name: str,
               label: str, settings: DriftSettings) -> GroupResult:
    """One group's explanation test (MMD on the grids + KS on the statistics, Bonferroni-joined)."""
    group = GroupResult(name, label, int(ref_index.size), int(cur_index.size), "too few")
    if min(ref_index.size, cur_index.size) < max(settings.min_samples, 2):
        return group
    key = -1 if name == OVERALL else int(name)
    rng = np.random.default_rng([settings.seed, key + 1])
    ref_sub = _subsample(ref_index, settings.max_samples, rng)
    cur_sub = _subsample(cur_index, settings.max_samples, rng)
    x = reference.grids[ref_sub].reshape(ref_sub.size, -1)
    y = current.grids[cur_sub].reshape(cur_sub.size, -1)
    if x.shape[0] + y.shape[0] < SINGLE_THREAD_ROWS:
        with _BLAS.limit(limits=1, user_api="blas"):
            mmd = permutation_mmd(x, y, rng, settings.permutations, stop_above=settings.alpha / 2)
    else:
        mmd = permutation_mmd(x, y, rng, settings.permutations, stop_above=settings.alpha / 2)
    ks = ks_statistics(reference.stats[ref_index], current.stats[cur_index])
    group.mmd2, group.p_mmd, group.sigma2 = mmd["mmd2"], mmd["p"], mmd["sigma2"]
    group.permutations = mmd["permutations"]
    group.p_statistics, group.statistics = ks["p"], ks["per_statistic"]
    group.p = min(1.0, 2.0 * min(group.p_mmd, group.p_statistics))
    group.confidence = confidence_test(reference.confidence[ref_index], current.confidence[cur_index])
    group.reference_mean = dict(zip(STATISTICS, np.round(reference.stats[ref_index].mean(0), 4).tolist()))
    group.current_mean = dict(zip(STATISTICS, np.round(current.stats[cur_index].mean(0), 4).tolist()))
    group.status = "tested"
    return group


def compare_window(reference: Rows, current: Rows, settings: DriftSettings = DriftSettings()) -> WindowResult:
    """``current`` against ``reference`` (rows of one model and one method/layer stream): the overall
    group and each predicted class, BH over the tested groups, the verdict, and the context tests."""
    groups = [compare_group(reference, current, np.arange(len(reference)), np.arange(len(current)), OVERALL,
                         "all classes", settings)]
    if settings.classes:
        classes = np.union1d(reference.predicted[reference.predicted >= 0], current.predicted[current.predicted >= 0])
        ref_order, cur_order = np.argsort(reference.predicted, kind="stable"), np.argsort(current.predicted, kind="stable")
        ref_sorted, cur_sorted = reference.predicted[ref_order], current.predicted[cur_order]
        for c in classes.tolist():
            ref_index = ref_order[np.searchsorted(ref_sorted, c):np.searchsorted(ref_sorted, c, side="right")]
            cur_index = cur_order[np.searchsorted(cur_sorted, c):np.searchsorted(cur_sorted, c, side="right")]
            label = (current.label[cur_index[0]] if cur_index.size else reference.label[ref_index[0]])
            groups.append(compare_group(reference, current, np.sort(ref_index), np.sort(cur_index), str(c), str(label),
                                     settings))
    tested = [g for g in groups if g.status == "tested"]
    for g, q in zip(tested, benjamini_hochberg([g.p for g in tested])):
        g.q = float(q)
        g.status = "drift" if q <= settings.alpha else "no drift"
    verdict = "too few" if not tested else ("drift" if any(g.status == "drift" for g in tested) else "no drift")
    rng = np.random.default_rng([settings.seed, 1_000_003])
    has_classes = (reference.predicted >= 0).any() and (current.predicted >= 0).any()
    prediction = (class_histogram_test(reference.predicted, current.predicted, rng, settings.permutations)
                  if has_classes else {"chi2": math.nan, "p": math.nan, "classes": 0, "method": "none"})
    confidence = confidence_test(reference.confidence, current.confidence)
    return WindowResult(verdict, groups, prediction, confidence, len(reference), len(current))


# -- online ------------------------------------------------------------------------------------------------------
class RollingDrift:
    """A rolling drift score for a server: the latest ``window`` grids against a fixed reference.

    ``RollingDrift(reference_grids, window=200)`` takes the reference as ``(m, 16, 16)`` (or flat)
    arrays — e.g. ``[s.grid_array() for s in summaries]`` of a reference run — and keeps at most
    ``max_reference`` of them (seeded subsample). :meth:`add` appends one grid (the oldest falls out
    once ``window`` are held). :meth:`score` runs the MMD permutation test of the held window against
    the reference (``permutations`` relabellings, default 200) and returns ``1 − p`` in [0, 1]
    (≥ ``1 − α`` reads as drift; NaN until ``min_samples`` grids are held). The reference's
    kernel block and bandwidth are computed once; a score costs one ``(B+1) × N × N`` product with
    ``N = m + window`` — 5–80 ms for ``m = 500``, ``window = 200`` on 2 shared CPU cores — so call it
    every N records (e.g. 50), not per record. :attr:`p_value` keeps the last p. Not thread-safe:
    guard it with the caller's lock.
    """

    def __init__(self, reference_grids: Any, window: int = 200, permutations: int = 200,
                 max_reference: int = MAX_SAMPLES, min_samples: int = MIN_SAMPLES, seed: int = SEED):
        reference = np.asarray(reference_grids, dtype=np.float32)
        reference = reference.reshape(reference.shape[0], -1)
        if reference.shape[0] < 2:
            raise ValueError("RollingDrift needs at least two reference grids")
        if window < 2:
            raise ValueError(f"window must be ≥ 2, got {window}")
        self._rng = np.random.default_rng(seed)
        if reference.shape[0] > max_reference:
            reference = reference[np.sort(self._rng.choice(reference.shape[0], max_reference, replace=False))]
        self.reference = reference
        self.window = int(window)
        self.permutations = int(permutations)
        self.min_samples = max(int(min_samples), 2)
        self.sigma2 = median_bandwidth(reference)
        self._ref_kernel = self._kernel(reference, reference)
        self._grids: Deque[np.ndarray] = deque(maxlen=self.window)
        self.p_value = math.nan

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-squared_distances(a, b) / (2.0 * self.sigma2)).astype(np.float32)

    def add(self, grid: Any) -> None:
        """Append one grid (``16 × 16`` or flat, values in [0, 1])."""
        self._grids.append(np.asarray(grid, dtype=np.float32).reshape(-1))

    def __len__(self) -> int:
        return len(self._grids)

    def score(self) -> float:
        """``1 − p`` of the held window against the reference (NaN while fewer than ``min_samples``)."""
        if len(self._grids) < self.min_samples:
            self.p_value = math.nan
            return math.nan
        current = np.stack(self._grids)
        m = self.reference.shape[0]
        cross = self._kernel(self.reference, current)
        kernel = np.block([[self._ref_kernel, cross], [cross.T, self._kernel(current, current)]])
        self.p_value = _mmd_from_kernel(kernel, m, self._rng, self.permutations)["p"]
        return 1.0 - self.p_value


# -- a stream over windows ----------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """One (method, layer) stream: the reference rows and each current window with its result; the
    verdict is the latest window's (``rule="latest"``) or drift in any window (``rule="any"``)."""

    method: str
    layer: str
    reference: Rows
    windows: List[Any]  # [(Window, WindowResult)] in time order
    rule: str = "latest"

    @property
    def verdict(self) -> str:
        results = [r for _w, r in self.windows]
        if not results:
            return "too few"
        if self.rule == "any":
            if any(r.drifted for r in results):
                return "drift"
            return "no drift" if any(r.verdict == "no drift" for r in results) else "too few"
        return results[-1].verdict

    def to_json(self) -> Dict[str, Any]:
        windows = []
        for window, result in self.windows:
            start, end = window.start, window.end
            windows.append({"label": window.label, "start": _iso(start), "end": _iso(end), **result.to_json()})
        return {"method": self.method, "layer": self.layer, "verdict": self.verdict, "rule": self.rule,
                "n_reference": len(self.reference), "reference_start": _iso(_bound(self.reference.time, min)),
                "reference_end": _iso(_bound(self.reference.time, max)), "windows": windows}


def compare_stream(method: str, layer: str, reference: Rows, windows: Sequence[Any],
                   settings: DriftSettings = DriftSettings(), rule: str = "latest") -> StreamResult:
    """Every current window (:class:`~camserve.ops.drift_records.Window`) against ``reference``."""
    if rule not in ("latest", "any"):
        raise ValueError(f"rule must be 'latest' or 'any', got {rule!r}")
    return StreamResult(method, layer, reference, [(w, compare_window(reference, w.rows, settings)) for w in windows],
                        rule)


def _bound(times: np.ndarray, pick) -> float:
    finite = times[np.isfinite(times)]
    return float(pick(finite)) if finite.size else math.nan


def _iso(seconds: float) -> Optional[str]:
    if not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
