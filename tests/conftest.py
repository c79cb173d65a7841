"""Shared fixtures: the bundled pretrained model and the real photographs in ../shared/data."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))
SAMPLES = SHARED / "data" / "imagenet-samples"


def sample_rows() -> List[dict]:
    """LABELS.tsv rows: class_index, wnid, name, file."""
    with open(SAMPLES / "LABELS.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_uint8(path) -> torch.Tensor:
    """A photograph as a ``uint8`` ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def photo_bytes(name: str) -> bytes:
    """The raw file bytes of a sample photograph, as a client would send them."""
    return (SAMPLES / name).read_bytes()


def label_of(name: str, rows: List[dict]) -> str:
    """The ImageNet class name of a sample photograph, from LABELS.tsv rows."""
    return next(r["name"] for r in rows if r["file"] == name)


def decode_png(b64: str) -> Image.Image:
    """A base64 PNG from a response, decoded."""
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="session")
def samples() -> List[dict]:
    if not SAMPLES.exists():
        pytest.fail(f"shared photographs not found at {SAMPLES}")
    return sample_rows()


@pytest.fixture(scope="session")
def effnet():
    """The pretrained EfficientNet-Lite0 (eval, CPU)."""
    from camserve.engine.models import load_effnet_lite0

    return load_effnet_lite0()


@pytest.fixture(scope="session")
def effnet_batch(samples):
    """First 8 sample photographs preprocessed for EfficientNet-Lite0: (normalised batch, labels)."""
    from camserve.engine.models import EFFNET_LITE0 as p
    from camserve.engine.imaging.preprocess import to_model_input

    rows = samples[:8]
    images = [load_uint8(SAMPLES / r["file"]) for r in rows]
    batch, _ = to_model_input(images, p.resize, p.crop, p.mean, p.std, torch.device("cpu"))
    return batch, [int(r["class_index"]) for r in rows]


pytest_plugins = ["serverkit"]  # the session TorchServe fixture (torchserve_server)


CIFAR_WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"


@pytest.fixture(scope="module")
def resnet20():
    """The pretrained CIFAR-10 ResNet-20 (the project's definition, the shared state dict) and 4
    choose-half CIFAR-10 test JPEGs; one per test module (a test may re-initialise layers)."""
    from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet

    if not CIFAR_WEIGHTS.exists():
        pytest.fail(f"shared CIFAR ResNet weights not found at {CIFAR_WEIGHTS}")
    data = SHARED / "data" / "cifar10-test"
    files = [f for f, _ in image_set("cifar", data, 500, 0)[0:8:2]]
    return load_cifar_resnet(str(CIFAR_WEIGHTS), 20, torch.device("cpu")), load_batch("cifar", data, files, "cpu")
