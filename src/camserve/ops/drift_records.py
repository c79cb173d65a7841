"""Explanation records → rows for drift tests: audit logs and batch records read into columns, and
the windows (a reference and current windows) that ``camserve drift`` compares.

Inputs (JSON Lines, one record a line):

- an **audit log** (``audit.jsonl``; a folder: every ``*.jsonl`` and rotated ``*.jsonl.N`` in it, the
  workers' files merged by time): ``time`` (ISO 8601 or epoch seconds), ``model``, ``model_version``,
  ``settings_id``, ``kind``, ``topk`` (``[{index, label, score}]``, first = predicted; ``null`` for an
  embedding) and ``summaries`` (one per map: the :class:`~camserve.engine.imaging.summary.MapSummary`
  fields plus ``method``, ``layer``, ``target``);
- **batch records** (``camserve batch``'s ``<out>/records.jsonl``, or the folder holding it):
  ``finished_at``, ``model: {name, version}``, ``settings_id``, ``status``, ``topk``, ``method``,
  ``layer``, ``summaries``; a record's ``thumbnail`` / ``overlays`` (paths relative to the folder) are
  kept for the report's thumbnails.

One row per **map of the predicted class**: a classifier record's summary whose ``target`` is its
top-1 index (or names none), an embedding record's ``query`` map. Maps of other targets, failed
records, records without summaries, torn or non-JSON lines are counted in :class:`ReadCounts`,
never fatal; the caller warns with the counts. A log holding several models needs ``model=``; a log
without the asked model is a :class:`RecordsError` naming the models found.

Windows: a span is a duration (``90s``, ``30m``, ``1h``, ``1d``, ``2w``) or a record count (``500``).
:func:`split_windows` cuts rows, in time order, into consecutive windows of one span (time windows
start at the first row's time; empty time windows are left out).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from camserve.engine.imaging.summary import GRID, STATISTICS

SPAN_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class RecordsError(ValueError):
    """Input that cannot be compared (no file, no usable record, another model, an empty window):
    its message says what was found; ``camserve drift`` exits 2 with it."""


@dataclass
class ReadCounts:
    """What reading skipped, by reason (each a line or map count)."""

    lines: int = 0
    records: int = 0
    rows: int = 0
    bad_lines: int = 0  # torn (partial last line) or not a JSON object
    failed: int = 0  # batch records with status != done
    without_summaries: int = 0
    other_targets: int = 0  # maps of a target other than the predicted class
    other_models: int = 0
    bad_summaries: int = 0  # a summary with a missing or ill-formed field

    def warnings(self, source: str) -> List[str]:
        notes = []
        if self.bad_lines:
            notes.append(f"{source}: skipped {self.bad_lines} torn or non-JSON line(s) of {self.lines}")
        if self.bad_summaries:
            notes.append(f"{source}: skipped {self.bad_summaries} ill-formed summary(ies)")
        if self.without_summaries:
            notes.append(f"{source}: {self.without_summaries} record(s) carry no map summaries (not compared)")
        return notes


@dataclass
class Rows:
    """Columns of ``n`` rows (one per compared map). ``time`` is epoch seconds (NaN when a record has
    none), ``seq`` the record's order within its source, ``predicted`` −1 for embedding records."""

    model: np.ndarray
    version: np.ndarray
    settings_id: np.ndarray
    time: np.ndarray
    seq: np.ndarray
    predicted: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    method: np.ndarray
    layer: np.ndarray
    target: np.ndarray
    grids: np.ndarray  # (n, GRID, GRID) float32 in [0, 1]
    stats: np.ndarray  # (n, len(STATISTICS)) float64
    picture: np.ndarray  # an image file (thumbnail/overlay) for the report, "" when none
    counts: ReadCounts = field(default_factory=ReadCounts)
    source: str = ""

    def __len__(self) -> int:
        return int(self.grids.shape[0])

    def take(self, index: Union[np.ndarray, slice]) -> "Rows":
        columns = {name: getattr(self, name)[index] for name in COLUMNS}
        return Rows(**columns, counts=self.counts, source=self.source)

    def streams(self) -> List[Tuple[str, str]]:
        """The (method, layer) pairs present, most rows first."""
        pairs = Counter(zip(self.method.tolist(), self.layer.tolist()))
        return [pair for pair, _n in pairs.most_common()]

    def stream(self, method: str, layer: str) -> "Rows":
        return self.take((self.method == method) & (self.layer == layer))


COLUMNS = ("model", "version", "settings_id", "time", "seq", "predicted", "label", "confidence", "method",
           "layer", "target", "grids", "stats", "picture")


