"""Renders docs/images/client-figure.jpg: what ``answer.figure()`` of the Python client gives — the
bundled EfficientNet-Lite0 served by ``camserve kserve`` on loopback, the committed CC0 photograph
docs/photos/chelsea.jpg (a cat; docs/photos/SOURCES.md), ``compare=gradcam,layercam,shallowcam`` at
``_blocks.4``, drawn over the photograph the client sent. The figure is committed, so it is never made
from the ImageNet samples in ../shared/data/ (research and testing only, not redistributed).

    .venv/bin/python scripts/render_client_figure.py [--photo docs/photos/chelsea.jpg]
                                                     [--out docs/images/client-figure.jpg]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from serverkit import start_kserve  # noqa: E402

from camserve.client import Client  # noqa: E402

PHOTO = REPO / "docs" / "photos" / "chelsea.jpg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=PHOTO, help="the photograph (default docs/photos/chelsea.jpg)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "client-figure.jpg")
    args = parser.parse_args()
    server = start_kserve("effnet_lite0", ["--model-config", "configs/effnet_lite0.yaml"],
                          Path(tempfile.mkdtemp(prefix="client-figure-")))
    try:
        answer = Client(server.url, protocol="v1").predict("effnet_lite0", args.photo,
                                                           compare="gradcam,layercam,shallowcam", layer="_blocks.4")
    finally:
        server.stop()
    answer.figure().save(args.out, quality=88)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB; top-1 {answer.predictions[0].label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
