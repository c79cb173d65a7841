"""``camserve kserve-layout``: the folder KServe's TorchServe runtime serves, from built ``.mar`` files.

    camserve kserve-layout --mar model_store/effnet_lite0.mar --mar model_store/effnet_lite0_embed.mar \\
        --output kserve-torchserve --storage-uri s3://bucket/camserve

KServe's ``kserve-torchserve`` runtime (image ``pytorch/torchserve-kfs``) mounts the InferenceService's
``storageUri`` at ``/mnt/models`` and expects::

    config/config.properties     TorchServe's configuration; its model_snapshot names the models
    model-store/<name>.mar       the archives, as built (copied, not rebuilt)

The runtime's KServe wrapper listens on 8080 and forwards ``/v1/models/<name>:predict|:explain`` to
TorchServe on port **8085** (it reads ``inference_address`` / ``management_address`` /
``model_snapshot`` from this file and talks to TorchServe without a token). So the generated file
binds TorchServe's inference and management APIs to ``127.0.0.1:8085`` / ``127.0.0.1:8086`` (same pod,
nothing outside it reaches them), turns token authorization off (the wrapper sends none; nothing but
the wrapper can connect), keeps the model API off, serves Prometheus metrics on ``0.0.0.0:8082`` (the
port KServe's scraping annotations name), and sets ``enable_envvars_config=false``: the runtime sets
``TS_SERVICE_ENVELOPE`` from the InferenceService's ``serviceEnvelope`` label, and a TorchServe
envelope would hand the camserve handlers unwrapped instances — they read KServe v1/v2 bodies
themselves (per request, with their own errors). ``model_snapshot`` carries each archive's own
``model-config.yaml`` batching keys (batchSize, maxBatchDelay, workers, timeouts).

It also writes ``inferenceservice.yaml`` for that runtime (``modelFormat: pytorch``, the storage URI,
GPU limits, replicas, scale metric). The stock ``torchserve-kfs`` image lacks camserve's Python
dependencies (pillow, the EfficientNet-Lite0 code, …): build ``deploy/Dockerfile.torchserve`` and
pass it as ``--image``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import yaml

INFERENCE_PORT = 8085  # where KServe's TorchServe wrapper forwards requests
MANAGEMENT_PORT = 8086
METRICS_PORT = 8082
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")
SNAPSHOT_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 100, "responseTimeout": 120,
                     "startupTimeout": 300}
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", action="append", required=True, help="a built .mar (repeatable)")
    parser.add_argument("--output", required=True, help="folder to write (config/, model-store/, inferenceservice.yaml)")
    parser.add_argument("--storage-uri", default="pvc://camserve-models/kserve-torchserve",
                        help="where the folder will be uploaded (the InferenceService's storageUri)")
    parser.add_argument("--name", default="camserve-torchserve", help="InferenceService name")
    parser.add_argument("--image", default=None,
                        help="runtime image with camserve's dependencies (deploy/Dockerfile.torchserve)")
    parser.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu limit per replica (0: CPU only)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--scale-metric", choices=SCALE_METRICS, default="concurrency")
    parser.add_argument("--scale-target", type=int, default=8,
                        help="target per replica (concurrency: in-flight requests; default 8 = one full batch)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def read_archive(path: Path) -> Dict[str, Any]:
    """An archive's name, version and model-config (batching keys) from its MANIFEST and config file."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        model = manifest.get("model") or {}
        config_name = model.get("configFile")
        config = yaml.safe_load(archive.read(config_name)) if config_name and config_name in archive.namelist() else {}
    return {"name": model.get("modelName") or path.stem, "version": model.get("modelVersion") or "1.0",
            "config": config or {}}


