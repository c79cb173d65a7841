"""A reference gallery for FAM: retrieval items or few-shot class prototypes.

A :class:`Gallery` is plain data — ``embeddings (M, D)`` float32, ``labels`` (M strings) and,
optionally, ``feature_maps (M, C, h, w)`` float16, so that FAM can draw each match's reference map
without re-running its image. It is built with the embedding model
(:meth:`Gallery.build` for a retrieval gallery, :meth:`Gallery.prototypes` for class prototypes
``p_c = (1/|S_c|) Σ_{x∈S_c} e(x)`` with mean feature maps) and saved/loaded as

* ``.npz`` — numpy arrays only (labels as a unicode array), loaded with ``allow_pickle=False``;
* ``.pt`` — a dict of tensors plus a list of strings, loaded with ``torch.load(weights_only=True)``.

Never a pickle of Python objects: a gallery shipped in a model archive cannot run code on load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from camserve.engine.errors import InvalidReferenceError

FEATURE_MAP_DTYPE = torch.float16


@dataclass
class Gallery:
    """``embeddings (M, D)``, ``labels`` (len M), optional ``feature_maps (M, C, h, w)``."""

    embeddings: torch.Tensor
    labels: List[str]
    feature_maps: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.embeddings = torch.as_tensor(self.embeddings)
        self.labels = [str(label) for label in self.labels]
        if self.embeddings.dim() != 2 or not self.embeddings.is_floating_point():
            raise InvalidReferenceError(f"gallery embeddings must be a float (M, D) array, got "
                                        f"{self.embeddings.dtype} {tuple(self.embeddings.shape)}")
        self.embeddings = self.embeddings.float()
        if not torch.isfinite(self.embeddings).all():
            raise InvalidReferenceError("gallery embeddings contain NaN or infinite values")
        if len(self.labels) != self.embeddings.shape[0]:
            raise InvalidReferenceError(f"gallery has {self.embeddings.shape[0]} embeddings but {len(self.labels)} labels")
        if self.feature_maps is not None:
            self.feature_maps = torch.as_tensor(self.feature_maps)
            if self.feature_maps.dim() != 4 or self.feature_maps.shape[0] != self.embeddings.shape[0]:
                raise InvalidReferenceError(f"gallery feature maps must be (M, C, h, w) with M = "
                                            f"{self.embeddings.shape[0]}, got {tuple(self.feature_maps.shape)}")
            self.feature_maps = self.feature_maps.to(FEATURE_MAP_DTYPE)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def to(self, device) -> "Gallery":
        """A copy on ``device`` (the embedding model's)."""
        maps = self.feature_maps.to(device) if self.feature_maps is not None else None
        return Gallery(self.embeddings.to(device), list(self.labels), maps)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, embedding_model, images: torch.Tensor, labels: Sequence[str], keep_feature_maps: bool = True,
              batch_size: int = 16) -> "Gallery":
        """One item per image: ``e(x_i)`` and (optionally) ``A(x_i)`` as float16."""
        images, labels = _check_support(images, labels)
        embeddings, maps = _embed(embedding_model, images, batch_size)
        return cls(embeddings, list(labels), maps.to(FEATURE_MAP_DTYPE) if keep_feature_maps else None)

    @classmethod
    def prototypes(cls, embedding_model, images: torch.Tensor, labels: Sequence[str], keep_feature_maps: bool = True,
                   batch_size: int = 16) -> "Gallery":
        """Few-shot prototypes: per class ``c`` the mean embedding ``p_c = mean_{i: y_i = c} e(x_i)``
        (not re-normalised) and the mean feature map; classes in first-seen order."""
        images, labels = _check_support(images, labels)
        embeddings, maps = _embed(embedding_model, images, batch_size)
        classes = list(dict.fromkeys(str(label) for label in labels))
        protos, proto_maps = [], []
        for name in classes:
            idx = torch.tensor([i for i, label in enumerate(labels) if str(label) == name], device=embeddings.device)
            protos.append(embeddings[idx].mean(dim=0))
            proto_maps.append(maps[idx].mean(dim=0))
        return cls(torch.stack(protos), classes,
                   torch.stack(proto_maps).to(FEATURE_MAP_DTYPE) if keep_feature_maps else None)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write ``.npz`` (numpy arrays) or ``.pt`` (tensors + list of str); chosen by extension."""
        if str(path).endswith(".npz"):
            arrays = {"embeddings": self.embeddings.cpu().numpy(), "labels": np.array(self.labels, dtype=np.str_)}
            if self.feature_maps is not None:
                arrays["feature_maps"] = self.feature_maps.cpu().numpy()
            np.savez(path, **arrays)
        elif str(path).endswith(".pt"):
            data = {"embeddings": self.embeddings.cpu(), "labels": list(self.labels)}
            if self.feature_maps is not None:
                data["feature_maps"] = self.feature_maps.cpu()
            torch.save(data, path)
        else:
            raise ValueError(f"gallery path must end in .npz or .pt, got {path!r}")

    @classmethod
    def load(cls, path: str, device=None) -> "Gallery":
        """Read a gallery written by :meth:`save`; refuses object pickles."""
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        try:
            if str(path).endswith(".npz"):
                with np.load(path, allow_pickle=False) as data:
                    embeddings = torch.from_numpy(data["embeddings"].copy())
                    labels = [str(x) for x in data["labels"].tolist()]
                    maps = torch.from_numpy(data["feature_maps"].copy()) if "feature_maps" in data.files else None
            elif str(path).endswith(".pt"):
                data = torch.load(path, map_location="cpu", weights_only=True)
                embeddings, labels, maps = data["embeddings"], list(data["labels"]), data.get("feature_maps")
            else:
                raise ValueError(f"gallery path must end in .npz or .pt, got {path!r}")
        except KeyError as missing:
            raise InvalidReferenceError(f"gallery file {path} lacks {missing}") from None
        gallery = cls(embeddings, labels, maps)
        return gallery.to(device) if device is not None else gallery


def _check_support(images: torch.Tensor, labels: Sequence[str]):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise InvalidReferenceError("a gallery needs a non-empty (M, 3, H, W) image batch")
    if len(labels) != images.shape[0]:
        raise InvalidReferenceError(f"{images.shape[0]} gallery images but {len(labels)} labels")
    return images, list(labels)


def _embed(embedding_model, images: torch.Tensor, batch_size: int):
    embeddings, maps = [], []
    for start in range(0, images.shape[0], batch_size):
        trace = embedding_model.trace(images[start:start + batch_size], grad=False)
        embeddings.append(trace.embedding)
        maps.append(trace.maps)
    return torch.cat(embeddings), torch.cat(maps)
