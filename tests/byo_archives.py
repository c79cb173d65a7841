"""Bring-your-own-model archives for the server tests, built with ``camserve archive``.

* ``tv_resnet18`` — torchvision ResNet-18, 5 classes, random weights (seeded) saved as a state dict
  nested under ``{"state_dict": …}`` with ``module.`` prefixes, and a 5-name ``index_to_name.json``;
* ``timm_vit`` — timm ``vit_tiny_patch16_224``, 10 classes, random weights, preprocessing from its
  ``pretrained_cfg``;
* ``cifar_resnet20`` — the pretrained CIFAR-10 ResNet-20 of ``../shared/models/cifar-resnet`` as an
  ``eager`` model (``examples/cifar_resnet/model.py``), 32×32, the CIFAR-10 label map;
* ``tv_resnet18_embed`` — ResNet-18 with ``fc = Identity`` (``--num-classes 0``): the embedding is
  the pooled ``layer4`` map, FAM's gradient-free route;
* ``tv_resnet18_proj`` — ResNet-18 whose ``fc`` is a 128-d projection head (``--embedding output``):
  FAM's Jacobian route;
* ``cifar_resnet56_embed`` — the pretrained CIFAR-10 ResNet-56 as an embedding model (the pooled
  ``layer3`` map), with a gallery of 2 shots per CIFAR-10 class built by ``camserve gallery --shots 2``
  from ``../shared/data/cifar10-test`` (retrieval matches and few-shot prototypes).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMSERVE_SHARED", REPO.parent / "shared"))
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
TV_CLASSES = ["alpha", "bravo", "charlie", "delta", "echo"]
RESNET20 = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"
CIFAR_TEST = SHARED / "data" / "cifar10-test"
#: the spec flags of the ResNet-56 embedding model (camserve archive / gallery / kserve)
RESNET56_EMBED = ["--task", "embed", "--source", "eager", "--model-file", str(REPO / "examples/cifar_resnet/model.py"),
                  "--class-name", "CifarResNet", "--kwargs", '{"depth": 56}', "--weights", str(RESNET56),
                  "--preprocess", "crop=32", "--embedding", "pooled", "--feature-layer", "layer3"]
BYO_MODELS = {name: f"{name}.mar" for name in
              ("tv_resnet18", "timm_vit", "cifar_resnet20", "tv_resnet18_embed", "tv_resnet18_proj",
               "cifar_monitored", "cifar_resnet56_embed")}
#: the monitored archive's handler.monitor: every plain request monitored, the first 20 maps the
#: reference, a drift score of the latest 20 every 5 maps
MONITOR = {"fraction": 1.0, "reference_size": 20, "window": 20, "score_every": 5}


def camserve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "camserve"), *args], cwd=cwd, capture_output=True, text=True)


def save_random_weights(work: Path) -> None:
    """The random-weight state dicts (seeded), written the way users save them."""
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=len(TV_CLASSES))
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}, "epoch": 3},
               work / "resnet18.pt")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=128).state_dict(), work / "resnet18_proj.pth")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    from safetensors.torch import save_file
    save_file(vit.state_dict(), str(work / "vit.safetensors"))
    (work / "tv_labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(TV_CLASSES)}))
    (work / "cifar10.json").write_text(json.dumps({str(i): [f"c{i}", n] for i, n in enumerate(CIFAR_CLASSES)}))


def build_resnet56_gallery(work: Path) -> Path:
    """``work/resnet56/gallery.npz`` (2 shots of each CIFAR-10 class, the ResNet-56 embeddings and maps)
    and ``work/resnet56/model-config.yaml`` naming it (``gallery_topk`` 2): what the archive ships and
    what ``camserve kserve --model-config`` serves."""
    folder = work / "resnet56"
    folder.mkdir(parents=True, exist_ok=True)
    done = camserve("gallery", str(CIFAR_TEST), str(folder / "gallery.npz"), "--shots", "2", *RESNET56_EMBED, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"camserve gallery (ResNet-56) failed:\n{done.stdout}{done.stderr}")
    (folder / "model-config.yaml").write_text(yaml.safe_dump({"handler": {"gallery_file": "gallery.npz",
                                                                         "gallery_topk": 2}}))
    return folder


def build_byo_archives(store: Path, work: Path) -> Dict[str, str]:
    """Build the archives into ``store``; returns ``{model name: mar file}``."""
    work.mkdir(parents=True, exist_ok=True)
    save_random_weights(work)
    out = str(store)
    builds = [
        ["tv_resnet18", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "5",
         "--weights", "resnet18.pt", "--labels", "tv_labels.json", "--method-layer", "shallowcam=stage2"],  # layer1 (stage1 is the stem)
        ["timm_vit", "--source", "timm", "--arch", "vit_tiny_patch16_224", "--num-classes", "10",
         "--weights", "vit.safetensors", "--default-method", "gradcam"],
        ["cifar_resnet20", "--source", "eager", "--model-file", str(REPO / "examples/cifar_resnet/model.py"),
         "--class-name", "CifarResNet", "--kwargs", '{"depth": 20}', "--weights", str(RESNET20),
         "--preprocess", "crop=32", "--labels", "cifar10.json", "--method-layer", "shallowcam=stage1",
         # the reading measured best for few-class ResNets (benchmarks/results/shallowcam_variants.md § 10)
         "--method-option", "shallowcam.temperature=4", "--method-option", "shallowcam.beta_from=auto"],
        ["tv_resnet18_embed", "--task", "embed", "--source", "torchvision", "--arch", "resnet18",
         "--num-classes", "0"],
        ["tv_resnet18_proj", "--task", "embed", "--source", "torchvision", "--arch", "resnet18",
         "--num-classes", "128", "--weights", "resnet18_proj.pth", "--embedding", "output"],
    ]
    monitored = dict(yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text()))
    monitored["handler"] = {"monitor": MONITOR}  # the audit log: CAMSERVE_AUDIT_LOG of the session server
    (work / "monitored.yaml").write_text(yaml.safe_dump(monitored))
    builds.append(["cifar_monitored", "--config", "monitored.yaml", "--source", "eager", "--model-file",
                   str(REPO / "examples/cifar_resnet/model.py"), "--class-name", "CifarResNet", "--kwargs",
                   '{"depth": 20}', "--weights", str(RESNET20), "--preprocess", "crop=32", "--labels", "cifar10.json"])
    resnet56 = build_resnet56_gallery(work)
    builds.append(["cifar_resnet56_embed", *RESNET56_EMBED, "--config", str(resnet56 / "model-config.yaml"),
                   "--extra-file", str(resnet56 / "gallery.npz")])
    for args in builds:
        done = camserve("archive", *args, "--export-path", out, cwd=work)
        if done.returncode != 0:
            raise RuntimeError(f"camserve archive {args[0]} failed:\n{done.stdout}{done.stderr}")
    return dict(BYO_MODELS)
