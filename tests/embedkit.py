"""Requests and checks of similarity maps at every stage of the embedding archives (FAM pairs, gallery
matches, few-shot prototypes), shared by the TorchServe and KServe tests: every request asks for
``format=array``, so each map comes back at its layer's own resolution."""

from __future__ import annotations

import base64
from typing import Dict, List

import numpy as np

from byo_archives import CIFAR_TEST
from conftest import SAMPLES

LITE0, RESNET56 = "effnet_lite0_embed", "cifar_resnet56_embed"
#: (first stage's map side, last stage's map side, stages)
MODELS = {LITE0: (112, 7, 8), RESNET56: (32, 8, 3)}
TASKS = ("pair", "gallery", "prototypes")
VOLATILE = {"seconds", "batch_seconds", "runtime"}


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def photos(model: str):
    """(query, reference) for a model: two ImageNet photographs, or two CIFAR-10 test images of a class."""
    if model == LITE0:
        return SAMPLES / "n01440764_tench.JPEG", SAMPLES / "n01560419_bulbul.JPEG"
    cats = sorted((CIFAR_TEST / "cat").iterdir())
    return cats[40], cats[41]    # beyond the gallery's 2 shots of the class


def instances(model: str, task: str) -> List[Dict]:
    query, reference = photos(model)
    base = {"image": b64(query), "format": "array", "embedding": False}
    extra = {"pair": {"reference": b64(reference)}, "gallery": {"gallery": 2}, "prototypes": {"prototypes": True}}[task]
    return [{**base, **extra, "layer": f"stage{i}"} for i in range(1, MODELS[model][2] + 1)]


def check_stages(model: str, task: str, answers: List[Dict]) -> None:
    first, last, count = MODELS[model]
    assert len(answers) == count
    sides = []
    for stage, answer in enumerate(answers, start=1):
        shape = answer["layer_shape"]
        assert shape[0] == shape[1] and np.asarray(answer["query_map"]).shape == tuple(shape), (task, stage)
        assert float(np.ptp(answer["query_map"])) > 0.5, f"{model} {task} stage{stage}: a constant map"
        assert answer["route"] == ("relevance" if stage < count else "pooled" if task != "prototypes" else "jacobian")
        if task == "pair":
            assert np.asarray(answer["reference_map"]).shape == tuple(shape)
        if task == "gallery":
            assert len(answer["matches"]) == 2
            assert all(np.asarray(m["query_map"]).shape == tuple(shape) for m in answer["matches"])
        if task == "prototypes":
            assert answer["prototype"]["label"] == answers[-1]["prototype"]["label"]
        sides.append(shape[0])
    assert sides[0] == first and sides[-1] == last and sides == sorted(sides, reverse=True)


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value
