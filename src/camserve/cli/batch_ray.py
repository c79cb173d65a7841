"""``camserve batch … --ray [ADDRESS]``: the same batch run as a Ray Data pipeline.

    camserve batch PHOTOS/ --out runs/night1 --ray                      # a local Ray cluster, 1 worker
    camserve batch s3://bucket/photos/ --out runs/night1 --ray auto --workers 8 --gpus-per-worker 1

Same inputs, settings, keys (``sha256(content):settings_id``), outputs (heatmap/overlay PNGs and
thumbnails under ``images/``, ``records.jsonl`` + ``records.parquet``, ``report.html``) and
resumability as the local run (:mod:`camserve.cli.batch`); only who does the work changes:

1. **driver** — discovers the inputs (local folders / list files / files as today, or any URI that
   ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ``hdfs://`` …), reads ``records.jsonl`` and computes the
   settings id, then cuts the input list into blocks of ``--batch-size`` paths (``ray.data.from_arrow``).
2. **read + hash + filter + decode** — one fused CPU task per block (``map_batches``, ``num_cpus=1``):
   reads each file's bytes where it lies, hashes them (sha256), and drops every row whose key is
   already recorded (its bytes are never decoded; it travels on as a bare "skipped" row so the summary
   can count it); the rest are decoded to RGB pixels, or marked failed with the local run's reason.
   Hashing runs in these tasks, not in the driver, so a cluster reads each file once, where it lies.
3. **explain** — ``map_batches`` with a stateful class on an actor pool (``--workers`` actors, each
   ``--gpus-per-worker`` GPUs and ``--cpus-per-worker`` CPUs): each actor builds the same
   :class:`~camserve.cli.batch_steps.LocalBackend` as a local run (any model spec), explains its block
   in one batched call and renders PNG bytes and the record (:func:`~camserve.cli.batch_steps.render_item`).
4. **driver** — consumes the output blocks as they complete: writes each block's files (atomic
   renames), then appends its records in one write + fsync (:class:`~camserve.cli.records.RecordStore`).

Guarantees: only the driver writes records, one block at a time after the block's files, and it
drops any key it has already written in this run; so Ctrl-C / SIGTERM to the driver, or a killed Ray
worker, loses at most the blocks in flight, a retried task (Ray restarts a dead actor and resends its
batches) cannot add a record twice, and a rerun skips every recorded key. Because only the driver
writes, ``--out`` is a folder of the driver's machine (a local disk or a mounted shared filesystem).
Inputs with the same bytes have the same key: with ``--ray`` such duplicates are recorded once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from camserve.cli import batch_steps as batch_module
from camserve.cli.batch_embedding import check_embedding_args, is_embedding_run, local_backend, run_method_and_layer
from camserve.engine.errors import ExplanationInputError
from camserve.engine.imaging.render import encode_png, to_uint8
from camserve.cli import report as report_module
from camserve.cli.records import RecordStore

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.\-\[\]:]+:\d+)$")

# -- inputs: local paths as the local run finds them, plus pyarrow filesystems ------------------


def is_uri(path: str) -> bool:
    return bool(URI.match(str(path)))


_FILESYSTEMS: Dict[Tuple[str, str], Tuple[Any, str]] = {}


def _filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` of a URI. The filesystem is made once per scheme and
    host in each process (an S3 one resolves its region and credentials when made), then reused for
    every URI that starts with the same prefix (``s3://``, ``file://``, ``hdfs://host:port`` …)."""
    from urllib.parse import urlsplit

    from pyarrow import fs as pafs

    parts = urlsplit(uri)
    cached = _FILESYSTEMS.get((parts.scheme, parts.netloc))
    if cached is not None and "?" not in uri and uri.startswith(cached[1]):
        return cached[0], uri[len(cached[1]):]
    filesystem, inner = pafs.FileSystem.from_uri(uri)
    if "?" not in uri and inner and uri.endswith(inner):
        _FILESYSTEMS[(parts.scheme, parts.netloc)] = (filesystem, uri[: len(uri) - len(inner)])
    return filesystem, inner


def _uri_join(base_uri: str, entry: str) -> str:
    return entry if is_uri(entry) else base_uri.rsplit("/", 1)[0] + "/" + entry.lstrip("/")


