"""Server-side audit trail: one JSON line per explained request, written off the request thread.

:class:`AuditLog` is opt-in from the handler's ``model-config.yaml``::

    handler:
      audit_log: /var/log/camserve/audit-{pid}.jsonl   # enables it; {pid} → worker process id
      audit_store_heatmap: false                      # true: the heatmap PNGs go into the record (base64)
      audit_max_bytes: 10485760                       # rotate when the file would exceed this
      audit_backups: 5                                # keep audit.jsonl.1 … .5

``record(...)`` only builds a small dict (references to the bytes, no hashing, no JSON, no I/O) and
puts it on an unbounded queue; a daemon writer thread hashes, serialises and appends, flushing after
each drained burst. Rotation is size-based (``path`` → ``path.1`` → … → ``path.N``, the oldest
dropped) and happens between whole records, so every line of every file is one complete record.
:meth:`AuditLog.close` (also run at interpreter exit) drains the queue: a record accepted by
``record`` is never lost. One writer per file: TorchServe runs each worker in its own process, so
with several workers put ``{pid}`` in the path.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import queue
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

_STOP = object()
ENV_AUDIT_LOG = "CAMSERVE_AUDIT_LOG"


class AuditLog:
    """Append-only JSON Lines audit file with size-based rotation and a background writer."""

    def __init__(self, path: str, store_heatmap: bool = False, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5):
        if max_bytes < 1024:
            raise ValueError(f"audit_max_bytes must be at least 1024, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"audit_backups must be ≥ 0, got {backups}")
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_heatmap = bool(store_heatmap)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.written = 0
        self.rotations = 0
        self.errors = 0
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")
        self._size = self._file.tell()
        self._thread = threading.Thread(target=self._run, name="camserve-audit", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]],
                    environ: Optional[Mapping[str, str]] = None) -> Optional["AuditLog"]:
        """An :class:`AuditLog` from the handler section of ``model-config.yaml``; ``None`` when
        ``audit_log`` is not set (the default: no audit). An operator may also switch it on without
        rebuilding the archive: ``CAMSERVE_AUDIT_LOG=path`` in TorchServe's environment (used when
        the YAML names no path; the other ``audit_*`` keys still come from the YAML)."""
        config = config or {}
        environ = os.environ if environ is None else environ
        path = config.get("audit_log") or environ.get(ENV_AUDIT_LOG)
        if not path:
            return None
        return cls(str(path), store_heatmap=_as_bool(config.get("audit_store_heatmap", False)),
                   max_bytes=int(config.get("audit_max_bytes", 10 * 1024 * 1024)),
                   backups=int(config.get("audit_backups", 5)))

    # -- request thread -----------------------------------------------------------------------
    def record(self, *, model: str, model_version: Optional[str] = None, request_id: Optional[str] = None,
               input_bytes: Optional[bytes] = None, input_sha256: Optional[str] = None,
               options: Optional[Mapping[str, Any]] = None, topk: Optional[Sequence[Any]] = None,
               explanation_seconds: Optional[float] = None, heatmaps: Optional[Sequence[bytes]] = None,
               **extra: Any) -> None:
        """Queue one audit record (cheap: no hashing, encoding or I/O on the caller's thread).

        ``input_bytes`` (bytes, or :class:`Base64` text) is hashed by the writer (or pass
        ``input_sha256``); ``heatmaps`` are the encoded maps (PNG bytes, :class:`Base64` PNG text, or
        any JSON value such as a ``format=array`` map): their SHA-256 is always recorded, the maps
        themselves (base64) only when ``store_heatmap``. ``extra`` keys go into the record as they are.
        """
        item = {
            "time": time.time(), "request_id": request_id or str(uuid.uuid4()), "model": model,
            "model_version": model_version, "input_bytes": input_bytes, "input_sha256": input_sha256,
            "options": dict(options) if options else {}, "topk": list(topk) if topk is not None else None,
            "explanation_seconds": explanation_seconds, "heatmaps": list(heatmaps or ()), "extra": extra,
        }
        with self._lock:  # so that no record slips in behind close()'s stop mark
            if self._closed:
                raise RuntimeError("the audit log is closed")
            self._queue.put(item)

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Write everything queued, then stop the writer and close the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every record queued so far is written and flushed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            burst = [item]
            while True:  # drain what is waiting, then flush once
                try:
                    burst.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = []
            for item in burst:
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    try:
                        self._write(self._line(item))
                    except Exception:  # a bad record must not kill the writer
                        self.errors += 1
            try:
                self._file.flush()
            except Exception:
                self.errors += 1
            for event in events:
                event.set()
        self._file.close()

    def _line(self, item: Dict[str, Any]) -> str:
        heatmaps = item.pop("heatmaps")
        data = item.pop("input_bytes")
        extra = item.pop("extra")
        if item["input_sha256"] is None and data is not None:
            item["input_sha256"] = hashlib.sha256(_as_bytes(data)).hexdigest()
        item["time"] = datetime.fromtimestamp(item["time"], timezone.utc).isoformat(timespec="microseconds")
        heatmaps = [_as_bytes(h) for h in heatmaps]
        item["heatmap_sha256"] = [hashlib.sha256(h).hexdigest() for h in heatmaps]
        item["heatmap_stored"] = self.store_heatmap
        if self.store_heatmap:
            item["heatmaps_base64"] = [base64.b64encode(h).decode("ascii") for h in heatmaps]
        item.update(extra)
        return json.dumps(item, ensure_ascii=False, default=str) + "\n"

    def _write(self, line: str) -> None:
        size = len(line.encode("utf-8"))
        if self._size > 0 and self._size + size > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._size += size
        self.written += 1

    def _rotate(self) -> None:
        """``path.{N-1}`` → ``path.N`` … ``path`` → ``path.1``; with no backups the file restarts."""
        self._file.flush()
        self._file.close()
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{index}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
        self._size = 0
        self.rotations += 1

    def files(self) -> list:
        """The current file and its backups, newest first."""
        names = [self.path] + [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.backups + 1)]
        return [p for p in names if p.exists()]


class Base64(str):
    """Base64 text to be decoded by the writer thread (not on the request thread)."""


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, Base64):
        return base64.b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def record_answers(audit: AuditLog, handler: Any, answered: Sequence[Any], context: Any = None) -> int:
    """Queue one audit record per *explained* image of a handled TorchServe batch; returns the count.

    ``answered`` is what :meth:`CamserveHandler.after_batch` receives: ``(index, ParsedRequest,
    results | error)``; a result is the per-image answer dict (``predictions``, ``explanation``).
    Plain predictions and failed requests are not audited. Cheap on the calling thread: references
    only (hashes, base64 decoding and JSON happen on the writer thread).
    """
    manifest = getattr(handler, "manifest", None) or {}
    model_version = (manifest.get("model") or {}).get("modelVersion")
    model_name = getattr(handler, "model_name", None) or (manifest.get("model") or {}).get("modelName")
    count = 0
    for index, request, outcome in answered:
        if request is None or not isinstance(outcome, list):
            continue
        ts_request_id = None
        if context is not None:
            try:
                ts_request_id = context.get_request_id(index)
            except Exception:  # noqa: BLE001 - direct calls without a request processor
                ts_request_id = None
        for position, result in enumerate(outcome):
            explanation = result.get("explanation") if isinstance(result, dict) else None
            if not explanation:
                continue
            item = request.items[position] if position < len(request.items) else None
            payload = (item.payloads.get("image") if item is not None else None)
            if isinstance(payload, str):
                payload = Base64(payload)
            heatmaps = explanation.get("heatmaps") or ([explanation["heatmap"]] if "heatmap" in explanation else None)
            if heatmaps is not None:
                heatmaps = [Base64(h) if isinstance(h, str) else h for h in heatmaps]
            else:
                arrays = explanation.get("arrays") or ([explanation["array"]] if "array" in explanation else [])
                heatmaps = arrays
            options = {k: explanation.get(k) for k in ("method", "layer", "targets", "options", "format")
                       if k in explanation}
            audit.record(model=model_name, model_version=model_version,
                         request_id=ts_request_id or request.request_id, input_bytes=payload,
                         options=options, topk=result.get("predictions"),
                         explanation_seconds=explanation.get("seconds"), heatmaps=heatmaps,
                         client_request_id=request.request_id, position=position,
                         envelope=getattr(request, "envelope", None), batch_size=result.get("batch_size"))
            count += 1
    return count


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
