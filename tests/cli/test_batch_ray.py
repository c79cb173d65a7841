"""``camserve batch --ray`` on a real local Ray cluster (no mocks): parity with the local run,
interruption (SIGTERM to the driver, a killed Ray worker) and resume without redo or duplicates.

Each test starts (and the run itself shuts down) a local Ray cluster on this machine's CPUs; the
fixtures check that no Ray process the test started outlives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import psutil  # a ray dependency
import ray  # camserve[ray] (requirements-extras.txt; run_tests.sh installs it): missing must fail, not skip
import torch

from camserve.cli.main import main

from conftest import REPO, SAMPLES, SHARED

CIFAR = SHARED / "data" / "cifar10-test"
CIFAR_WEIGHTS = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
CIFAR_SPEC = ["--source", "eager", "--model-file", str(REPO / "examples" / "cifar_resnet" / "model.py"),
              "--class-name", "CifarResNet", "--kwargs", '{"depth": 20}', "--weights", str(CIFAR_WEIGHTS),
              "--preprocess", "crop=32"]
PARITY_PHOTOS = 40


def ray_processes():
    """Live Ray processes this file's clusters could leave behind, as ``{pid: cmdline}``: raylets and
    GCS servers whose session lies in a ``camserve-ray-*`` temp folder (the CLI's local clusters and
    this file's own), and orphaned Ray workers (other users' clusters on this machine are not ours)."""
    found = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        ours = ("raylet" in cmd or "gcs_server" in cmd) and "camserve-ray-" in cmd
        if ours or (cmd.startswith("ray::") and proc.info["ppid"] == 1):
            found[proc.info["pid"]] = cmd
    return found


@pytest.fixture()
def no_leftover_ray():
    """Ray processes started during the test must be gone after it (ray.shutdown in the run)."""
    before = set(ray_processes())
    yield
    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {p: c for p, c in ray_processes().items() if p not in before}
        if not left:
            return
        time.sleep(0.5)
    pytest.fail(f"Ray processes left running: {left}")


def records(out: Path):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


#: images per class of the SIGTERM test: on an idle machine 120 images finished (3.3 s) before the signal
SIGTERM_PER_CLASS = 80


def cifar_list(tmp_path: Path, per_class: int) -> Path:
    """A list file of ``per_class`` CIFAR-10 test images of each class (absolute paths)."""
    paths = [str(p) for folder in sorted(CIFAR.iterdir()) for p in sorted(folder.iterdir())[:per_class]]
    listing = tmp_path / "cifar.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def descendants(pid: int):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_records(proc, path: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.stat().st_size > 0:
            return True
        time.sleep(0.05)
    return False


def test_ray_matches_the_local_run(tmp_path, samples, capsys, no_leftover_ray):
    """40 shared photographs + a corrupt file, bundled EfficientNet-Lite0: --ray gives the same keys,
    settings id, top-k, targets and byte-identical heatmap PNGs as the local run; report, Parquet."""
    folder = tmp_path / "in"
    folder.mkdir()
    for row in samples[:PARITY_PHOTOS]:
        shutil.copy(SAMPLES / row["file"], folder / row["file"])
    data = (SAMPLES / samples[0]["file"]).read_bytes()
    (folder / "zz_corrupt.jpg").write_bytes(data[: len(data) // 3])
    settings = ["--model", "effnet_lite0", "--method", "shallowcam", "--batch-size", "8", "--quiet"]
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["batch", str(folder), "--out", str(local), *settings]) == 0
    capsys.readouterr()
    # bit-identical maps need the same batches (blocks of --batch-size inputs) and the same number of
    # torch threads (an actor runs --cpus-per-worker threads; 1 vs 2 threads moves ~0.5 % of the
    # heatmap pixels by one grey level)
    threads = str(torch.get_num_threads())
    assert main(["batch", str(folder), "--out", str(distributed), *settings, "--ray", "--workers", "1",
                 "--cpus-per-worker", threads]) == 0
    summary = capsys.readouterr().out
    assert f"done {PARITY_PHOTOS}, skipped 0" in summary and "failed 1" in summary and "Ray start-up" in summary
    assert not ray.is_initialized()

    mine, theirs = ({r["key"]: r for r in records(out)} for out in (local, distributed))
    assert len(mine) == PARITY_PHOTOS + 1 and mine.keys() == theirs.keys()
    for key, a in mine.items():
        b = theirs[key]
        assert b["backend"].startswith("ray:")
        for field in ("status", "settings_id", "sha256", "input", "topk", "targets", "target_names", "layer",
                      "crop_box", "image_size", "heatmaps", "overlays", "thumbnail", "error"):
            assert a.get(field) == b.get(field), (field, a["input"])
        for rel in a.get("heatmaps", []) + a.get("overlays", []) + ([a["thumbnail"]] if "thumbnail" in a else []):
            assert hashlib.sha256((local / rel).read_bytes()).digest() == \
                hashlib.sha256((distributed / rel).read_bytes()).digest(), rel
    assert json.loads((distributed / "settings.json").read_text())["settings_id"] == \
        json.loads((local / "settings.json").read_text())["settings_id"]
    assert (distributed / "records.parquet").exists()
    assert (distributed / "report.html").read_text().count('class="card"') == PARITY_PHOTOS

    # the local run's records are done work for --ray too (same keys): nothing is redone
    assert main(["batch", str(folder), "--out", str(local), *settings, "--ray"]) == 0
    assert f"done 0, skipped {PARITY_PHOTOS + 1}" in capsys.readouterr().out
    assert len(records(local)) == PARITY_PHOTOS + 1


def test_sigterm_to_the_driver_then_resume(tmp_path, no_leftover_ray):
    """SIGTERM to the driver after its first block is recorded: it stops (exit 130, local cluster shut
    down), finished blocks stay recorded; the rerun does the rest once and nothing twice."""
    listing = cifar_list(tmp_path, per_class=SIGTERM_PER_CLASS)  # long enough that the signal lands mid-run
    total = 10 * SIGTERM_PER_CLASS
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "camserve.cli.main", "batch", str(listing), "--out", str(out), "--batch-size", "8",
           *CIFAR_SPEC, "--quiet", "--ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert wait_for_records(proc, out / "records.jsonl"), "no block was recorded"
    children = descendants(proc.pid)
    assert any("raylet" in " ".join(c.cmdline()) for c in children)  # it started its own cluster
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "INTERRUPTED" in output, output
    kept = re.search(r"Ray logs kept in (\S+)", output)
    assert kept, output  # an interrupted run keeps the local cluster's logs and says where
    shutil.rmtree(kept.group(1), ignore_errors=True)
    first = records(out)
    before = len(first)
    assert 8 <= before < total and len({r["key"] for r in first}) == before
    assert all(r["status"] == "done" for r in first)
    for r in first:  # a record points at files that exist
        assert all((out / rel).stat().st_size > 0 for rel in r["heatmaps"] + r["overlays"] + [r["thumbnail"]])
    for child in children:  # the driver shut its cluster down on the way out
        try:
            child.wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
    mtimes = {r["heatmaps"][0]: (out / r["heatmaps"][0]).stat().st_mtime_ns for r in first}

    # the resume with two engine actors: the number of workers is not a setting (same keys)
    resumed = subprocess.run([*cmd, "--workers", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"done {total - before}, skipped {before}" in resumed.stdout, resumed.stdout
    assert "2 workers" in resumed.stdout
    final = records(out)
    assert final[:before] == first and len(final) == total
    assert len({r["key"] for r in final}) == total and len({r["input"] for r in final}) == total
    assert all((out / rel).stat().st_mtime_ns == t for rel, t in mtimes.items())  # not redone


def test_killed_ray_worker_is_retried_without_duplicates(tmp_path, no_leftover_ray):
    """SIGKILL to the engine actor's worker process mid-run: Ray restarts the actor and re-sends its
    batches; every image is recorded exactly once; a rerun has nothing left to do. Inputs come as a
    ``file://`` URI, read through pyarrow's filesystem layer (the s3:// … path of a cluster)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in cifar_list(tmp_path, per_class=12).read_text().split():
        shutil.copy(path, folder / f"{Path(path).parent.name}-{Path(path).name}")  # 120 images
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "camserve.cli.main", "batch", folder.as_uri(), "--out", str(out),
           "--batch-size", "8", *CIFAR_SPEC, "--quiet", "--ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert wait_for_records(proc, out / "records.jsonl"), "no block was recorded"
    actors = [c for c in descendants(proc.pid) if "ExplainWorker" in " ".join(c.cmdline())]
    assert len(actors) == 1, [" ".join(c.cmdline()) for c in descendants(proc.pid)]
    os.kill(actors[0].pid, signal.SIGKILL)
    recorded_at_kill = len(records(out))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    first = records(out)
    assert recorded_at_kill < 120, "the run was over before the worker was killed"
    assert len(first) == 120 and len({r["key"] for r in first}) == 120, output
    assert all(r["input"].startswith("file://") and r["status"] == "done" for r in first)
    assert {r["backend"] for r in first} == {"ray:cpu"}
    assert len({r["worker"] for r in first}) == 2  # the killed actor's blocks, then its restart's

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0 and "done 0, skipped 120" in rerun.stdout, rerun.stdout + rerun.stderr
    assert len(records(out)) == 120