def discover(inputs: Sequence[str]) -> List[str]:
    """Input paths as strings: local items exactly as :func:`camserve.cli.batch_steps.discover_inputs`
    finds them (absolute paths), URIs through ``pyarrow.fs`` (a folder: its image files, recursive,
    sorted; a ``.txt``/``.lst``/``.list`` file: its lines, relative ones against the list's folder);
    unique, in order."""
    from pyarrow import fs as pafs

    found: List[str] = []
    local: List[str] = []

    def flush_local():
        if local:
            found.extend(str(p) for p in batch_module.discover_inputs(local))
            local.clear()

    for item in inputs:
        if not is_uri(item):
            local.append(item)
            continue
        flush_local()
        filesystem, path = _filesystem(item)
        scheme = item.split("://", 1)[0]
        info = filesystem.get_file_info(path)
        prefix = item[: len(item) - len(path)] if item.endswith(path) else f"{scheme}://"
        if info.type == pafs.FileType.Directory:
            entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            found.extend(sorted(prefix + e.path for e in entries if e.type == pafs.FileType.File
                                and os.path.splitext(e.path)[1].lower() in batch_module.IMAGE_SUFFIXES))
        elif info.type == pafs.FileType.File and os.path.splitext(path)[1].lower() in batch_module.LIST_SUFFIXES:
            with filesystem.open_input_stream(path) as f:
                text = f.read().decode("utf-8")
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(_uri_join(item, line) if not os.path.isabs(line) else line)
        else:
            found.append(item)  # a missing object is recorded as failed, like a missing file
    flush_local()
    unique, seen = [], set()
    for path in found:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


def read_bytes(path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """The file's bytes, or why it could not be read (the local run's wording for local files)."""
    if not is_uri(path):
        try:
            return Path(path).read_bytes(), None
        except OSError as error:
            return None, f"unreadable: {error.strerror or error}"
    try:
        filesystem, inner = _filesystem(path)
        with filesystem.open_input_stream(inner) as f:
            return f.read(), None
    except Exception as error:  # FileNotFoundError, OSError from S3/GCS …
        return None, f"unreadable: {type(error).__name__}: {error}"


# -- stage 2: read + hash + filter + decode (CPU tasks) -----------------------------------------
# memory a decode task reserves: its worker process (Python + torch + PIL: ~370 MiB measured by Ray's
# issue detector here) and, per image of its block, the file's bytes and the decoded pixels
DECODE_MEMORY_BASE = 512 * 1024 * 1024
DECODE_MEMORY_PER_IMAGE = 32 * 1024 * 1024
BLOCK_SCHEMA = None  # built lazily (pyarrow imported on the workers)


def _block_schema():
    global BLOCK_SCHEMA
    if BLOCK_SCHEMA is None:
        import pyarrow as pa

        BLOCK_SCHEMA = pa.schema([("path", pa.string()), ("key", pa.string()), ("skipped", pa.bool_()),
                                  ("sha256", pa.string()), ("size", pa.int64()), ("error", pa.string()),
                                  ("read_seconds", pa.float64()), ("height", pa.int32()), ("width", pa.int32()),
                                  ("pixels", pa.large_binary())])
    return BLOCK_SCHEMA


_RESOLVED: Dict[str, Any] = {}


def _resolve(value):
    """An ``ObjectRef`` (the recorded keys, put once by the driver) fetched once per worker process."""
    if type(value).__name__ != "ObjectRef":
        return value
    key = value.hex()
    if key not in _RESOLVED:
        import ray

        _RESOLVED.clear()
        _RESOLVED[key] = ray.get(value)
    return _RESOLVED[key]


def read_hash_decode(table, *, sid: str, skip_keys) -> Any:
    """One block of paths → one block of rows: recorded keys become bare ``skipped`` rows (never
    decoded), the others carry their RGB pixels (``height × width × 3`` uint8 bytes) or an error."""
    import hashlib

    import pyarrow as pa

    skip_keys = _resolve(skip_keys)
    rows: Dict[str, List[Any]] = {name: [] for name in _block_schema().names}
    for path in table.column("path").to_pylist():
        start = time.perf_counter()
        data, error = read_bytes(path)
        sha = hashlib.sha256(data).hexdigest() if data is not None else None
        key = f"{sha}:{sid}" if sha else f"path:{path}:{sid}"
        skipped = key in skip_keys
        height = width = pixels = None
        if not skipped and error is None:
            # the local run's decoder: the same pixels, the same error texts
            item = batch_module.decode(batch_module.Item(path, sha, len(data), data))
            if item.error is None:
                height, width = item.hw
                pixels = item.image.permute(1, 2, 0).contiguous().numpy().tobytes()
            error = item.error
        for name, value in (("path", path), ("key", key), ("skipped", skipped), ("sha256", sha),
                            ("size", len(data) if data is not None else 0), ("error", error),
                            ("read_seconds", time.perf_counter() - start), ("height", height),
                            ("width", width), ("pixels", pixels)):
            rows[name].append(value)
    return pa.table(rows, schema=_block_schema())


# -- stage 3: explain (actors) ------------------------------------------------------------------
def _output_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("status", pa.string()), ("record", pa.string()),
                      ("names", pa.list_(pa.string())), ("blobs", pa.list_(pa.large_binary())),
                      ("worker", pa.string())])


