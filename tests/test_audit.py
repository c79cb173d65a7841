"""AuditLog: one complete JSON line per record under concurrent writers, with rotation, none lost."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading

import pytest

import yaml

from camserve.serving.audit import AuditLog
from camserve.serving.settings import HandlerSettings

from conftest import REPO

THREADS, PER_THREAD = 8, 250


def read_all(log: AuditLog):
    lines = [line for path in log.files() for line in path.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def test_concurrent_writers_with_rotation_lose_nothing(tmp_path):
    log = AuditLog(str(tmp_path / "audit-{pid}.jsonl"), max_bytes=64 * 1024, backups=100)
    payload = b"\x89PNG fake-but-bytes" * 10
    barrier = threading.Barrier(THREADS)

    def worker(t: int):
        barrier.wait()
        for i in range(PER_THREAD):
            log.record(model="effnet_lite0", model_version="1.0", request_id=f"{t}-{i}",
                       input_bytes=f"image {t} {i}".encode(), options={"explain": "gradcam", "layer": "_conv_head"},
                       topk=[{"class": i % 1000, "prob": 0.5}], explanation_seconds=0.01, heatmaps=[payload])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert log.rotations >= 3 and log.errors == 0
    for path in log.files():
        assert path.stat().st_size <= 64 * 1024
    records = read_all(log)  # json.loads on every line: each one is a whole record
    ids = [r["request_id"] for r in records]
    assert len(ids) == THREADS * PER_THREAD == log.written
    assert set(ids) == {f"{t}-{i}" for t in range(THREADS) for i in range(PER_THREAD)}
    r = next(r for r in records if r["request_id"] == "3-7")
    assert r["input_sha256"] == hashlib.sha256(b"image 3 7").hexdigest()
    assert r["heatmap_sha256"] == [hashlib.sha256(payload).hexdigest()] and r["heatmap_stored"] is False
    assert "heatmaps_base64" not in r and r["options"]["explain"] == "gradcam" and r["time"].endswith("+00:00")


def test_heatmap_stored_when_configured_and_backups_bounded(tmp_path):
    config = {"audit_log": str(tmp_path / "a.jsonl"), "audit_store_heatmap": "true",
              "audit_max_bytes": 4096, "audit_backups": 2}
    log = AuditLog.from_config(config)
    png = bytes(range(256)) * 4
    for i in range(40):
        log.record(model="m", request_id=str(i), input_sha256="ab" * 32, heatmaps=[png], extra_field=i)
    log.flush()
    assert log.written == 40
    log.close()
    files = log.files()
    assert len(files) == 3  # a.jsonl, a.jsonl.1, a.jsonl.2: older ones dropped as configured
    records = read_all(log)
    newest = max(int(r["request_id"]) for r in records)
    assert newest == 39 and all(0 <= int(r["request_id"]) < 40 for r in records)
    assert base64.b64decode(records[0]["heatmaps_base64"][0]) == png and records[0]["extra_field"] >= 0


def test_off_by_default_and_closed_log_refuses(tmp_path):
    assert AuditLog.from_config({}) is None and AuditLog.from_config(None) is None
    log = AuditLog(str(tmp_path / "a.jsonl"))
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.record(model="m")


def test_opt_in_from_model_config_yaml(tmp_path):
    """The handler's settings keep unknown ``handler:`` keys in ``extra``; the audit reads them there."""
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())
    settings = HandlerSettings.from_model_config(config)
    assert AuditLog.from_config(settings.extra, environ={}) is None  # shipped config: audit off
    config["handler"].update(audit_log=str(tmp_path / "audit-{pid}.jsonl"), audit_store_heatmap=True,
                             audit_max_bytes=2048, audit_backups=1)
    log = AuditLog.from_config(HandlerSettings.from_model_config(config).extra, environ={})
    assert log.store_heatmap and log.max_bytes == 2048 and log.backups == 1
    assert log.path.name == f"audit-{os.getpid()}.jsonl"
    log.close()
    env_log = AuditLog.from_config({}, environ={"CAMSERVE_AUDIT_LOG": str(tmp_path / "env.jsonl")})
    assert env_log.path == tmp_path / "env.jsonl"
    env_log.close()