def model_snapshot(archives: List[Dict[str, Any]]) -> Dict[str, Any]:
    models: Dict[str, Any] = {}
    for entry in archives:
        settings = {k: entry["config"].get(k, SNAPSHOT_DEFAULTS[k]) for k in SNAPSHOT_KEYS}
        models[entry["name"]] = {entry["version"]: {"defaultVersion": True, "marName": entry["mar"], **settings}}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def config_properties(archives: List[Dict[str, Any]], model_store: str = "/mnt/models/model-store") -> str:
    snapshot = json.dumps(model_snapshot(archives), separators=(",", ":"))
    return "\n".join([
        "# TorchServe configuration for KServe's TorchServe runtime, written by `camserve kserve-layout`.",
        "# The runtime's KServe wrapper (port 8080) forwards /v1/models/<name>:predict|:explain here (8085);",
        "# inference and management stay inside the pod, so token auth is off (the wrapper sends none).",
        f"inference_address=http://127.0.0.1:{INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{MANAGEMENT_PORT}",
        "# Prometheus scrapes the pod on this port (serving.kserve.io/enable-prometheus-scraping).",
        f"metrics_address=http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address=127.0.0.1",
        "grpc_inference_port=7070",
        "grpc_management_address=127.0.0.1",
        "grpc_management_port=7071",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "# camserve reads KServe v1/v2 bodies itself: no TorchServe envelope (TS_SERVICE_ENVELOPE) may apply.",
        "enable_envvars_config=false",
        "install_py_dep_per_model=false",
        "metrics_mode=prometheus",
        "model_metrics_auto_detect=true",
        "max_request_size=16777216",
        "max_response_size=33554432",
        "job_queue_size=100",
        f"model_store={model_store}",
        "load_models=all",
        f"model_snapshot={snapshot}",
        "",
    ])


def inference_service(args: argparse.Namespace, archives: List[Dict[str, Any]]) -> Dict[str, Any]:
    resources: Dict[str, Any] = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    if args.gpus:
        resources["requests"]["nvidia.com/gpu"] = args.gpus
        resources["limits"]["nvidia.com/gpu"] = args.gpus
    model: Dict[str, Any] = {"modelFormat": {"name": "pytorch"}, "protocolVersion": "v1",
                             "storageUri": args.storage_uri, "resources": resources}
    if args.image:
        model["image"] = args.image
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": args.name,
                     "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true",
                                     "prometheus.kserve.io/port": str(METRICS_PORT),
                                     "prometheus.kserve.io/path": "/metrics"}},
        "spec": {"predictor": {"minReplicas": args.min_replicas, "maxReplicas": args.max_replicas,
                               "scaleMetric": args.scale_metric, "scaleTarget": args.scale_target,
                               "model": model}},
    }


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists():
        if not args.force:
            raise SystemExit(f"{out} exists: pass --force to replace it")
        shutil.rmtree(out)
    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        raise SystemExit("need 0 ≤ --min-replicas ≤ --max-replicas and --max-replicas ≥ 1")
    archives = []
    for mar in args.mar:
        path = Path(mar)
        if not path.is_file():
            raise SystemExit(f"--mar {mar!r} not found")
        entry = read_archive(path)
        entry["mar"] = path.name
        archives.append(entry)
    names = [a["name"] for a in archives]
    if len(set(names)) != len(names):
        raise SystemExit(f"two archives with the same model name: {names}")
    (out / "config").mkdir(parents=True)
    (out / "model-store").mkdir()
    for mar in args.mar:
        shutil.copy2(mar, out / "model-store" / Path(mar).name)
    (out / "config" / "config.properties").write_text(config_properties(archives))
    (out / "inferenceservice.yaml").write_text(
        "# InferenceService for KServe's TorchServe runtime, written by `camserve kserve-layout`.\n"
        "# Upload the folder's config/ and model-store/ to storageUri first. Do not set a serviceEnvelope label.\n"
        + yaml.safe_dump(inference_service(args, archives), sort_keys=False))
    print(f"wrote {out}/config/config.properties, {out}/model-store/ ({', '.join(names)}), {out}/inferenceservice.yaml")
    return 0
