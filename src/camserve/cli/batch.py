"""``camserve batch``: explain a folder (or a list of files), resumably, into PNGs, records and a report.

    camserve batch PHOTOS/ --method shallowcam --layer _blocks.2 --out runs/night1
    camserve batch list.txt --server http://127.0.0.1:8080 --token-file key_file.json --out runs/night1

Per input image it writes, under ``--out``:

- ``images/<sha>-<settings>-heatmap.png`` — the map (grayscale, model-input frame, one per target);
- ``images/<sha>-<settings>-overlay.png`` — the colormap blended over the *original* photograph, the
  map placed into the crop box the model saw (outside it the photo is dimmed);
- ``images/<sha>-thumb.jpg`` — a small copy of the original for the report;
- one line in ``records.jsonl`` (and ``records.parquet`` when ``pyarrow`` is importable);
- ``report.html`` — a static gallery, see :mod:`camserve.cli.report`.

Work is keyed by ``sha256(file) : settings_id`` (model, version, method, layer, target, options,
rendering, scores): a second run skips every key already recorded. Records are appended one batch
at a time (flush + fsync), so an interruption loses at most the batch in flight. A file that cannot
be read or decoded is recorded as ``failed`` with its reason and the run goes on.

Locally the engine runs on the GPU when there is one (``--device``); with ``--server`` each image is
POSTed to TorchServe's classifier endpoint (``batch-size`` requests in flight, the server batches),
and the returned heatmap is rendered here the same way. With ``--ray [ADDRESS]`` the same run is a
Ray Data pipeline (CPU decoding tasks, engine actors, records written per block by the driver), on a
local Ray cluster or a running one: see :mod:`camserve.cli.batch_ray`. With ``--task embed --gallery
G.npz`` the model is an embedding model and each image is explained against its best gallery matches
(:mod:`camserve.cli.batch_embedding`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List

from camserve.cli import report as report_module
from camserve.cli.batch_embedding import (check_embedding_args, is_embedding_run, local_backend,
                                          run_method_and_layer)
from camserve.cli.batch_steps import (chunks, compute_scores, decode, DEFAULT_MODEL, discover_inputs,
                                      failed_record, finish_item, hash_file, install_sigterm_as_interrupt,
                                      Item, parse_options, score_function, ServerBackend,
                                      Settings, settings_summary)
from camserve.cli.records import RecordStore
from camserve.commands.model_args import add_model_arguments
from camserve.engine.errors import ExplanationInputError
from camserve.engine.imaging.render import encode_png, to_uint8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image folders, image files, or .txt files listing image paths")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: effnet_lite0)")
    parser.add_argument("--method", default=None,
                        help="explanation method (default: shallowcam; fam for an embedding run)")
    parser.add_argument("--layer", default=None, help="layer to explain (default: the model profile's default layer)")
    parser.add_argument("--target", default="top1",
                        help="'top1', 'topK' or a class index (default: top1); an embedding run: topK gallery matches")
    parser.add_argument("--gallery", type=Path, default=None,
                        help="an embedding run (--task embed): the gallery (.npz/.pt) each image is matched and "
                             "explained against")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, repeatable (e.g. spatial=relevance)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (or requests in flight)")
    parser.add_argument("--topk", type=int, default=5, help="predictions recorded per image (default: 5)")
    parser.add_argument("--colormap", default="jet", help="overlay colormap: jet, inferno, viridis, gray")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colormap (default: 0.5)")
    parser.add_argument("--overlay-max-side", type=int, default=512,
                        help="longest side of overlay PNGs; larger originals are scaled down (default: 512)")
    parser.add_argument("--scores", action="store_true",
                        help="also compute deletion/insertion scores of each map (costly: many extra forwards)")
    parser.add_argument("--score-steps", type=int, default=16,
                        help="steps of the deletion/insertion curves (2·(steps−1)+3 forwards per image)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1' …")
    parser.add_argument("--server", default=None, help="TorchServe inference URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--management", default=None,
                        help="TorchServe management URL for the model's version (default: the --server port + 1)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="TorchServe key_file.json; its 'inference' key is sent as a bearer token")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout with --server (s)")
    parser.add_argument("--limit", type=int, default=None, help="process at most N new images in this run")
    parser.add_argument("--retry-failed", action="store_true", help="try again the inputs recorded as failed")
    parser.add_argument("--no-report", action="store_true", help="do not (re)write report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    add_model_arguments(parser)  # --source/--arch/--weights/…: any model an archive accepts (local runs)
    ray = parser.add_argument_group("Ray Data (camserve[ray])")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on Ray Data: bare --ray starts a local Ray cluster on this machine (or joins "
                          "$RAY_ADDRESS when set); --ray ADDRESS joins a running one (host:port, ray://host:port, "
                          "auto). Put it after the inputs, or write --ray=ADDRESS")
    ray.add_argument("--workers", type=int, default=1, help="--ray: explaining actors, each holding an engine (default: 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0,
                     help="--ray: GPUs per actor (default: 0; 1 = one GPU each, so --workers = number of GPUs)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="--ray: CPUs reserved per actor; also its torch threads (default: 1)")
    ray.add_argument("--ray-cpus", type=int, default=None,
                     help="--ray without an address: CPUs of the local cluster "
                          "(default: this machine's, at least workers × cpus-per-worker + 1)")


def run(args: argparse.Namespace) -> int:

    if args.batch_size < 1:
        raise SystemExit("camserve batch: --batch-size must be ≥ 1")
    if getattr(args, "ray", None):
        from camserve.cli.batch_ray import run_ray  # needs camserve[ray]; imported only when asked for

        return run_ray(args)
    if is_embedding_run(args):
        check_embedding_args(args)
    if args.token_file and not args.server:
        raise SystemExit("camserve batch: --token-file only makes sense with --server")
    metrics = None
    if args.scores:
        if args.server:
            raise SystemExit("camserve batch: --scores needs the model in this process; not available with --server")
        metrics = score_function()
    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = discover_inputs(args.inputs)
    if not paths:
        raise SystemExit("camserve batch: no input images found")

    backend = ServerBackend(args) if args.server else local_backend(args)
    method, layer = run_method_and_layer(args, backend)
    settings = Settings(model=backend.model_name, model_version=backend.model_version, method=method,
                        layer=layer, target=str(args.target), options=parse_options(args.option),
                        topk=args.topk, colormap=args.colormap, alpha=args.alpha,
                        overlay_max_side=args.overlay_max_side, scores=bool(args.scores),
                        score_steps=args.score_steps,
                        extra={"backend": backend.description, "batch_size": args.batch_size})
    sid = settings.settings_id
    store = RecordStore(out / "records.jsonl")
    previous = store.latest_by_key()
    skip_status = {"done"} if args.retry_failed else {"done", "failed"}
    (out / "settings.json").write_text(json.dumps(
        {"settings_id": sid, **settings.identity(), **settings.extra, "inputs": [str(i) for i in args.inputs]},
        indent=2, default=str))

    counts = {"done": 0, "skipped": 0, "failed": 0}
    pending: List[Item] = []
    started = time.perf_counter()
    for path in paths:
        sha, size, data, error = hash_file(path)
        key = f"{sha}:{sid}" if sha else f"path:{path}:{sid}"
        if previous.get(key, {}).get("status") in skip_status:
            counts["skipped"] += 1
            continue
        pending.append(Item(path, sha, size, data, error=error))
    if args.limit is not None:
        pending = pending[: max(0, args.limit)]

    from tqdm import tqdm

    restore_sigterm = install_sigterm_as_interrupt()
    bar = tqdm(total=len(pending), unit="img", disable=args.quiet or not pending, desc="camserve batch", file=sys.stderr)
    decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-decode")
    batches = list(chunks(pending, args.batch_size))
    interrupted = False
    next_decoded = decoder.submit(lambda b: [decode(i) if i.error is None else i for i in b], batches[0]) if batches else None
    try:
        for index, batch_items in enumerate(batches):
            decoded = next_decoded.result()
            if index + 1 < len(batches):  # decode the next batch while this one is explained
                next_decoded = decoder.submit(lambda b: [decode(i) if i.error is None else i for i in b],
                                              batches[index + 1])
            records = []
            good = [it for it in decoded if it.error is None]
            results: List[Any] = []
            if good:
                try:
                    results = backend.run(good, settings)
                except ExplanationInputError as error:
                    raise SystemExit(f"camserve batch: {error}") from None
            explained = [r for r in results if not isinstance(r, str)]
            if metrics is not None and explained:
                t = time.perf_counter()
                for result, scores in zip(explained, compute_scores(metrics, backend.model, explained,
                                                                    settings.score_steps)):
                    result.scores = scores
                    result.seconds["scores_batch"] = time.perf_counter() - t
            for item, result in zip(good, results):
                if isinstance(result, str):
                    item.error = result
                    continue
                try:
                    records.append(finish_item(item, result, settings, sid, backend, out, metrics,
                                               encode_png, to_uint8))
                except Exception as error:  # one image's rendering must not stop the run
                    item.error = f"rendering failed: {type(error).__name__}: {error}"
            for item in decoded:
                if item.error is not None:
                    records.append(failed_record(item, settings, sid, backend))
            store.append(records)
            for r in records:
                counts["done" if r["status"] == "done" else "failed"] += 1
            for item in batch_items:  # free the bytes and pixels of the finished batch
                item.data = item.image = None
            bar.update(len(batch_items))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        decoder.shutdown(wait=False, cancel_futures=True)
        restore_sigterm()
    elapsed = time.perf_counter() - started
    parquet = store.write_parquet()
    report_path = None
    if not args.no_report:
        mine = [r for r in store.records if r.get("settings_id") == sid]
        report_path = report_module.write_report(out, mine, settings_summary(settings, sid, args))
    processed = counts["done"] + counts["failed"]
    rate = processed / elapsed if elapsed > 0 else 0.0
    print(f"camserve batch: {'INTERRUPTED — ' if interrupted else ''}done {counts['done']}, "
          f"skipped {counts['skipped']} (already recorded), failed {counts['failed']}, "
          f"of {len(paths)} inputs in {elapsed:.1f} s ({rate:.2f} images/s, {backend.description})")
    for r in store.records[-processed:] if processed else []:
        if r["status"] == "failed":
            print(f"  failed: {r['input']}: {r['error']}")
    written = [str(out / "records.jsonl")] + ([str(parquet)] if parquet else []) + ([str(report_path)] if report_path else [])
    print("  wrote " + ", ".join(written))
    return 130 if interrupted else 0
