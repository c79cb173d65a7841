"""Train a small contrastive projection head (SimCLR's NT-Xent) on frozen pretrained CIFAR features, so
that FAM's Jacobian route meets a head trained for similarity (issue 21, item 3).

``python -m camserve.lab.train_contrastive_head --out head.pt``

* **Backbone (frozen)**: the pretrained CIFAR-10 ResNet-56 of ``../shared/models/cifar-resnet``;
  ``f = GAP(layer3)`` (64-d, not normalised) — the pooled feature FAM's Jacobian route differentiates at.
* **Data**: the even positions of the sorted ``../shared/data/cifar10-test`` file list (the odd
  positions are left for evaluation: the fixed split of the FAM benchmarks).
* **Views**: ``--views`` augmented copies of each image, drawn once with a seeded generator and
  embedded once (the backbone is frozen, so the head trains on cached features): a random resized crop
  (area ``U(0.35, 1)`` of the image, aspect ``U(3/4, 4/3)``, bilinear back to 32×32), a horizontal
  flip with p = ½, and colour jitter (brightness, contrast and saturation factors ``U(0.6, 1.4)``,
  applied in that order on [0, 1] pixels), then the ImageNet mean/std the model expects.
* **Head**: ``u = W₂ ReLU(W₁ f)`` (64 → 128 → 64, **no biases**: positively homogeneous, so the
  Jacobian route's ``Σ_k c_k = s̃`` holds exactly by Euler's identity), embedding ``e = u/‖u‖``.
* **Loss**: NT-Xent (Chen et al. 2020) over a batch of ``B`` images, two different cached views each:
  ``ℓ(i, j) = −log exp(cos(e_i, e_j)/τ) / Σ_{k≠i} exp(cos(e_i, e_k)/τ)`` averaged over the 2B anchors
  (τ = ``--temperature``, default 0.2); Adam.
* **Deterministic**: one seed drives the views, the head's initialisation and the batches; one torch
  thread by default.

Writes the head's state dict (``torch.save``; load with :func:`load_head`) and prints nearest-neighbour
label agreement on the odd half (frozen features, the untrained head, the trained head). The weights
are not committed: tests and benchmarks build them with :func:`train_head`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from camserve.engine.models.embedding import EmbeddingModel, projection_mlp
from camserve.lab.evaluate_faithfulness import image_set, load_batch, load_cifar_resnet, shared_dir

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@dataclass
class HeadConfig:
    images: int = 2500         # images from the even half (at a fixed stride)
    views: int = 4             # cached augmented views per image
    hidden: int = 128
    out_dim: int = 64
    batch: int = 256
    epochs: int = 30
    lr: float = 1e-3
    temperature: float = 0.2
    seed: int = 0


def cifar_backbone(device="cpu") -> Tuple[EmbeddingModel, nn.Module]:
    """The frozen ResNet-56 as an embedding of its pooled layer3 map (raw ``f``) and the classifier."""
    model = load_cifar_resnet(str(shared_dir() / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"), 56, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return EmbeddingModel.from_classifier(model, "layer3", normalize=False), model


def split_files(half: str) -> List[Tuple[str, int]]:
    """The sorted CIFAR-10 test set's even (``choose``) or odd (``report``) positions: ``[(file, label)]``."""
    items = image_set("cifar", shared_dir() / "data" / "cifar10-test", 10 ** 9, 0)
    return items[0::2] if half == "even" else items[1::2]