class ExplainWorker:
    """An actor holding one engine (:class:`~camserve.cli.batch_steps.LocalBackend`, any model spec).

    ``__call__`` explains one block in one batched call and returns per row its status, its record
    (JSON) and its files (names + bytes); skipped rows pass through bare."""

    def __init__(self, args_dict: Dict[str, Any], settings, cwd: str, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative spec paths (--model-file, --weights, --labels) as on the driver
        args = argparse.Namespace(**args_dict)
        self.backend = local_backend(args)
        self.backend.explainer  # load now: a broken spec fails the actor, not the first batch
        self.backend.description = f"ray:{self.backend.device}"
        self.settings = settings
        self.sid = settings.settings_id
        self.metrics = batch_module.score_function() if settings.scores else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, table):
        import numpy as np
        import pyarrow as pa
        import torch

        settings, sid, backend = self.settings, self.sid, self.backend
        rows = table.to_pylist()
        out: Dict[str, List[Any]] = {name: [] for name in _output_schema().names}

        def emit(key, status, record=None, files=()):
            out["key"].append(key)
            out["status"].append(status)
            out["record"].append(None if record is None else json.dumps(record, ensure_ascii=False, sort_keys=True))
            out["names"].append([name for name, _ in files])
            out["blobs"].append([data for _, data in files])
            out["worker"].append(self.worker)

        items, good = [], []
        for row in rows:
            if row["skipped"]:
                emit(row["key"], "skipped")
                continue
            item = batch_module.Item(row["path"], row["sha256"], row["size"] or 0, None, error=row["error"])
            item.read_seconds = row["read_seconds"] or 0.0
            if item.error is None:
                array = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], 3)
                item.image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
                good.append(item)
            items.append(item)
        results: List[Any] = []
        if good:
            try:
                results = backend.run(good, settings)
            except ExplanationInputError as error:
                raise BatchInputError(str(error)) from None
        explained = [r for r in results if not isinstance(r, str)]
        if self.metrics is not None and explained:
            t = time.perf_counter()
            for result, scores in zip(explained, batch_module.compute_scores(self.metrics, backend.model, explained,
                                                                             settings.score_steps)):
                result.scores = scores
                result.seconds["scores_batch"] = time.perf_counter() - t
        rendered: Dict[int, Tuple[list, dict]] = {}
        for item, result in zip(good, results):
            if isinstance(result, str):
                item.error = result
                continue
            try:
                rendered[id(item)] = batch_module.render_item(item, result, settings, sid, backend, encode_png, to_uint8)
            except Exception as error:  # one image's rendering must not stop the run
                item.error = f"rendering failed: {type(error).__name__}: {error}"
        for item in items:
            if item.error is not None:
                record = batch_module.failed_record(item, settings, sid, backend)
                emit(record["key"], "failed", record)
            else:
                files, record = rendered[id(item)]
                emit(record["key"], "done", record, files)
        return pa.table(out, schema=_output_schema())


class BatchInputError(ValueError):
    """The engine refused the settings (e.g. an unknown layer): the run stops with its message."""


# -- the driver ---------------------------------------------------------------------------------
def _engine_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags an actor's :class:`LocalBackend` needs (plain values, picklable)."""
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    values["out"] = str(args.out)
    return values


def _driver_backend(args: argparse.Namespace):
    """Model name, version and profile for the settings id, exactly as the local run computes them
    (a spec model is built once on the driver's CPU for its profile; the bundled one is not loaded)."""
    driver_args = argparse.Namespace(**vars(args))
    driver_args.device = "cpu"
    return local_backend(driver_args)


