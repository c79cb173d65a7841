"""What ``camserve.client`` adds to a request: the client vs raw ``requests`` (and the asyncio client
vs raw ``httpx``) against the same real server, interleaved in one run.

Starts ``camserve kserve`` with the bundled EfficientNet-Lite0 on loopback (batching off: batch size
1), then sends the same photograph ``--rounds`` times in each of the ways below, in rotation (so the
machine's load drifts over all of them alike), and prints each way's median and the ratios:

- ``raw requests``: ``requests.Session.post`` of the v1 body the client builds, ``response.json()``;
- ``Client.predict``: the same request and the answer as a typed :class:`ClassifierAnswer`;
- ``raw httpx`` / ``AsyncClient.predict``: the same pair on ``httpx.AsyncClient``.

The target (issue 23): the client adds ≤ 5 % to a plain request's latency. An explained request
(``--explain gradcam``) takes longer on the server, so the ratio moves closer to 1.

    .venv/bin/python benchmarks/client_overhead.py [--rounds 60] [--explain gradcam] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SAMPLES  # noqa: E402
from serverkit import start_kserve  # noqa: E402

from camserve.client import AsyncClient, Client  # noqa: E402

MODEL = "effnet_lite0"
PHOTO = SAMPLES / "n01833805_hummingbird.JPEG"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="requests per way (default 60)")
    parser.add_argument("--explain", default=None, help="a method to explain with (default: plain predictions)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    options = {"explain": args.explain} if args.explain else {}
    image = PHOTO.read_bytes()
    body = {"instances": [{"data": base64.b64encode(image).decode("ascii"), **options}]}
    work = Path(tempfile.mkdtemp(prefix="client-overhead-"))
    server = start_kserve(MODEL, ["--model-config", "configs/effnet_lite0.yaml", "--batch-size", "1"], work)
    try:
        url = f"{server.url}/v1/models/{MODEL}:predict"
        session, client = requests.Session(), Client(server.url, protocol="v1")

        def raw_requests():
            return session.post(url, json=body, timeout=300).json()

        def typed():
            return client.predict(MODEL, image, **options)

        async def run_async():
            async with httpx.AsyncClient(timeout=300) as raw, AsyncClient(server.url, protocol="v1") as aclient:
                ways = {"raw requests": lambda: asyncio.to_thread(raw_requests),
                        "Client.predict": lambda: asyncio.to_thread(typed),
                        "raw httpx": lambda: _json(raw.post(url, json=body)),
                        "AsyncClient.predict": lambda: aclient.predict(MODEL, image, **options)}
                for way in ways.values():  # warm-up: connections, the worker's first requests
                    for _ in range(3):
                        await way()
                times = {name: [] for name in ways}
                for _ in range(args.rounds):
                    for name, way in ways.items():
                        start = time.perf_counter()
                        await way()
                        times[name].append(time.perf_counter() - start)
                return times
        times = asyncio.run(run_async())
    finally:
        server.stop()
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {"Client.predict / raw requests": medians["Client.predict"] / medians["raw requests"],
              "AsyncClient.predict / raw httpx": medians["AsyncClient.predict"] / medians["raw httpx"]}
    print(f"{args.rounds} rounds, {'explain=' + args.explain if args.explain else 'plain'} requests, "
          f"camserve kserve on loopback, batch size 1")
    for name, value in medians.items():
        print(f"  {name:22s} median {value * 1000:7.2f} ms")
    for name, value in ratios.items():
        print(f"  {name:32s} {value:.3f}  ({'within' if value <= 1.05 else 'OVER'} the 5 % target)")
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "options": options, "median_s": medians,
                                        "ratios": ratios}, indent=2) + "\n")
    return 0


async def _json(response):
    return (await response).json()


if __name__ == "__main__":
    sys.exit(main())
