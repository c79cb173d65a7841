"""Early elimination on the choose half: stop measuring a candidate that has clearly lost.

The choose half is measured in slices of ``slice_images`` images (the last slice takes the rest).
After each slice but the last, at each stage, on the ``n`` images seen so far:

* the **current best** is the survivor with the highest mean ``overall`` among those passing the
  required checks (all survivors when none passes); LayerCAM counts as a survivor;
* a survivor ``c`` is **eliminated** when it is clearly below the best — the paired difference
  ``d_i = overall_i^c − overall_i^best`` has ``mean(d) + z · SEM(d) < 0`` — or clearly fails a
  required check, each judged ``z`` standard errors from its bound: **C** the paired difference of
  ``rho12`` to LayerCAM's ``> z · SEM`` above 0, **D** ``mean(cds)`` or ``mean(oma)`` ``< −z · SEM``,
  **R** ``mean(rho_rand_all) − z · SEM ≥ max_rho_rand``.

The best and LayerCAM (the paired baseline of every figure) are never eliminated. The survivors
continue on the next slice; the choice is made on the whole half among the survivors. Every
elimination is recorded (candidate, images seen, the reason, the difference and its SEM), and the
eliminated candidate's choose-half row is its figures on the images it saw (``n`` says how many).
With ``z = 3`` a candidate whose true mean equals the best's is dropped at one look with
probability about 0.1 % (normal approximation); a few looks keep it well under 1 %.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

from camserve.engine.evaluation.metrics import mean_and_sem, paired

#: per-image keys of a record (:func:`camserve.lab.evaluate_faithfulness.evaluate_one`)
PER_IMAGE = ("del0", "delB", "ins", "overall0", "overallB", "rho12", "cds", "oma", "rho_rand_head", "rho_rand_all")
#: timing keys of a record, summed when records are joined
SECONDS = ("explain_seconds", "curve_seconds", "randomisation_seconds")


def slices(n: int, slice_images: int) -> List[slice]:
    """``[0, s), [s, 2s), …`` over ``n`` images, the last one taking the rest; one slice when
    ``slice_images`` is 0 (no elimination) or covers them all."""
    if slice_images <= 0 or slice_images >= n:
        return [slice(0, n)]
    starts = list(range(0, n, slice_images))
    if n - starts[-1] < slice_images and len(starts) > 1:
        starts.pop()  # a short tail joins the previous slice
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def join(first: dict, second: dict) -> dict:
    """Two records of one (layer, reading) on consecutive image sets as one: per-image lists
    concatenated, mean curves weighted by image counts, seconds summed."""
    n1, n2 = first["n"], second["n"]
    joined = dict(first, n=n1 + n2)
    for key in PER_IMAGE:
        if key in first:
            joined[key] = list(first[key]) + list(second[key])
    joined["mean_curves"] = {k: [(a * n1 + b * n2) / (n1 + n2) for a, b in zip(v, second["mean_curves"][k])]
                             for k, v in first["mean_curves"].items()}
    for key in SECONDS:
        if key in first:
            joined[key] = round(first[key] + second[key], 3)
    return joined


def first_images(record: dict, n: int) -> dict:
    """``record`` on its first ``n`` images only (per-image lists cut; mean curves left as they are)."""
    if record["n"] == n:
        return record
    return dict(record, n=n, **{k: record[k][:n] for k in PER_IMAGE if k in record})


def eliminate(records: Dict[str, dict], eligible: Sequence[str], baseline: str, checks: str,
              max_rho_rand: float, z: float, combined: Callable[[dict], List[float]],
              passes: Callable[[dict], bool]) -> List[dict]:
    """The eliminations at one stage after a slice (see the module docstring): ``records`` are the
    survivors' records (and the baseline's) on the same images, ``eligible`` the names that may be
    chosen, ``passes(record)`` whether a record passes the required checks. Returns
    ``[{"name", "after_images", "reason", "vs_best", "sem", "best"}]``."""
    base = records[baseline]
    names = [n for n in records if n in eligible]
    passing = [n for n in names if passes(records[n])]
    best = max(passing or names, key=lambda n: mean_and_sem(combined(records[n]))[0])
    out = []
    for name in names:
        record = records[name]
        if name in (best, baseline):
            continue
        versus = paired(combined(record), combined(records[best]))
        entry = {"name": name, "after_images": record["n"], "best": best, "vs_best": versus["diff"],
                 "sem": versus["sem"]}
        failed = clearly_failed(record, base, checks, max_rho_rand, z)
        if versus["diff"] + z * versus["sem"] < 0:
            entry["reason"] = f"below {best} by {-versus['diff']:.3f} ± {versus['sem']:.3f} (> {z:g} SEM)"
        elif failed:
            entry["reason"] = f"clearly fails check {failed}"
        else:
            continue
        out.append(entry)
    return out


def clearly_failed(record: dict, base: dict, checks: str, max_rho_rand: float, z: float) -> str:
    """The first required check ``record`` fails by more than ``z`` standard errors, with the figure
    (``""`` when none)."""
    for check in checks:
        if check == "C":
            cmp = paired(record["rho12"], base["rho12"])
            if cmp["diff"] - z * cmp["sem"] > 0:
                return f"C (rho12 {cmp['diff']:+.3f} ± {cmp['sem']:.3f} above LayerCAM's)"
        elif check == "D":
            for key in ("cds", "oma"):
                mean, sem = mean_and_sem(record[key])
                if mean + z * sem < 0:
                    return f"D ({key} {mean:+.3f} ± {sem:.3f})"
        elif check == "R" and "rho_rand_all" in record:
            mean, sem = mean_and_sem(record["rho_rand_all"])
            if mean - z * sem >= max_rho_rand:
                return f"R (rho_rand_all {mean:.3f} ± {sem:.3f} ≥ {max_rho_rand})"
    return ""


def survivors_after(names: Sequence[str], eliminated: List[dict]) -> List[str]:
    """``names`` without the eliminated ones, in order."""
    gone = {e["name"] for e in eliminated}
    return [n for n in names if n not in gone]
