"""``camserve kserve``: serve one model spec as a KServe predictor (Open Inference Protocol).

    camserve kserve --model-config configs/effnet_lite0.yaml --http-port 8080
    camserve kserve --mar model_store/effnet_lite0.mar --http-port 8080
    camserve kserve --name cifar20 --source eager --model-file examples/cifar_resnet/model.py \\
        --class-name CifarResNet --kwargs '{"depth": 20}' \\
        --weights ../shared/models/cifar-resnet/resnet20-12fca82f.th --preprocess crop=32 --http-port 8080

The model is any spec ``camserve archive`` accepts (its flags, or ``--model-config``/``--spec`` a
``model-config.yaml`` whose ``handler:`` section has the defaults and ``handler.model`` the spec), or
a built ``.mar``. Routes: ``POST /v1/models/<name>:predict|:explain``, ``POST /v2/models/<name>/infer``
(and ``/explain``), health ``/v2/health/live|ready``, ``/v1/models/<name>``, metrics ``/metrics``.
Batching: ``batchSize`` / ``maxBatchDelay`` of the model-config (default 8 / 100 ms), or the flags.
Binds 127.0.0.1 unless ``--host`` says otherwise (a container: ``--host 0.0.0.0``). Needs the
``kserve`` extra: ``pip install 'camserve[kserve,serve]'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

from camserve.commands.model_args import add_model_arguments, spec_from_args
from camserve.serving.local import ModelSetup, setup_from_mar, setup_from_spec


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--name``, ``--model-config``, ``--mar`` and the model-spec flags (also ``camserve view``'s)."""
    parser.add_argument("--name", default=None,
                        help="model name on the routes (default: the archive's, else the config file's stem)")
    parser.add_argument("--model-config", default=None,
                        help="a model-config.yaml (TorchServe batching keys + handler: defaults and model spec)")
    parser.add_argument("--mar", default=None, help="a TorchServe .mar archive to serve as it is")
    add_model_arguments(parser, task_default="classify")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_arguments(parser)
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--device", default="auto", help="auto (GPU 0 when CUDA works), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="max requests per batch (default: batchSize)")
    parser.add_argument("--max-batch-delay-ms", type=float, default=None,
                        help="max wait to fill a batch, from its first request (default: maxBatchDelay)")
    parser.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body (default 16 MiB)")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")


def setup_from_args(args: argparse.Namespace) -> ModelSetup:
    """What to serve, from :func:`add_model_source_arguments`' flags (a missing file exits with why)."""
    if args.mar:
        if args.model_config or args.spec or args.source:
            raise SystemExit("--mar serves the archive as built: give no --model-config/--spec/--source with it")
        if not os.path.exists(args.mar):
            raise SystemExit(f"--mar {args.mar!r} not found")
        return setup_from_mar(args.mar, args.name)
    if args.model_config:
        if args.spec and os.path.abspath(args.spec) != os.path.abspath(args.model_config):
            raise SystemExit("give one of --model-config and --spec")
        args.spec = args.model_config
    spec, config = spec_from_args(args)
    name = args.name or (os.path.splitext(os.path.basename(args.spec))[0] if args.spec else None)
    model_dir = os.path.dirname(os.path.abspath(args.spec)) if args.spec else os.getcwd()
    for path, what in ((spec.weights, "--weights"), (spec.model_file, "--model-file"), (spec.labels, "--labels"),
                       (spec.path, "--hf-dir")):
        if path and not os.path.exists(path):
            raise SystemExit(f"{what} {path!r} not found")
    return setup_from_spec(spec, config, name, model_dir)


def run(args: argparse.Namespace) -> int:
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv when imported: give it none of ours
    try:
        from camserve.kserve.predictor import CamserveModel
        from camserve.kserve.server import CamserveModelServer
    except ImportError as error:
        raise SystemExit(f"camserve kserve needs the kserve extra ({error}): pip install 'camserve[kserve,serve]'")
    finally:
        sys.argv = argv
    logging.getLogger("camserve").setLevel(args.log_level.upper())
    setup = setup_from_args(args)
    try:
        model = CamserveModel(setup, device=args.device, batch_size=args.batch_size,
                              max_batch_delay_ms=args.max_batch_delay_ms)
        model.load()
        server = CamserveModelServer(http_port=args.http_port, host=args.host,
                                     max_request_bytes=int(args.max_request_mb * 1024 * 1024))
        server.start([model])
    finally:
        if setup.cleanup:
            shutil.rmtree(setup.cleanup, ignore_errors=True)
    return 0
