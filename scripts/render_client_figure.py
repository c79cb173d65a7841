"""Renders docs/images/client-figure.jpg: what ``answer.figure()`` of the Python client gives — the
bundled EfficientNet-Lite0 served by ``camserve kserve`` on loopback, one photograph of
../shared/data/imagenet-samples/, ``compare=gradcam,layercam,shallowcam`` at ``_blocks.4``, drawn
over the photograph the client sent.

    .venv/bin/python scripts/render_client_figure.py [--out docs/images/client-figure.jpg]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import SAMPLES  # noqa: E402
from serverkit import start_kserve  # noqa: E402

from camserve.client import Client  # noqa: E402

PHOTO = "n02510455_giant_panda.JPEG"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "client-figure.jpg")
    args = parser.parse_args()
    server = start_kserve("effnet_lite0", ["--model-config", "configs/effnet_lite0.yaml"],
                          Path(tempfile.mkdtemp(prefix="client-figure-")))
    try:
        answer = Client(server.url, protocol="v1").predict("effnet_lite0", SAMPLES / PHOTO,
                                                           compare="gradcam,layercam,shallowcam", layer="_blocks.4")
    finally:
        server.stop()
    answer.figure().save(args.out, quality=88)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB; top-1 {answer.predictions[0].label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