def parse_time(value: Any) -> float:
    """ISO 8601 (``Z`` or an offset; naive = UTC) or epoch seconds → epoch seconds; NaN if absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return math.nan
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    return math.nan


def input_files(path: Path) -> List[Path]:
    """The JSON Lines files behind ``path``: a file itself; a folder's ``records.jsonl`` (a batch
    output) or else its ``*.jsonl`` and rotated ``*.jsonl.N`` files (an audit log folder)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "records.jsonl").is_file():
            return [path / "records.jsonl"]
        files = sorted(p for p in path.iterdir() if p.is_file() and re.search(r"\.jsonl(\.\d+)?$", p.name))
        if files:
            return files
        raise RecordsError(f"{path}: no records.jsonl and no *.jsonl audit file in this folder")
    raise RecordsError(f"{path}: no such file or folder")


def _model_of(record: Dict[str, Any]) -> Tuple[str, str]:
    model = record.get("model")
    if isinstance(model, dict):
        return str(model.get("name")), str(model.get("version"))
    return str(model), str(record.get("model_version"))


def _predicted(topk: Any) -> Tuple[int, str, float]:
    if isinstance(topk, list) and topk and isinstance(topk[0], dict):
        top = topk[0]
        index = top.get("index", top.get("class"))
        score = top.get("score", top.get("prob"))
        return (int(index) if index is not None else -1, str(top.get("label", top.get("name", index))),
                float(score) if score is not None else math.nan)
    return -1, "", math.nan


def _is_predicted_map(target: Any, predicted: int) -> bool:
    if target is None or target == "top1" or target == "query":
        return True
    if isinstance(target, bool):
        return False
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit()):
        return predicted < 0 or int(target) == predicted
    return False