def colour_jitter(pixels: torch.Tensor, generator: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast and saturation factors ``U(1 − strength, 1 + strength)`` (seeded), applied in
    that order to one ``(1, 3, H, W)`` image of [0, 1] pixels, clamped to [0, 1]."""
    b, c, s = (float(x) for x in torch.empty(3).uniform_(1 - strength, 1 + strength, generator=generator))
    view = pixels * b
    view = (view - view.mean()) * c + view.mean()
    grey = 0.299 * view[:, 0:1] + 0.587 * view[:, 1:2] + 0.114 * view[:, 2:3]
    return ((view - grey) * s + grey).clamp(0, 1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One augmented view per image of a normalised batch (see the module docstring)."""
    n, _, h, w = images.shape
    pixels = images * STD + MEAN
    out = torch.empty_like(pixels)
    for i in range(n):
        area = float(torch.empty(1).uniform_(0.35, 1.0, generator=generator)) * h * w
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
        ch = max(8, min(h, int(round(math.sqrt(area / aspect)))))
        cw = max(8, min(w, int(round(math.sqrt(area * aspect)))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        view = F.interpolate(pixels[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
        if float(torch.rand(1, generator=generator)) < 0.5:
            view = view.flip(-1)
        out[i] = colour_jitter(view, generator)[0]
    return (out - MEAN) / STD


def pooled_features(backbone: EmbeddingModel, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([backbone.trace(images[i:i + batch]).pooled for i in range(0, images.shape[0], batch)])


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent for two views ``a, b (B, D)`` of the same B images."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def cached_views(backbone: EmbeddingModel, config: HeadConfig, log=print) -> torch.Tensor:
    """``(N, V, 64)`` pooled features of ``V`` seeded augmented views of ``N`` even-half images."""
    items = split_files("even")
    items = items[::max(1, len(items) // config.images)][:config.images]
    images = load_batch("cifar", shared_dir() / "data" / "cifar10-test", [f for f, _ in items], "cpu")
    generator = torch.Generator().manual_seed(config.seed)
    views = []
    start = time.perf_counter()
    for v in range(config.views):
        views.append(pooled_features(backbone, augment(images, generator)))
    log(f"cached {config.views} views of {len(items)} images in {time.perf_counter() - start:.1f} s")
    return torch.stack(views, dim=1)


def train_head(config: HeadConfig, backbone: Optional[EmbeddingModel] = None, log=print) -> Tuple[nn.Module, Dict]:
    """Train the head; returns it (eval mode) and ``{"loss_first", "loss_last", "seconds"}``."""
    backbone = backbone if backbone is not None else cifar_backbone()[0]
    features = cached_views(backbone, config, log)
    torch.manual_seed(config.seed)
    head = projection_mlp(features.shape[-1], config.hidden, config.out_dim)
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    n, views = features.shape[:2]
    losses = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        epoch_loss = []
        for s in range(0, n - 1, config.batch):
            idx = order[s:s + config.batch]
            if idx.numel() < 2:
                continue
            first = torch.randint(0, views, (idx.numel(),), generator=generator)
            second = (first + torch.randint(1, views, (idx.numel(),), generator=generator)) % views
            loss = nt_xent(head(features[idx, first]), head(features[idx, second]), config.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            epoch_loss.append(float(loss.detach()))
        losses.append(sum(epoch_loss) / len(epoch_loss))
    seconds = time.perf_counter() - start
    log(f"trained {config.epochs} epochs in {seconds:.1f} s: NT-Xent {losses[0]:.3f} → {losses[-1]:.3f}")
    return head.eval(), {"loss_first": losses[0], "loss_last": losses[-1], "seconds": round(seconds, 2)}


def neighbour_agreement(embeddings: torch.Tensor, labels: List[int]) -> float:
    """Fraction of items whose nearest *other* item (cosine) has the same label."""
    z = F.normalize(embeddings, dim=1)
    sims = z @ z.T
    sims.fill_diagonal_(-2.0)
    nearest = sims.argmax(dim=1).tolist()
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / len(labels)


def view_retrieval(views: torch.Tensor, originals: torch.Tensor) -> float:
    """Fraction of augmented views whose nearest original (cosine) is their own image (row i ↔ row i)."""
    sims = F.normalize(views, dim=1) @ F.normalize(originals, dim=1).T
    return float((sims.argmax(dim=1) == torch.arange(views.shape[0])).float().mean())


def evaluate_heads(backbone: EmbeddingModel, heads: Dict[str, Optional[nn.Module]], images: int = 1000,
                   seed: int = 12345) -> Dict:
    """On the odd half (``images`` at a fixed stride): nearest-neighbour label agreement (``nn_label``)
    and, for one seeded augmented view per image, how often its nearest clean image is its own
    (``view_retrieval``: what NT-Xent trains for)."""
    items = split_files("odd")
    items = items[::max(1, len(items) // images)][:images]
    batch = load_batch("cifar", shared_dir() / "data" / "cifar10-test", [f for f, _ in items], "cpu")
    labels = [y for _, y in items]
    f = pooled_features(backbone, batch)
    g = pooled_features(backbone, augment(batch, torch.Generator().manual_seed(seed)))
    out: Dict = {"images": len(items), "nn_label": {}, "view_retrieval": {}}
    with torch.inference_mode():
        for name, head in heads.items():
            project = head if head is not None else (lambda x: x)
            out["nn_label"][name] = neighbour_agreement(project(f), labels)
            out["view_retrieval"][name] = view_retrieval(project(g), project(f))
    return out


def load_head(path: str, hidden: int = 128, out: int = 64, in_features: int = 64) -> nn.Module:
    head = projection_mlp(in_features, hidden, out)
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return head.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = HeadConfig()
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="where to write the head's state dict (.pt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = HeadConfig(**{k: getattr(args, k) for k in vars(defaults)})
    backbone, _ = cifar_backbone()
    torch.manual_seed(config.seed)
    untrained = projection_mlp(64, config.hidden, config.out_dim).eval()
    head, stats = train_head(config, backbone)
    torch.save(head.state_dict(), args.out)
    agreement = evaluate_heads(backbone, {"frozen": None, "untrained_head": untrained, "trained_head": head})
    print(json.dumps({"config": vars(config), "training": stats, "odd_half_nn_agreement": agreement}, indent=1))
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
