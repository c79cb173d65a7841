"""``camserve drift``: has the model started looking somewhere else? Map summaries of a reference
window against current windows, per model, per predicted class and overall; ``drift.json``,
``drift.html`` and an exit code for a scheduled job.

    camserve drift --reference runs/baseline --current /var/log/camserve/ --out reports/today
    camserve drift --reference audit.jsonl --reference-window 7d --window 1d --out reports/
    camserve drift --reference audit.jsonl --reference-window 5000 --window 1000 --model effnet_lite0

Inputs are audit logs (a ``.jsonl`` file or a folder of them, rotated files included) or batch outputs
(a ``camserve batch`` folder or its ``records.jsonl``); see :mod:`camserve.ops.drift_records`. With
two inputs the reference is all of ``--reference`` (or its first ``--reference-window``) and the
current is ``--current``; with one input, ``--reference-window`` cuts the log into the reference and
the rest. ``--window`` splits the current part into consecutive windows (a duration ``1h``/``1d`` or
a record count ``500``; default: one window). Each (method, layer) stream present on both sides is
tested separately (:func:`camserve.ops.drift.compare_window`). The verdict is the latest window's
(``--verdict any``: drift in any window).

Exit codes: **0** no drift, **1** drift detected, **2** bad input (no usable record, an empty window,
another model than asked, too few records to test, a malformed option) — with a message on stderr.
Skipped lines (torn, not JSON) and maps are counted in the JSON and warned about, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from camserve.cli import drift_report
from camserve.ops.drift import (ALPHA, MAX_SAMPLES, MIN_SAMPLES, PERMUTATIONS, SEED, DriftSettings, StreamResult,
                                compare_stream)
from camserve.ops.drift_records import RecordsError, Rows, head, parse_span, read_rows, split_windows

EXIT_OK, EXIT_DRIFT, EXIT_INPUT = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, type=Path, metavar="FILE_OR_DIR",
                        help="reference: an audit log (.jsonl or folder) or a batch output (folder or records.jsonl)")
    parser.add_argument("--current", type=Path, default=None, metavar="FILE_OR_DIR",
                        help="current records (same kinds); without it, --reference-window cuts --reference in two")
    parser.add_argument("--reference-window", default=None, metavar="SPAN",
                        help="the reference is the first SPAN of --reference: a duration (90s, 30m, 1h, 1d, 2w) "
                             "or a record count (500); needed when there is no --current")
    parser.add_argument("--window", default=None, metavar="SPAN",
                        help="split the current records into consecutive windows of SPAN (default: one window)")
    parser.add_argument("--model", default=None, help="the model to test when a log holds several")
    parser.add_argument("--method", default=None, help="test only this method's maps (default: every method/layer)")
    parser.add_argument("--layer", default=None, help="test only this layer's maps")
    parser.add_argument("--out", type=Path, default=None, help="folder for drift.json and drift.html (created)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help=f"false-discovery level of the BH-corrected tests (default: {ALPHA})")
    parser.add_argument("--min-samples", type=int, default=MIN_SAMPLES,
                        help=f"rows a class needs in the reference and in a window to be tested (default: {MIN_SAMPLES})")
    parser.add_argument("--permutations", type=int, default=PERMUTATIONS,
                        help=f"permutations of the MMD and class-histogram tests (default: {PERMUTATIONS})")
    parser.add_argument("--max-samples", type=int, default=MAX_SAMPLES,
                        help=f"rows per side of one MMD test, subsampled beyond (default: {MAX_SAMPLES})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed of the permutations (default: {SEED})")
    parser.add_argument("--overall-only", action="store_true", help="do not test predicted classes one by one")
    parser.add_argument("--verdict", choices=("latest", "any"), default="latest",
                        help="exit 1 when the latest window drifts (default) or when any window does")
    parser.add_argument("--report-classes", type=int, default=12,
                        help="classes shown with pictures in drift.html, drifted first (default: 12)")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")


def _fail(message: str) -> int:
    print(f"camserve drift: {message}", file=sys.stderr)
    return EXIT_INPUT


def _describe(rows: Rows, name: str) -> Dict[str, Any]:
    c = rows.counts
    return {"source": rows.source, "role": name, "lines": c.lines, "records": c.records, "rows": len(rows),
            "skipped": {"torn_or_not_json_lines": c.bad_lines, "failed_records": c.failed,
                        "records_without_summaries": c.without_summaries, "maps_of_other_targets": c.other_targets,
                        "records_of_other_models": c.other_models, "ill_formed_summaries": c.bad_summaries},
            "model_versions": sorted(set(rows.version.tolist())), "settings_ids": sorted(set(rows.settings_id.tolist()))}


def _check_settings(args: argparse.Namespace) -> DriftSettings:
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.min_samples < 2:
        raise ValueError(f"--min-samples must be ≥ 2, got {args.min_samples}")
    if args.permutations < 1 or args.max_samples < 2:
        raise ValueError("--permutations must be ≥ 1 and --max-samples ≥ 2")
    return DriftSettings(alpha=args.alpha, min_samples=args.min_samples, permutations=args.permutations,
                         max_samples=args.max_samples, seed=args.seed, classes=not args.overall_only)


def _sides(args: argparse.Namespace, warnings: List[str]):
    """(reference rows, current rows, inputs description) from the arguments; RecordsError/ValueError."""
    ref_span = parse_span(args.reference_window) if args.reference_window else None
    reference_all = read_rows(args.reference, args.model)
    model = str(reference_all.model[0])
    warnings += reference_all.counts.warnings(str(args.reference))
    inputs = [_describe(reference_all, "reference")]
    if args.current is None:
        if ref_span is None:
            raise RecordsError("one input needs --reference-window (e.g. 7d or 5000) to cut it into a reference "
                               "and current windows; or give --current")
        reference, current = head(reference_all, ref_span)
        if not len(current):
            raise RecordsError(f"the current window is empty: the reference window {ref_span.text} covers all "
                               f"{reference_all.counts.records} record(s) of {args.reference}")
    else:
        current = read_rows(args.current, model)
        warnings += current.counts.warnings(str(args.current))
        inputs.append(_describe(current, "current"))
        reference = head(reference_all, ref_span)[0] if ref_span else reference_all
    if not len(reference):
        raise RecordsError(f"the reference window is empty ({args.reference})")
    return model, reference, current, inputs


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    warnings: List[str] = []
    try:
        settings = _check_settings(args)
        span = parse_span(args.window) if args.window else None
        model, reference, current, inputs = _sides(args, warnings)
        streams = _streams(reference, current, args, warnings)
        results: List[StreamResult] = []
        for method, layer in streams:
            ref_rows, cur_rows = reference.stream(method, layer), current.stream(method, layer)
            windows = [w for w in split_windows(cur_rows, span) if len(w.rows)]
            if not windows:
                raise RecordsError(f"{method} at {layer}: the current window is empty")
            results.append(compare_stream(method, layer, ref_rows, windows, settings, args.verdict))
    except (RecordsError, ValueError) as error:
        for note in warnings:
            print(f"camserve drift: warning: {note}", file=sys.stderr)
        return _fail(str(error))
    _version_notes(reference, current, warnings)
    for note in warnings:
        print(f"camserve drift: warning: {note}", file=sys.stderr)
    verdicts = [r.verdict for r in results]
    verdict = "drift" if "drift" in verdicts else ("no drift" if "no drift" in verdicts else "too few")
    code = {"drift": EXIT_DRIFT, "no drift": EXIT_OK}.get(verdict, EXIT_INPUT)
    body = {"verdict": verdict, "exit_code": code, "model": model, "inputs": inputs,
            "settings": {"alpha": settings.alpha, "min_samples": settings.min_samples,
                         "permutations": settings.permutations, "max_samples": settings.max_samples,
                         "seed": settings.seed, "classes": settings.classes, "window": args.window,
                         "reference_window": args.reference_window, "verdict_rule": args.verdict},
            "warnings": warnings, "streams": [r.to_json() for r in results]}
    body["seconds"] = {"tests": round(time.perf_counter() - started, 3)}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report_start = time.perf_counter()
        drift_report.write_report(args.out / "drift.html", body, results, args.report_classes)
        body["seconds"]["report"] = round(time.perf_counter() - report_start, 3)
        (args.out / "drift.json").write_text(json.dumps(body, indent=1, allow_nan=False))
    if not args.quiet:
        _print_summary(body, results)
    if code == EXIT_INPUT:
        print(f"camserve drift: too few records to test (a class or the whole window needs ≥ {settings.min_samples} "
              f"rows on each side)", file=sys.stderr)
    return code


def _streams(reference: Rows, current: Rows, args: argparse.Namespace, warnings: List[str]):
    wanted = [s for s in reference.streams() if (args.method is None or s[0] == args.method)
              and (args.layer is None or s[1] == args.layer)]
    present = set(current.streams())
    common = [s for s in wanted if s in present]
    for method, layer in sorted(present - set(reference.streams())):
        warnings.append(f"the current records have {method} maps at {layer}, the reference has none: not compared")
    if not common:
        raise RecordsError(f"no method/layer in common: reference {reference.streams()}, current {current.streams()}"
                           + (f" (asked for method={args.method}, layer={args.layer})" if args.method or args.layer else ""))
    return common


def _version_notes(reference: Rows, current: Rows, warnings: List[str]) -> None:
    ref_versions, cur_versions = set(reference.version.tolist()), set(current.version.tolist())
    if ref_versions != cur_versions:
        warnings.append(f"model versions differ: reference {sorted(ref_versions)}, current {sorted(cur_versions)}")
    ref_ids, cur_ids = set(reference.settings_id.tolist()), set(current.settings_id.tolist())
    if ref_ids != cur_ids and not (ref_ids | cur_ids) <= {""}:
        warnings.append(f"settings ids differ: reference {sorted(ref_ids)}, current {sorted(cur_ids)} "
                        f"(maps of other settings may differ without any drift)")


def _print_summary(body: Dict[str, Any], results: List[StreamResult]) -> None:
    print(f"camserve drift: {body['model']}: {body['verdict'].upper()}")
    for stream in results:
        for window, result in stream.windows:
            overall = result.group("overall")
            flagged = [g.name for g in result.groups if g.status == "drift" and g.name != "overall"]
            tested = sum(g.status in ("drift", "no drift") for g in result.groups) - 1
            too_few = sum(g.status == "too few" for g in result.groups if g.name != "overall")
            q = overall.q if overall is not None else float("nan")
            print(f"  {stream.method} @ {stream.layer} · {window.label} ({len(window.rows)} vs {result.n_reference} rows): "
                  f"{result.verdict}; overall q = {q:.3g}; classes tested {tested}, drifted {len(flagged)}"
                  f"{' ' + str(flagged[:10]) if flagged else ''}, too few {too_few}; "
                  f"prediction p = {_fmt(result.prediction.get('p'))}, confidence p = {_fmt(result.confidence.get('p'))}")


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3g}"