def read_rows(path: Union[str, Path], model: Optional[str] = None) -> Rows:
    """The rows of one audit log or batch output (see the module docstring), sorted by time. One pass,
    keeping only the compact columns (a record's JSON is dropped as soon as its rows are taken)."""
    files = input_files(Path(path))
    counts = ReadCounts()
    models: Counter = Counter()
    cols: Dict[str, list] = {name: [] for name in COLUMNS if name not in ("grids", "stats")}
    grid_bytes: List[bytes] = []
    stats: List[List[float]] = []
    per_model: Dict[str, ReadCounts] = {}
    seq = 0
    for file in files:
        with open(file, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                counts.lines += 1
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    counts.bad_lines += 1
                    continue
                if not isinstance(record, dict):
                    counts.bad_lines += 1
                    continue
                counts.records += 1
                name, version = _model_of(record)
                models[name] += 1
                _take(record, file, seq, name, version, per_model.setdefault(name, ReadCounts()), cols, grid_bytes,
                      stats)
                seq += 1
    if not counts.records:
        raise RecordsError(f"{path}: no JSON record in {counts.lines} line(s)")
    if model is None and len(models) > 1:
        raise RecordsError(f"{path} holds records of several models ({_model_list(models)}); choose one with --model")
    if model is not None and model not in models:
        raise RecordsError(f"{path} has no record of model {model!r}; it holds {_model_list(models)}")
    chosen = model if model is not None else next(iter(models))
    mine = per_model[chosen]
    for reason in ("failed", "without_summaries", "other_targets", "bad_summaries"):
        setattr(counts, reason, getattr(mine, reason))
    counts.other_models = counts.records - models[chosen]
    keep = np.array([m == chosen for m in cols["model"]], dtype=bool)
    counts.rows = int(keep.sum())
    if not counts.rows:
        raise RecordsError(f"{path}: no map summary of model {chosen!r} in {models[chosen]} record(s) "
                           f"({mine.without_summaries} without summaries, {mine.failed} failed, "
                           f"{mine.bad_summaries} ill-formed)")
    grids = np.frombuffer(b"".join(grid_bytes), dtype=np.uint8).reshape(-1, GRID, GRID).astype(np.float32) / 255.0
    rows = Rows(model=np.array(cols["model"]), version=np.array(cols["version"]),
                settings_id=np.array(cols["settings_id"]), time=np.array(cols["time"], dtype=np.float64),
                seq=np.array(cols["seq"], dtype=np.int64), predicted=np.array(cols["predicted"], dtype=np.int64),
                label=np.array(cols["label"]), confidence=np.array(cols["confidence"], dtype=np.float64),
                method=np.array(cols["method"]), layer=np.array(cols["layer"]), target=np.array(cols["target"]),
                grids=grids, stats=np.array(stats, dtype=np.float64).reshape(-1, len(STATISTICS)),
                picture=np.array(cols["picture"]), counts=counts, source=str(path)).take(keep)
    order = np.lexsort((rows.seq, np.nan_to_num(rows.time, nan=np.inf)))  # by time, then file order
    sorted_rows = rows.take(order)
    sorted_rows.seq = _record_order(sorted_rows)
    return sorted_rows


def _take(record: Dict[str, Any], file: Path, seq: int, name: str, version: str, counts: ReadCounts,
          cols: Dict[str, list], grid_bytes: List[bytes], stats: List[List[float]]) -> None:
    """Append the rows of one record (its maps of the predicted class) to the columns."""
    if record.get("status", "done") != "done":
        counts.failed += 1
        return
    summaries = record.get("summaries")
    if not isinstance(summaries, list) or not summaries:
        counts.without_summaries += 1
        return
    predicted, label, confidence = _predicted(record.get("topk"))
    when = parse_time(record.get("time", record.get("finished_at")))
    picture = _picture(record, file)
    for summary in summaries:
        if not isinstance(summary, dict):
            counts.bad_summaries += 1
            continue
        if not _is_predicted_map(summary.get("target"), predicted):
            counts.other_targets += 1
            continue
        try:
            raw = base64.b64decode(summary["grid"], validate=True)
            centroid = summary["centroid"]
            values = [float(centroid[0]), float(centroid[1])] + [float(summary[s]) for s in STATISTICS[2:]]
        except (KeyError, TypeError, ValueError, IndexError):
            counts.bad_summaries += 1
            continue
        if len(raw) != GRID * GRID:
            counts.bad_summaries += 1
            continue
        grid_bytes.append(raw)
        stats.append(values)
        cols["model"].append(name)
        cols["version"].append(version)
        cols["settings_id"].append(str(record.get("settings_id", "")))
        cols["time"].append(when)
        cols["seq"].append(seq)
        cols["predicted"].append(predicted)
        cols["label"].append(label)
        cols["confidence"].append(confidence)
        cols["method"].append(str(summary.get("method", record.get("method", ""))))
        cols["layer"].append(str(summary.get("layer", record.get("layer", ""))))
        cols["target"].append(str(summary.get("target")))
        cols["picture"].append(picture)


def _record_order(rows: Rows) -> np.ndarray:
    """Per row, its record's rank in time order (rows of one record share it)."""
    if not len(rows):
        return rows.seq
    first = {}
    out = np.empty(len(rows), dtype=np.int64)
    for i, s in enumerate(rows.seq.tolist()):
        out[i] = first.setdefault(s, len(first))
    return out


def _picture(record: Dict[str, Any], file: Path) -> str:
    for key in ("overlays", "thumbnail"):
        value = record.get(key)
        name = value[0] if isinstance(value, list) and value else value
        if isinstance(name, str) and name:
            return str(file.parent / name)
    return ""


def _model_list(models: Counter) -> str:
    return ", ".join(f"{name!r} ({n} records)" for name, n in models.most_common())


# -- windows ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """A window length: ``seconds`` of time or ``count`` records (exactly one is set)."""

    text: str
    seconds: Optional[float] = None
    count: Optional[int] = None


def parse_span(text: str) -> Span:
    """``"1h"`` → 3600 s, ``"500"`` → 500 records; anything else is a ``ValueError``."""
    value = str(text).strip().lower()
    if re.fullmatch(r"\d+", value):
        if int(value) < 1:
            raise ValueError(f"a window of {value} records is empty")
        return Span(value, count=int(value))
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window {text!r}: give a duration like 90s, 30m, 1h, 1d, 2w or a record count like 500")
    return Span(value, seconds=float(match.group(1)) * SPAN_UNITS[match.group(2)])


@dataclass
class Window:
    """One window of rows and its bounds (epoch seconds, NaN when rows carry no time)."""

    label: str
    rows: Rows

    @property
    def start(self) -> float:
        return float(np.nanmin(self.rows.time)) if len(self.rows) and np.isfinite(self.rows.time).any() else math.nan

    @property
    def end(self) -> float:
        return float(np.nanmax(self.rows.time)) if len(self.rows) and np.isfinite(self.rows.time).any() else math.nan


def head(rows: Rows, span: Span) -> Tuple[Rows, Rows]:
    """``rows`` cut after its first ``span`` (records or time from the first row): (head, rest)."""
    if span.count is not None:
        mask = rows.seq < span.count
    else:
        if not np.isfinite(rows.time).any():
            raise RecordsError(f"{rows.source}: the records carry no time; give the window as a record count")
        mask = rows.time < np.nanmin(rows.time) + span.seconds
    return rows.take(mask), rows.take(~mask)


def split_windows(rows: Rows, span: Optional[Span], prefix: str = "current") -> List[Window]:
    """Consecutive windows of ``span`` over ``rows`` (in time order); ``None``: one window of all."""
    if span is None or not len(rows):
        return [Window(prefix, rows)]
    if span.count is not None:
        first = rows.seq - rows.seq.min()
        index = first // span.count
    else:
        if not np.isfinite(rows.time).any():
            raise RecordsError(f"{rows.source}: the records carry no time; give the window as a record count")
        index = np.floor((rows.time - np.nanmin(rows.time)) / span.seconds).astype(np.int64)
    windows = []
    for k in np.unique(index):
        windows.append(Window(f"{prefix} {len(windows) + 1}", rows.take(index == k)))
    return windows

