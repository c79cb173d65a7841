"""The batch run's record store: one JSON line per input, appended a whole batch at a time.

``records.jsonl`` is both the result and the resume journal. Each record carries a ``key`` =
``sha256(content) + ":" + settings_id``; a later run with the same settings skips every key already
present (``done`` and, unless asked to retry, ``failed``). A batch's lines are written with one
``write`` and then ``flush`` + ``fsync``, after the batch's image files are in place, so a record
always points at files that exist and an interruption loses at most the batch in flight. A line
cut short by a crash is dropped when the store is reopened (the file is truncated back to its last
complete line), so the next append starts on a fresh line.

Predictions (``topk``) are written in the servers' vocabulary, ``{index, label, score}``
(:class:`camserve.serving.answer.Prediction`); a record written by an earlier version
(``{class, name, prob}``) is read in the same vocabulary, so a resumed run's report mixes both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from camserve.serving.answer import Prediction


def upgraded(record: dict) -> dict:
    """``record`` with its ``topk`` in the servers' vocabulary (``{class, name, prob}`` of earlier
    versions → ``{index, label, score}``); a record already in it is returned as it is."""
    topk = record.get("topk")
    if isinstance(topk, list) and any(isinstance(p, dict) and "index" not in p for p in topk):
        record = dict(record, topk=[Prediction.from_json(p).to_json() if isinstance(p, dict) else p for p in topk])
    return record


class RecordStore:
    """Append-only JSON Lines file with resume lookup by record ``key``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: List[dict] = []
        self.dropped_lines = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a line cut short by an interruption: cut it off
            with open(self.path, "r+b") as f:
                f.truncate(complete)
            self.dropped_lines += 1
        for line in data[:complete].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.dropped_lines += 1
                continue
            if isinstance(record, dict) and "key" in record:
                self.records.append(upgraded(record))

    def latest_by_key(self) -> Dict[str, dict]:
        """The last record written for each key (a retried failure is superseded by its retry)."""
        latest: Dict[str, dict] = {}
        for record in self.records:
            latest[record["key"]] = record
        return latest

    def append(self, records: Iterable[dict]) -> None:
        """Append records as one write, then flush and fsync (durable before the next batch starts)."""
        records = list(records)
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)

    def write_parquet(self, path: Optional[Path] = None) -> Optional[Path]:
        """``records.parquet`` next to the JSONL when ``pyarrow`` is importable (else ``None``).

        Nested fields (top-k, model, timing, scores, options) are stored as JSON strings so the
        schema stays flat and stable across runs; scalar fields keep their types.
        """
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        rows = list(self.latest_by_key().values())
        columns = sorted({k for r in rows for k in r})
        table = {}
        for column in columns:
            values = [r.get(column) for r in rows]
            kinds = {type(v) for v in values if v is not None}
            if kinds and kinds <= {int, float} and float in kinds:
                values = [None if v is None else float(v) for v in values]
            elif kinds & {dict, list} or len(kinds) > 1:  # nested or mixed (e.g. target "top1" / 207)
                values = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]
            table[column] = values
        target = Path(path or self.path.with_suffix(".parquet"))
        tmp = target.with_name(target.name + ".tmp")
        pq.write_table(pa.table(table), tmp)
        os.replace(tmp, target)
        return target