def _start_ray(args: argparse.Namespace, log_dir: Optional[str]):
    """``ray.init``: join ``--ray ADDRESS`` (or ``$RAY_ADDRESS`` for a bare ``--ray``), else start a
    local cluster with this machine's CPUs, no dashboard, its logs in ``log_dir``."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = args.ray if args.ray != "local" else os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": "WARNING"} if args.quiet else {}
    if address:
        try:
            ray.init(address=address, **quiet)  # its dashboard, logs and resources are the cluster's
        except ConnectionError as error:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                    "; a cluster with Ray's token authentication needs RAY_AUTH_MODE=token and its token "
                    "(~/.ray/auth_token or RAY_AUTH_TOKEN) on the driver")
            raise SystemExit(f"camserve batch: cannot join the Ray cluster at {address}: {error}{hint}") from None
        return f"ray:{address}"
    needed = math.ceil(args.workers * max(args.cpus_per_worker, 0)) + 1
    cpus = args.ray_cpus or max(os.cpu_count() or 1, needed)
    gpus = None
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        pass
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, _temp_dir=log_dir,
             **quiet)
    return f"ray:local({cpus} CPU{'' if cpus == 1 else 's'}{f', {gpus} GPU' if gpus else ''})"


def _ray_error(error: BaseException) -> Optional[str]:
    """The message of a :class:`BatchInputError` raised in a worker, found in the chain of the Ray
    exception that carried it to the driver (``cause``, ``__cause__``, ``__context__``), else in its text."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BatchInputError):
            return str(current)
        for link in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(link, BaseException):
                queue.append(link)
    match = re.search(r"BatchInputError: (.+)", str(error))
    return match.group(1).strip() if match else None


