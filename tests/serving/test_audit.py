"""AuditLog: one complete JSON line per record under concurrent writers, with rotation, none lost."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import threading
import time

import pytest

import yaml

from camserve.ops.audit import AuditLog
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


# -- faults: every accepted record is written, or dropped loudly ----------------------------------
def test_a_failed_write_is_retried_and_lands_in_the_file(tmp_path):
    log = AuditLog(str(tmp_path / "a.jsonl"))
    log.record(model="m", request_id="before", input_sha256="00" * 32)
    assert log.wait_written(10)
    # the descriptor now points at a full disk (ENOSPC on every write), as when the volume fills up
    os.dup2(os.open("/dev/full", os.O_WRONLY), log._fd)
    log.record(model="m", request_id="during", input_sha256="11" * 32)
    assert log.wait_written(30)
    log.close()
    assert log.errors >= 1 and log.dropped == 0 and log.pending == 0
    assert [r["request_id"] for r in read_all(log)] == ["before", "during"]  # retried after a reopen


def test_a_write_that_keeps_failing_is_dropped_loudly_not_silently(caplog):
    log = AuditLog("/dev/full", retries=3)  # every write: ENOSPC
    with caplog.at_level("WARNING", logger="camserve.ops.audit"):
        log.record(model="m", request_id="lost-1", input_sha256="22" * 32)
        log.record(model="m", request_id="lost-2", input_sha256="22" * 32)
        assert log.close() == 2
    # the first record: every retry; the next, while the file is still unwritable: one attempt (no stall)
    assert log.errors == 3 + 1 and log.dropped == 2 and log.written == 0 and log.pending == 0
    assert log.stats()["dropped"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("DROPPED" in e for e in errors)
    assert "lost-1" in errors[0] and "lost-2" in errors[1]


def test_a_failed_rotation_keeps_writing_and_is_retried(tmp_path):
    path = tmp_path / "a.jsonl"
    blocker = tmp_path / "a.jsonl.1"
    blocker.mkdir()  # rotation's rename onto a non-empty directory fails
    (blocker / "keep").write_text("x")
    log = AuditLog(str(path), max_bytes=2048, backups=1)
    for i in range(40):
        log.record(model="m", request_id=f"r{i}", input_sha256="33" * 32)
    assert log.wait_written(30)
    assert log.rotation_errors >= 1 and log.rotations == 0 and log.dropped == 0 and log.written == 40
    assert [r["request_id"] for r in map(json.loads, path.read_text().splitlines())] == [f"r{i}" for i in range(40)]
    (blocker / "keep").unlink()
    blocker.rmdir()  # the obstacle gone, the next record rotates
    time.sleep(0.1)
    log.record(model="m", request_id="after", input_sha256="44" * 32)
    log.close()
    assert log.rotations == 1 and log.written == 41
    ids = [r["request_id"] for p in (blocker, path) for r in map(json.loads, p.read_text().splitlines())]
    assert ids == [f"r{i}" for i in range(40)] + ["after"]


def test_a_removed_file_is_recreated(tmp_path):
    log = AuditLog(str(tmp_path / "logs" / "a.jsonl"))
    log.record(model="m", request_id="first", input_sha256="55" * 32)
    assert log.wait_written(10)
    shutil.rmtree(tmp_path / "logs")  # an operator (or a misconfigured cleaner) removed the directory
    log.record(model="m", request_id="second", input_sha256="66" * 32)
    log.close()
    assert [r["request_id"] for r in read_all(log)] == ["second"] and log.dropped == 0


def test_close_drains_a_record_that_is_being_retried(tmp_path):
    log = AuditLog(str(tmp_path / "a.jsonl"))
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    for i in range(5):
        log.record(model="m", request_id=f"q{i}", input_sha256="77" * 32)
    assert log.close() == 0  # waits for the writer's retries (no 30 s give-up) and loses nothing
    assert [r["request_id"] for r in read_all(log)] == [f"q{i}" for i in range(5)]
    os.close(full)


def test_every_line_is_whole_even_when_a_write_fails_part_way(tmp_path):
    """A write that fails after part of the line is truncated back to the last whole record."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path), store_heatmap=True)
    log.record(model="m", request_id="ok", input_sha256="88" * 32)
    assert log.wait_written(10)
    import resource  # POSIX, like TorchServe

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = path.stat().st_size
    try:  # the file may grow by 100 bytes only: a big record is cut part-way (EFBIG after a short write)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
        log.record(model="m", request_id="big", input_sha256="99" * 32, heatmaps=[b"x" * 5000])
        time.sleep(0.3)  # its first attempts fail
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    log.close()
    assert log.errors >= 1 and log.dropped == 0
    assert [r["request_id"] for r in read_all(log)] == ["ok", "big"]  # json.loads of every line: none torn
