"""Similarity maps at every stage of the embedding models, for FAM pairs, gallery matches and few-shot
prototypes, through the real TorchServe and the KServe predictor (issue 21): the bundled
EfficientNet-Lite0 (8 stages, its archive's 12-photograph gallery) and the pretrained CIFAR ResNet-56
pooled features (3 stages, a gallery of 2 shots per CIFAR-10 class: tests/byo_archives.py).

Every request asks for ``format=array``, so each map comes back at its layer's own resolution: the
answer's ``layer_shape`` and the map's shape must agree, shrink with depth and not be constant. The
KServe predictor serves the same ``.mar`` and must give the same answers as TorchServe.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import requests

from embedkit import LITE0, RESNET56, TASKS, check_stages, instances, stable
from serverkit import REPO, KServe

pytestmark = pytest.mark.server


def ask_torchserve(server, model: str, task: str) -> List[Dict]:
    response = requests.post(f"{server.url}/v1/models/{model}:predict", json={"instances": instances(model, task)},
                             headers=server.headers(), timeout=600)
    assert response.status_code == 200, response.text[:500]
    return response.json()["predictions"]


@pytest.fixture(scope="module")
def resnet56_predictor(torchserve_server, tmp_path_factory):
    """The KServe predictor on the ResNet-56 archive the TorchServe session built, stopped at the end."""
    mar = REPO / "model_store" / f"{RESNET56}.mar"
    assert mar.exists(), "the TorchServe session fixture builds the bring-your-own archives"
    server = KServe(RESNET56, ["--mar", str(mar)], tmp_path_factory.mktemp("kserve-r56"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("model", [LITE0, RESNET56])
def test_torchserve_maps_at_every_stage(torchserve_server, model):
    for task in TASKS:
        check_stages(model, task, ask_torchserve(torchserve_server, model, task))


def test_kserve_predictor_gives_torchserves_maps_at_every_stage(torchserve_server, resnet56_predictor):
    for task in TASKS:
        response = resnet56_predictor.post(f"/v1/models/{RESNET56}:predict", json={"instances": instances(RESNET56, task)})
        assert response.status_code == 200, response.text[:500]
        answers = response.json()["predictions"]
        check_stages(RESNET56, task, answers)
        assert stable(answers) == stable(ask_torchserve(torchserve_server, RESNET56, task))
