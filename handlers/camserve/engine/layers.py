"""The layers of a model, by module path, traced once when an explainer is built.

A :class:`LayerCatalog` runs one probe forward (no gradient) on a zero image and records, for each
named module, the shape of its output, how often it is called and the order in which modules are
entered and left. It is immutable afterwards, so it is safe to share between requests and threads.

It answers three questions the methods need:

* is ``name`` a valid layer, and if not which names are close (for the error message);
* is its output a ``(N, C, H, W)`` feature map;
* which layer is ``l+1``, the layer directly above ``l`` (used by Shallow-CAM).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import NotAFeatureMapError, UnknownLayerError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def probe_forward(model: nn.Module, input_size: Tuple[int, int], register, seed: Optional[int] = None):
    """One no-grad forward of a probe ``(1, 3, H, W)`` (model's device and dtype) with the hooks that
    ``register(handles)`` installs, appending each handle; every handle is removed afterwards,
    also when registering or the forward fails. The probe is zeros, or with ``seed`` a standard
    normal image from its own generator (the global RNG is not touched). Returns the output."""
    handles: list = []
    try:
        register(handles)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        if seed is None:
            probe = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)
        else:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            probe = torch.randn(1, 3, *input_size, generator=generator).to(device=device, dtype=dtype)
        with torch.no_grad():
            return model(probe)
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class LayerInfo:
    """What the probe forward saw of one module."""

    name: str
    type_name: str
    output_shape: Optional[Tuple[int, ...]]  # without the batch dimension; None if not a tensor
    calls: int
    entered: int  # position in the order modules were entered (first call)
    exited: int  # position in the order modules were left (last call)

    @property
    def depth(self) -> int:
        return 0 if not self.name else self.name.count(".") + 1

    @property
    def is_feature_map(self) -> bool:
        """A ``(C, H, W)`` output with some spatial extent; a ``(C, 1, 1)`` output (global pooling,
        a squeeze-excite bottleneck) has no map to show."""
        return (self.output_shape is not None and len(self.output_shape) == 3
                and self.output_shape[1] * self.output_shape[2] > 1)


@dataclass(frozen=True)
class LayerCatalog:
    """Module paths of ``model`` with output shapes and execution order, for one input size."""

    input_size: Tuple[int, int]
    layers: Dict[str, LayerInfo] = field(default_factory=dict)

    @classmethod
    def trace(cls, model: nn.Module, input_size: Tuple[int, int] = (224, 224)) -> "LayerCatalog":
        """Run one no-grad probe forward on zeros of ``(1, 3, H, W)`` and record every module."""
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        seen: Dict[str, dict] = {}
        clock = [0]

        def pre_hook(module, args):
            rec = seen.setdefault(names[id(module)], {"calls": 0, "entered": clock[0], "exited": -1,
                                                     "shape": None})
            rec["calls"] += 1
            clock[0] += 1

        def post_hook(module, args, output):
            rec = seen[names[id(module)]]
            rec["exited"] = clock[0]
            clock[0] += 1
            rec["shape"] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

        def register(handles):
            for name, module in modules.items():
                if name:
                    handles.append(module.register_forward_pre_hook(pre_hook))
                    handles.append(module.register_forward_hook(post_hook))

        probe_forward(model, input_size, register)
        layers = {
            name: LayerInfo(name, type(modules[name]).__name__, rec["shape"], rec["calls"],
                            rec["entered"], rec["exited"])
            for name, rec in seen.items()
        }
        return cls(tuple(input_size), layers)

    def names(self) -> List[str]:
        """All module paths that ran in the probe forward, in the order they were entered."""
        return sorted(self.layers, key=lambda n: self.layers[n].entered)

    def feature_map_layers(self) -> List[str]:
        """Module paths whose output is a (C, H, W) feature map, in execution order."""
        return [n for n in self.names() if self.layers[n].is_feature_map]

    def get(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` of ``name``; :class:`UnknownLayerError` listing near names if absent."""
        info = self.layers.get(name)
        if info is None:
            near = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.5)
            if not near:
                near = [n for n in self.feature_map_layers() if n.split(".")[0] == name.split(".")[0]][:5]
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise UnknownLayerError(f"unknown layer {name!r}{hint}")
        return info

    def feature_map(self, name: str) -> LayerInfo:
        """Like :meth:`get`, but also requires the output to be a (N, C, H, W) feature map."""
        info = self.get(name)
        if not info.is_feature_map:
            pooled = info.output_shape is not None and len(info.output_shape) == 3
            what = "a spatially pooled 1×1 output" if pooled else "not a (C, H, W) feature map"
            near = [n for n in self.feature_map_layers() if self.layers[n].exited < info.entered][-3:]
            hint = f" (e.g. {', '.join(repr(n) for n in near)})" if near else ""
            raise NotAFeatureMapError(
                f"layer {name!r} ({info.type_name}) outputs shape {info.output_shape}, {what}; "
                f"name a convolutional stage instead{hint}")
        return info

    def layer_above(self, name: str) -> str:
        """The layer ``l+1`` directly above ``l``: the first feature-map module entered after ``l``
        is left, no deeper in the module tree than ``l``; a container found there is descended
        into its first feature-map child of the same depth as ``l``."""
        base = self.feature_map(name)
        after = [self.layers[n] for n in self.names()
                 if self.layers[n].entered > base.exited and self.layers[n].is_feature_map]
        for info in after:
            if info.depth <= base.depth:
                candidate = info
                while candidate.depth < base.depth and candidate.type_name in _container_names():
                    children = [c for c in after if c.name.startswith(candidate.name + ".")
                                and c.depth == candidate.depth + 1]
                    if not children:
                        break
                    candidate = children[0]
                return candidate.name
        raise NotAFeatureMapError(f"layer {name!r} is the last feature map; there is no layer above it")

def _container_names() -> Tuple[str, ...]:
    return tuple(c.__name__ for c in _CONTAINERS)