def test_joins_a_running_cluster_and_leaves_it_running(tmp_path, no_leftover_ray):
    """``--ray ADDRESS``: the driver joins a cluster this test started (its token auth mode is
    inherited through the environment) and does not shut it down."""
    temp = tempfile.mkdtemp(prefix="camserve-ray-test-")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp)
    try:
        address = ray.get_runtime_context().gcs_address
        listing = cifar_list(tmp_path, per_class=2)
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "camserve.cli.main", "batch", str(listing), "--out", str(out),
                               *CIFAR_SPEC, "--quiet", "--ray", address], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=dict(os.environ))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ray:{address}" in done.stdout and "done 20, skipped 0" in done.stdout, done.stdout
        assert len({r["key"] for r in records(out)}) == 20
        assert ray.cluster_resources().get("CPU") == 2  # still up after the driver left
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_engine_refusal_stops_the_run_with_its_message(tmp_path, capsys, no_leftover_ray):
    listing = cifar_list(tmp_path, per_class=1)
    with pytest.raises(SystemExit, match="nope"):
        main(["batch", str(listing), "--out", str(tmp_path / "o"), *CIFAR_SPEC, "--layer", "nope", "--quiet",
              "--ray"])
    assert not ray.is_initialized()


def test_ray_flag_rejects_a_path_as_address(tmp_path):
    with pytest.raises(SystemExit, match="not an address"):
        main(["batch", "--ray", str(CIFAR), "--out", str(tmp_path / "o"), str(CIFAR)])
