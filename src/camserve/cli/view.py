"""``camserve view``: a local web page that shows a model's explanations of an image.

    camserve view --model-config configs/effnet_lite0.yaml                 # the model, in this process
    camserve view --mar model_store/effnet_lite0_embed.mar
    camserve view --server http://127.0.0.1:8080 --model effnet_lite0 --key-file logs/key_file.json
    camserve view --server http://127.0.0.1:8085 --model effnet_lite0 --protocol v2   # camserve kserve

Then open http://127.0.0.1:8090: drop an image, tick methods, layers and a target, and see the top-k
and the maps side by side (docs/view.md). With ``--server`` the page's requests go to a running
TorchServe or ``camserve kserve`` through :class:`camserve.client.Client`; otherwise the model spec
(``camserve kserve``'s flags: ``--model-config``, ``--mar`` or ``--source …``) runs in this process
with the serving handlers. Binds 127.0.0.1 unless ``--host`` says otherwise. Needs the ``view``
extra: ``pip install 'camserve[view]'``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil

from camserve.cli.kserve import add_model_source_arguments, setup_from_args
from camserve.client import PROTOCOLS, CamserveError, Client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    remote = parser.add_argument_group("a running server (instead of a model spec)")
    remote.add_argument("--server", default=None, help="the server's inference URL, e.g. http://127.0.0.1:8080")
    remote.add_argument("--model", default=None, help="the model's name on the server (with --server)")
    remote.add_argument("--key-file", default=None, help="TorchServe's key_file.json (regenerates expired keys)")
    remote.add_argument("--inference-key", default=None, help="the inference key, when there is no key file")
    remote.add_argument("--protocol", choices=PROTOCOLS, default="torchserve",
                        help="torchserve (/predictions), v1 or v2 (KServe; camserve kserve speaks both)")
    add_model_source_arguments(parser)
    parser.add_argument("--device", default="auto", help="in-process: auto (GPU 0 when CUDA works), cpu, cuda[:N]")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=8090, help="port of the page (default 8090)")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from camserve.view.app import LOOPBACK_HOSTS, build_app
    except ImportError as error:
        raise SystemExit(f"camserve view needs the view extra ({error}): pip install 'camserve[view]'")
    logging.getLogger("camserve").setLevel(args.log_level.upper())
    model_flags = args.model_config or args.mar or args.spec or args.source
    if args.server:
        if model_flags:
            raise SystemExit("give --server (a running server) or a model spec (--model-config/--mar/--source), "
                             "not both")
        if not args.model:
            raise SystemExit("--server needs --model: the model's name on that server")
        from camserve.view.remote import RemoteBackend

        try:
            client = Client(args.server, inference_key=args.inference_key, key_file=args.key_file,
                            protocol=args.protocol)
        except CamserveError as error:
            raise SystemExit(f"camserve view: {error.message}") from None
        backend = RemoteBackend(client, args.model)
    else:
        if args.model:
            raise SystemExit("--model names a model on --server; in-process, name it with --name")
        from camserve.view.inprocess import InProcessBackend

        setup = setup_from_args(args)
        try:
            backend = InProcessBackend(setup, device=args.device)
        except BaseException:
            if setup.cleanup:
                shutil.rmtree(setup.cleanup, ignore_errors=True)
            raise
    try:
        app = build_app(backend, allowed_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None)
        print(f"camserve view: http://{args.host}:{args.port}/", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        backend.close()
    return 0
