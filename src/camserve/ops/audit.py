"""Server-side audit trail: one JSON line per explained image, written off the request thread.

:class:`AuditLog` is opt-in from the handler's ``model-config.yaml``::

    handler:
      audit_log: /var/log/camserve/audit-{pid}.jsonl   # enables it; {pid} → worker process id
      audit_store_heatmap: false                      # true: the heatmap PNGs go into the record (base64)
      audit_max_bytes: 10485760                       # rotate when the file would exceed this
      audit_backups: 5                                # keep audit.jsonl.1 … .5
      audit_retries: 8                                # write attempts per record before it is dropped (loudly)
      audit_wait_seconds: 10                          # a batch's answers wait this long for its records

``record(...)`` only builds a small dict (references to the bytes, no hashing, no JSON, no I/O) and
puts it on a queue; a daemon writer thread hashes, serialises and appends. What is guaranteed:

- **Whole lines.** Each record is appended with one ``os.write`` of the complete line on an
  ``O_APPEND`` descriptor (no user-space buffer that a kill could leave half-flushed); a write that
  fails part-way is truncated back to the last whole record before it is retried. Every line of every
  file is one complete JSON record, also after a worker is killed.
- **Retried, never silently lost.** A file removed under the writer is recreated before the next
  record. A failed write (disk full, I/O error) reopens the file and is retried with backoff (0.05 s doubling to 2 s, ``audit_retries`` attempts); a failed
  rotation keeps writing to the current file (it is renamed only after the new file is open) and is
  retried at the next record. Every failed attempt is logged and counted (``errors``,
  ``rotation_errors``); a record that still cannot be written is dropped with an ERROR log line naming
  its ``request_id`` and counted in ``dropped``. While the file stays unwritable (the last record was
  dropped) each further record gets a single attempt, so a dead disk stalls neither the answers nor
  :meth:`close`; the first successful write restores the full retries. The handler exports these as the ``AuditWriteErrors``,
  ``AuditDropped`` and ``AuditPending`` metrics.
- **Written before the answer.** :meth:`wait_written` blocks until everything queued so far is on
  its way to disk; the handler calls it after queuing a batch's records (up to
  ``audit_wait_seconds``), so an explained 200 answer leaves the worker only after its record is in
  the file (the OS page cache: it survives a killed worker, not a power cut — there is no fsync).
- **Drained at close.** :meth:`close` (also run at interpreter exit) waits for the writer to finish
  every queued record (each with its retries), then returns the number dropped.

Rotation is size-based (``path`` → ``path.1`` → … → ``path.N``, the oldest dropped) and happens between
whole records. One writer per file: TorchServe runs each worker in its own process, so with several
workers put ``{pid}`` in the path.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from camserve.engine.core.values import truth

logger = logging.getLogger(__name__)

_STOP = object()
ENV_AUDIT_LOG = "CAMSERVE_AUDIT_LOG"
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.05, 2.0


class AuditLog:
    """Append-only JSON Lines audit file with size-based rotation and a background writer."""

    def __init__(self, path: str, store_heatmap: bool = False, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5, retries: int = 8, wait_seconds: float = 10.0):
        if max_bytes < 1024:
            raise ValueError(f"audit_max_bytes must be at least 1024, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"audit_backups must be ≥ 0, got {backups}")
        if retries < 1:
            raise ValueError(f"audit_retries must be ≥ 1, got {retries}")
        if wait_seconds < 0:
            raise ValueError(f"audit_wait_seconds must be ≥ 0, got {wait_seconds}")
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_heatmap = bool(store_heatmap)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.retries = int(retries)
        self.wait_seconds = float(wait_seconds)
        self.written = 0          # records in the files
        self.rotations = 0
        self.errors = 0           # failed write attempts (each retried)
        self.rotation_errors = 0  # failed rotations (writing went on in the current file)
        self.dropped = 0          # records given up on after every retry (each logged at ERROR)
        self._accepted = 0
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._rotate_after = 0.0  # monotonic time before which a failed rotation is not retried
        self._failing = False     # the last record was dropped: the file is unwritable for now
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
                   backups=int(config.get("audit_backups", 5)), retries=int(config.get("audit_retries", 8)),
                   wait_seconds=float(config.get("audit_wait_seconds", 10.0)))

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
            self._accepted += 1
            self._queue.put(item)

    @property
    def pending(self) -> int:
        """Records accepted but neither written nor dropped yet."""
        return self._accepted - self.written - self.dropped

    def stats(self) -> Dict[str, int]:
        return {"written": self.written, "pending": self.pending, "errors": self.errors,
                "rotation_errors": self.rotation_errors, "dropped": self.dropped, "rotations": self.rotations}

    def close(self, timeout: Optional[float] = None) -> int:
        """Write everything queued (each record with its retries), then stop the writer and close the
        file (idempotent). Waits for the writer unless ``timeout`` (seconds) is given; returns the
        number of records dropped over the log's life (logged at ERROR, never silently)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("audit log %s: close() gave up after %s s with %d record(s) still pending; "
                         "the writer goes on until the process exits", self.path, timeout, self.pending)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        return self.dropped

    def wait_written(self, timeout: Optional[float] = 30.0) -> bool:
        """Block until every record queued so far is written (or dropped after its retries); ``False``
        if ``timeout`` passed first."""
        done = threading.Event()
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.put(done)
        if closed:  # the writer drains everything before its stop mark
            self._thread.join(timeout)
            return self.pending == 0
        return done.wait(timeout)

    flush = wait_written  # the old name

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            burst = [item]
            while True:  # drain what is waiting
                try:
                    burst.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in burst:
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    item.set()  # everything queued before it has been handled
                else:
                    self._write_with_retries(item)
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _write_with_retries(self, item: Dict[str, Any]) -> None:
        request_id = item.get("request_id")
        try:
            line = self._line(item).encode("utf-8")
        except Exception:  # noqa: BLE001 - a record that cannot be serialised cannot be retried either
            self.dropped += 1
            logger.error("audit log %s: record %s dropped: it cannot be serialised", self.path, request_id,
                         exc_info=True)
            return
        delay = FIRST_BACKOFF_S
        # while the file stays unwritable (the last record was dropped) a record gets one attempt, so a
        # dead disk cannot stall the worker or close() for hours; the first success resets this
        attempts = 1 if self._failing else self.retries
        for attempt in range(1, attempts + 1):
            try:
                self._write(line)
                self._failing = False
                return
            except Exception as error:  # noqa: BLE001 - retried below
                self.errors += 1
                logger.warning("audit log %s: write of record %s failed (attempt %d of %d): %s", self.path,
                               request_id, attempt, attempts, error)
                if attempt < attempts:
                    time.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    self._reopen()
        self.dropped += 1
        self._failing = True
        logger.error("audit log %s: record %s DROPPED after %d failed write attempts", self.path, request_id,
                     attempts)

    def _line(self, item: Dict[str, Any]) -> str:
        item = dict(item)
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
        for key, value in extra.items():  # ``…_sha256`` extras given as bytes are hashed here, off the request
            if key.endswith("_sha256") and isinstance(value, (bytes, bytearray, Base64)):
                extra[key] = hashlib.sha256(_as_bytes(value)).hexdigest()
        item.update(extra)
        return json.dumps(item, ensure_ascii=False, default=str) + "\n"

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _reopen(self) -> None:
        """A fresh descriptor on ``path`` (the file may have been removed or the descriptor broken)."""
        try:
            fd = self._open()
        except OSError as error:
            logger.warning("audit log %s: cannot reopen: %s", self.path, error)
            return
        old, self._fd = self._fd, fd
        self._size = os.fstat(fd).st_size
        try:
            os.close(old)
        except OSError:
            pass

    def _write(self, line: bytes) -> None:
        if os.fstat(self._fd).st_nlink == 0:  # the file was removed under us: writing on would vanish
            logger.warning("audit log %s: the file was removed; reopening it", self.path)
            self._reopen()
        if self._size > 0 and self._size + len(line) > self.max_bytes and time.monotonic() >= self._rotate_after:
            try:
                self._rotate()
            except Exception as error:  # noqa: BLE001 - keep writing to the current file; retry later
                self.rotation_errors += 1
                self._rotate_after = time.monotonic() + FIRST_BACKOFF_S
                logger.warning("audit log %s: rotation failed (%s); writing on in the current file", self.path,
                               error)
        before = self._size
        view = memoryview(line)
        try:
            while view:  # one write normally; a short write is continued, never left torn
                count = os.write(self._fd, view)
                view = view[count:]
        except BaseException:
            try:  # back to the last whole record before the caller retries
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            raise
        self._size = before + len(line)
        self.written += 1

    def _rotate(self) -> None:
        """``path.{N-1}`` → ``path.N`` … ``path`` → ``path.1``, then a new ``path``; with no backups the
        file restarts empty. The current descriptor stays valid until the new file is open."""
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{index}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            try:
                fd = self._open()
            except OSError:
                os.replace(self.path.with_name(f"{self.path.name}.1"), self.path)  # the old file stays current
                raise
            old, self._fd = self._fd, fd
            os.close(old)
        else:
            os.ftruncate(self._fd, 0)
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
    answers | error)``; an answer is a typed per-image answer (:mod:`camserve.serving.answer`) whose
    ``to_audit_record()`` gives its part of the record — ``kind``, ``heatmaps``, ``explanation_seconds``,
    ``options``, ``topk``, ``batch_size`` and the kind's own fields — or ``None`` when it explains
    nothing. Audited: a classifier ``explanation``, a ``compare`` answer (every method's maps, the
    comparison), an embedding answer with its FAM (similarity, the query/reference maps and gallery
    matches; the reference image's hash too). Plain predictions, plain embeddings and failed requests
    are not audited. Cheap on the calling thread: references only (hashes, base64 decoding and JSON
    happen on the writer thread).
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
        for position, answer in enumerate(outcome):
            to_record = getattr(answer, "to_audit_record", None)
            audited = to_record() if to_record is not None else None
            if audited is None:
                continue
            audited = dict(audited)
            kind = audited.pop("kind")
            options, topk = audited.pop("options"), audited.pop("topk")
            seconds, heatmaps = audited.pop("explanation_seconds"), audited.pop("heatmaps")
            batch_size = audited.pop("batch_size")
            item = request.items[position] if position < len(request.items) else None
            payloads = item.payloads if item is not None else {}
            payload = payloads.get("image")
            if isinstance(payload, str):
                payload = Base64(payload)
            extra = audited  # the kind's own fields (comparison; similarity, matches)
            if kind == "embedding" and isinstance(payloads.get("reference"), (bytes, bytearray, str)):
                reference = payloads["reference"]  # hashed by the writer (see _line)
                extra["reference_sha256"] = Base64(reference) if isinstance(reference, str) else bytes(reference)
            audit.record(model=model_name, model_version=model_version,
                         request_id=ts_request_id or request.request_id, input_bytes=payload,
                         options=options, topk=topk, explanation_seconds=seconds, heatmaps=heatmaps,
                         kind=kind, settings_id=getattr(handler, "settings_id", None),
                         client_request_id=request.request_id, position=position,
                         envelope=getattr(request, "envelope", None), batch_size=batch_size, **extra)
            count += 1
    return count


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return truth(value) is True
    return bool(value)