def run_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        import ray.data
    except ImportError:
        raise SystemExit("camserve batch --ray needs Ray Data: pip install 'camserve[ray]' "
                         "(or the ray[data] line of requirements-extras.txt)") from None
    import pyarrow as pa

    if args.server:
        raise SystemExit("camserve batch: --ray runs the engine in Ray actors; it does not combine with --server")
    if not ADDRESS.match(args.ray):
        raise SystemExit(f"camserve batch: --ray {args.ray!r} is not an address (host:port, ray://host:port, auto); "
                         "put --ray after the inputs or write --ray=ADDRESS")
    if args.workers < 1:
        raise SystemExit("camserve batch: --workers must be ≥ 1")
    if is_uri(str(args.out)) or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/", str(args.out)):
        raise SystemExit("camserve batch: --out must be a folder of the driver's machine (the driver writes "
                         "every record and file); inputs may be URIs")
    if is_embedding_run(args):
        check_embedding_args(args)
    if args.scores and batch_module.score_function() is None:
        raise SystemExit("camserve batch: --scores is not implemented yet: camserve.engine.evaluation.metrics "
                         "(deletion/insertion) is not available in this installation")

    out: Path = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = discover(args.inputs)
    if not paths:
        raise SystemExit("camserve batch: no input images found")

    backend = _driver_backend(args)
    method, layer = run_method_and_layer(args, backend)
    settings = batch_module.Settings(
        model=backend.model_name, model_version=backend.model_version, method=method, layer=layer,
        target=str(args.target), options=batch_module.parse_options(args.option), topk=args.topk,
        colormap=args.colormap, alpha=args.alpha, overlay_max_side=args.overlay_max_side, scores=bool(args.scores),
        score_steps=args.score_steps,
        extra={"backend": "ray", "batch_size": args.batch_size, "workers": args.workers,
               "gpus_per_worker": args.gpus_per_worker, "cpus_per_worker": args.cpus_per_worker})
    del backend  # the actors build their own
    sid = settings.settings_id
    store = RecordStore(out / "records.jsonl")
    skip_status = {"done"} if args.retry_failed else {"done", "failed"}
    skip_keys: Set[str] = {k for k, r in store.latest_by_key().items() if r.get("status") in skip_status}

    log_dir = None if args.ray != "local" or os.environ.get("RAY_ADDRESS") else tempfile.mkdtemp(prefix="camserve-ray-")
    started = time.perf_counter()
    description = _start_ray(args, log_dir)
    ray_startup = time.perf_counter() - started
    if args.gpus_per_worker > 0 and log_dir is not None:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < args.gpus_per_worker:
            ray.shutdown()
            shutil.rmtree(log_dir, ignore_errors=True)
            raise SystemExit(f"camserve batch: --gpus-per-worker {args.gpus_per_worker:g} but the local Ray cluster "
                             f"has {gpus:g} GPU(s); join a cluster with GPUs (--ray ADDRESS) or drop the flag")
    settings.extra["backend"] = description
    (out / "settings.json").write_text(json.dumps(
        {"settings_id": sid, **settings.identity(), **settings.extra, "inputs": [str(i) for i in args.inputs]},
        indent=2, default=str))

    counts = {"done": 0, "skipped": 0, "failed": 0, "duplicates": 0}
    written: Set[str] = set()
    interrupted = failed_run = False
    restore_sigterm = batch_module.install_sigterm_as_interrupt()  # after ray.init: ours, not Ray's
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not args.quiet
        context.enable_operator_progress_bars = not args.quiet
        context.print_on_execution_start = not args.quiet
        context.enable_auto_log_stats = False
        blocks = [pa.table({"path": chunk}) for chunk in batch_module.chunks(paths, args.batch_size)]
        skip_ref = ray.put(frozenset(skip_keys))
        dataset = (ray.data.from_arrow(blocks)
                   # CPU tasks; their memory request (a block's bytes + pixels) also differs from the
                   # actors' remote args, which keeps Ray from fusing decoding into the engine actors
                   .map_batches(read_hash_decode, batch_size=None, batch_format="pyarrow", num_cpus=1,
                                memory=DECODE_MEMORY_BASE + DECODE_MEMORY_PER_IMAGE * args.batch_size,
                                fn_kwargs={"sid": sid, "skip_keys": skip_ref})
                   .map_batches(ExplainWorker, batch_size=None, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=args.workers),
                                num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker or None,
                                fn_constructor_kwargs={"args_dict": _engine_args(args), "settings": settings,
                                                       "cwd": os.getcwd(),
                                                       "threads": max(1, int(round(args.cpus_per_worker)))}))
        limit = args.limit if args.limit is not None else None
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            records = []
            for row in block.to_pylist():
                if row["status"] == "skipped":
                    counts["skipped"] += 1
                    continue
                if row["key"] in written or row["key"] in skip_keys:
                    counts["duplicates"] += 1  # same bytes twice in the inputs, or a block Ray re-ran
                    continue
                if limit is not None and counts["done"] + counts["failed"] + len(records) >= limit:
                    break
                for name, data in zip(row["names"], row["blobs"]):
                    if name.endswith("-thumb.jpg") and (out / name).exists():
                        continue
                    batch_module.write_atomic(out / name, data)
                record = json.loads(row["record"])
                record["worker"] = row["worker"]  # host:pid of the actor that explained it
                records.append(record)
                written.add(row["key"])
            store.append(records)  # the block's files are in place; then its records, one write + fsync
            for record in records:
                counts["done" if record["status"] == "done" else "failed"] += 1
            if limit is not None and counts["done"] + counts["failed"] >= limit:
                break
    except KeyboardInterrupt:
        interrupted = True
    except Exception as error:
        message = _ray_error(error)
        failed_run = message is None  # bad settings: the message says it all, the logs go
        if message is not None:
            raise SystemExit(f"camserve batch: {message}") from None
        if log_dir:
            print(f"camserve batch: the Ray pipeline failed; Ray logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        finished = time.perf_counter()  # the last record is written: the run's time, as locally
        restore_sigterm()
        try:
            ray.shutdown()
        except BaseException:
            pass
        shutdown = time.perf_counter() - finished
        if log_dir and not interrupted and not failed_run:
            shutil.rmtree(log_dir, ignore_errors=True)
    elapsed = finished - started
    parquet = store.write_parquet()
    report_path = None
    if not args.no_report:
        mine = [r for r in store.records if r.get("settings_id") == sid]
        report_path = report_module.write_report(out, mine, batch_module.settings_summary(settings, sid, args))
    processed = counts["done"] + counts["failed"]
    work = elapsed - ray_startup
    rate = processed / elapsed if elapsed > 0 else 0.0
    extra = f", {counts['duplicates']} duplicate key(s) dropped" if counts["duplicates"] else ""
    print(f"camserve batch: {'INTERRUPTED — ' if interrupted else ''}done {counts['done']}, "
          f"skipped {counts['skipped']} (already recorded), failed {counts['failed']}, "
          f"of {len(paths)} inputs in {elapsed:.1f} s ({rate:.2f} images/s, {description}, "
          f"{args.workers} worker{'s' if args.workers != 1 else ''}; Ray start-up {ray_startup:.1f} s, "
          f"pipeline {work:.1f} s, shutdown {shutdown:.1f} s{extra})")
    for r in store.records[-processed:] if processed else []:
        if r["status"] == "failed":
            print(f"  failed: {r['input']}: {r['error']}")
    written_files = ([str(out / "records.jsonl")] + ([str(parquet)] if parquet else [])
                     + ([str(report_path)] if report_path else []))
    print("  wrote " + ", ".join(written_files))
    if log_dir and interrupted:
        print(f"  Ray logs kept in {log_dir}")
    return 130 if interrupted else 0
