"""The rolling explanation-drift gauge on real servers: an archive with ``handler.monitor`` (every plain
request monitored, a score of the latest 20 maps every 5 once the first 20 are the reference) on the session TorchServe
(``cifar_monitored``: the pretrained CIFAR ResNet-20) and on a ``camserve kserve`` predictor (the
bundled EfficientNet-Lite0). Plain requests only; the gauge appears on each server's metrics with a
score in [0, 1], the monitor records land in the audit log, and the plain answers are those of the
same model without monitoring."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests
import yaml

from byo_archives import MONITOR, SHARED
from camserve.client import Client
from conftest import SAMPLES
from serverkit import REPO, start_kserve

pytestmark = pytest.mark.server
CIFAR = sorted((SHARED / "data" / "cifar10-test").glob("*/00[0-4]*.jpg"))  # 250 photographs


def gauge(text: str, series: str, **labels) -> list:
    values = []
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if match and match.group(1) == series:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                values.append(float(match.group(3)))
    return values


def send_until_gauge(predict, metrics, images, limit: int = 80) -> list:
    """Plain requests, one at a time, until the gauge is on the metrics page (the score is computed
    on the monitor's thread and published after the next batch)."""
    for n, image in enumerate(images[:limit]):
        predict(image)
        if n >= MONITOR["reference_size"] + MONITOR["window"]:
            values = metrics()
            if values:
                return values
    time.sleep(1.0)
    predict(images[0])
    return metrics()


def test_the_gauge_on_torchserve(torchserve_server):
    server = torchserve_server
    monitored, plain = Client(server.url, inference_key=server.keys["inference"]), []

    def predict(path):
        answer = monitored.predict("cifar_monitored", path, topk=1)
        assert "explanation" not in answer.extra and answer.explanation is None
        plain.append((path, answer.predictions[0]))

    def metrics():
        text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
        return gauge(text, "ExplanationDrift", ModelName="cifar_monitored")
    values = send_until_gauge(predict, metrics, CIFAR)
    assert values and all(0.0 <= v <= 1.0 for v in values), values
    same = Client(server.url, inference_key=server.keys["inference"])
    for path, prediction in plain[:4]:  # the same answers as the unmonitored archive of the same model
        assert same.predict("cifar_resnet20", path, topk=1).predictions[0] == prediction
    records = []
    for path in server.audit_dir.glob("audit-*.jsonl*"):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in records if r["model"] == "cifar_monitored"]
    assert len(mine) >= len(plain) and {r["kind"] for r in mine} == {"monitor"}
    assert {s["method"] for r in mine for s in r["summaries"]} == {"cam"}


def test_the_gauge_on_the_kserve_predictor(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    config["handler"].update(audit_log=str(tmp_path / "audit.jsonl"), monitor=MONITOR)
    (tmp_path / "monitored.yaml").write_text(yaml.safe_dump(config))
    server = start_kserve("effnet_lite0", ["--model-config", str(tmp_path / "monitored.yaml")], tmp_path)
    try:
        client = Client(server.url, protocol="v1")
        photos = sorted(SAMPLES.glob("*.JPEG"))[:80]
        values = send_until_gauge(lambda p: client.predict("effnet_lite0", p, topk=1),
                                  lambda: gauge(requests.get(f"{server.url}/metrics", timeout=30).text,
                                                "camserve_explanation_drift", model="effnet_lite0"), photos)
    finally:
        server.stop()
    assert values and all(0.0 <= v <= 1.0 for v in values), values
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()}
    assert kinds == {"monitor"}
