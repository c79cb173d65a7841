"""The layers of a model, by module path, traced once when an explainer is built.

A :class:`LayerCatalog` runs one probe forward (no gradient) on a zero image and records, for each
named module, the shape of its output, how often it is called and the order in which modules are
entered and left. It is immutable afterwards, so it is safe to share between requests and threads.

It answers the questions the methods and the model profiles need:

* is ``name`` a valid layer (a module path, or a stage alias ``stage1`` … ``stageN`` via
  :meth:`LayerCatalog.resolve`), and if not which names are close (for the error message);
* is its output a feature map, and in which **layout**: ``"nchw"`` ``(C, H, W)``; ``"nhwc"``
  ``(H, W, C)`` (channels-last: Swin, the permuted insides of ConvNeXt blocks); ``"tokens"``
  ``(T, D)`` with ``T = prefix + h·w`` (ViT: class/distillation/register tokens, then the patch
  grid). :meth:`LayerCatalog.as_map` turns any of them into ``(N, C, h, w)`` — a linear selection,
  so the gradient converted the same way is the gradient w.r.t. the map;
* its stride (input size / map size), the **stages** (the last module at each resolution, shallow →
  deep; the transformer blocks of a token model) and the default CAM layer;
* which layer is ``l+1``, the layer directly above ``l`` (used by Shallow-CAM).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from camserve.engine.errors import InvalidInputError, NotAFeatureMapError, UnknownLayerError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: modules whose output adds nothing to the map they read (never a stage or the default layer)
_PASS_THROUGH = re.compile(r"^(Identity|Dropout\d?d?|AlphaDropout|DropPath|DropBlock\d?d?|StochasticDepth|Flatten|"
                           r"Unflatten|Permute|Transpose|Reshape|View)$")
#: pure normalisations (a per-channel affine of the map they read); ``BatchNormAct2d`` is not one
_NORM = re.compile(r"^(Frozen)?(Batch|Layer|Group|Instance|RMS|Local)Norm(\d+d)?$|^LayerNorm2d$|^SyncBatchNorm$")
#: a prefix longer than this is not looked for in a token sequence (class + distillation + 8 registers …)
MAX_PREFIX_TOKENS = 16
#: padding modules: a map of the padded size, part of the conv that reads it
_PADDING = re.compile(r"Pad(\d+d)?$")
_STAGE_ALIAS = re.compile(r"^stage(\d+)$", re.IGNORECASE)


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


def grid_stride(h: int, w: int, input_size: Tuple[int, int]) -> Optional[int]:
    """The common integer stride ``s`` of an ``h × w`` grid over an ``H × W`` input, tried in this
    order: a power of two ``s`` with ``h`` ``⌊H/s⌋`` or ``⌈H/s⌉`` and ``w`` likewise (strided convs
    and pools, also for sizes that do not divide); ``H = s·h`` and ``W = s·w`` exactly (a patch size
    such as 14); a power of two with ``h`` up to ``min(3, ⌊H/s⌋/8)`` below ``⌊H/s⌋`` (unpadded
    convs, Inception). ``None`` if nothing fits (another aspect, an upsampled or padded map)."""
    height, width = input_size
    if not (0 < h <= height and 0 < w <= width):
        return None
    powers = [1 << k for k in range(height.bit_length())]
    for s in powers:
        if h in (height // s, -(-height // s)) and w in (width // s, -(-width // s)):
            return s
    if height % h == 0 and width % w == 0 and height // h == width // w:
        return height // h
    for s in powers:
        low_h, low_w = height // s, width // s
        slack = min(3, low_h // 8, low_w // 8)
        if low_h - slack <= h <= -(-height // s) and low_w - slack <= w <= -(-width // s) and slack:
            return s
    return None


def token_grid(tokens: int, input_size: Tuple[int, int], max_prefix: int = MAX_PREFIX_TOKENS
               ) -> Optional[Tuple[int, int, int, int]]:
    """``(prefix, h, w, patch)`` with ``tokens − prefix = h·w`` a patch grid of the input (the
    smallest such prefix), e.g. 197 tokens at 224×224 → ``(1, 14, 14, 16)``; ``None`` if none fits."""
    height, width = input_size
    for prefix in range(0, min(max_prefix, tokens - 1) + 1):
        n = tokens - prefix
        approx = (height * width / n) ** 0.5
        for s in dict.fromkeys((int(approx), int(approx) + 1, round(approx))):
            if s < 1:
                continue
            for h in dict.fromkeys((height // s, -(-height // s))):
                for w in dict.fromkeys((width // s, -(-width // s))):
                    if h * w == n:
                        return prefix, h, w, s
    return None


def infer_layout(shape: Optional[Tuple[int, ...]], input_size: Tuple[int, int]):
    """``(layout, map_shape (C, h, w), prefix, stride)`` of an output shape without the batch
    dimension. 3-D: ``"nchw"`` if ``(shape[1], shape[2])`` is a grid of the input, else ``"nhwc"``
    if ``(shape[0], shape[1])`` is (both or neither: ``"nchw"``, stride ``None`` when neither);
    2-D ``(T, D)``: ``"tokens"`` if :func:`token_grid` finds a prefix and patch grid; else no map."""
    if shape is None:
        return None, None, 0, None
    if len(shape) == 3:
        stride = grid_stride(shape[1], shape[2], input_size)
        if stride is None:
            channels_last = grid_stride(shape[0], shape[1], input_size)
            if channels_last is not None:
                return "nhwc", (shape[2], shape[0], shape[1]), 0, channels_last
        return "nchw", tuple(shape), 0, stride
    if len(shape) == 2:
        grid = token_grid(shape[0], input_size)
        if grid is not None:
            prefix, h, w, patch = grid
            return "tokens", (shape[1], h, w), prefix, patch
    return None, None, 0, None


@dataclass(frozen=True)
class LayerInfo:
    """What the probe forward saw of one module (``output_shape`` without the batch dimension)."""

    name: str
    type_name: str
    output_shape: Optional[Tuple[int, ...]]  # without the batch dimension; None if not a tensor
    calls: int
    entered: int  # position in the order modules were entered (first call)
    exited: int  # position in the order modules were left (last call)
    layout: Optional[str] = None  # "nchw", "nhwc", "tokens" or None (no map)
    map_shape: Optional[Tuple[int, int, int]] = None  # (C, h, w) after conversion
    prefix: int = 0  # tokens before the patch grid (layout "tokens")
    stride: Optional[int] = None  # input size / map size; None if the map is no grid of the input

    @property
    def depth(self) -> int:
        return 0 if not self.name else self.name.count(".") + 1

    @property
    def is_feature_map(self) -> bool:
        """A map ``(C, h, w)`` (after layout conversion) with some spatial extent; a ``(C, 1, 1)``
        output (global pooling, a squeeze-excite bottleneck) has no map to show."""
        shape = self.map_shape
        if shape is None and self.layout is None and self.output_shape is not None and len(self.output_shape) == 3:
            shape = self.output_shape  # built without a layout: a 3-D output reads as NCHW
        return shape is not None and shape[1] * shape[2] > 1

    @property
    def resolution(self) -> Optional[Tuple[int, int]]:
        """``(h, w)`` of a feature map that is a grid of the input, else ``None``."""
        return self.map_shape[1:] if self.is_feature_map and self.stride is not None else None


class LayerRow(NamedTuple):
    """One row of :meth:`LayerCatalog.table` (the ``camserve layers`` listing)."""

    name: str
    type: str
    layout: str
    shape: Tuple[int, int, int]  # (C, h, w) after layout conversion
    stride: Optional[int]
    stage: str  # "stageK" or ""


@dataclass(frozen=True)
class LayerCatalog:
    """Module paths of ``model`` with output shapes and execution order, for one input size.

    ``containers``: paths of the model's ``nn.Sequential``/``ModuleList``/``ModuleDict`` modules
    (including ones never called); ``output_shape``: the model's output without the batch
    dimension; ``stage_names``: stages given by a profile, used instead of the discovered ones.
    """

    input_size: Tuple[int, int]
    layers: Dict[str, LayerInfo] = field(default_factory=dict)
    containers: FrozenSet[str] = frozenset()
    output_shape: Optional[Tuple[int, ...]] = None
    stage_names: Optional[Tuple[str, ...]] = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def trace(cls, model: nn.Module, input_size: Tuple[int, int] = (224, 224)) -> "LayerCatalog":
        """Run one no-grad probe forward on zeros of ``(1, 3, H, W)`` and record every module."""
        input_size = tuple(input_size)
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

        output = probe_forward(model, input_size, register)
        layers = {}
        for name, rec in seen.items():
            layout, map_shape, prefix, stride = infer_layout(rec["shape"], input_size)
            if _PADDING.search(type(modules[name]).__name__):
                stride = None  # a padded map: the conv reading it has the stride
            layers[name] = LayerInfo(name, type(modules[name]).__name__, rec["shape"], rec["calls"],
                                     rec["entered"], rec["exited"], layout, map_shape, prefix, stride)
        containers = frozenset(n for n, m in modules.items() if n and isinstance(m, _CONTAINERS))
        out_shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        return cls(input_size, layers, containers, out_shape)

    def with_stages(self, stages: Optional[Sequence[str]]) -> "LayerCatalog":
        """This catalog with ``stages`` (module paths or aliases, shallow → deep, e.g. a hand-written
        profile's) in place of the discovered ones; each must be a feature map."""
        if not stages:
            return self
        resolved = tuple(self.resolve(s) for s in stages)
        for name in resolved:
            self.feature_map(name)
        return LayerCatalog(self.input_size, self.layers, self.containers, self.output_shape, resolved)

    # -- lookup ---------------------------------------------------------------------------------
    def names(self) -> List[str]:
        """All module paths that ran in the probe forward, in the order they were entered."""
        return sorted(self.layers, key=lambda n: self.layers[n].entered)

    def feature_map_layers(self) -> List[str]:
        """Module paths whose output is a feature map (any layout), in execution order."""
        return [n for n in self.names() if self.layers[n].is_feature_map]

    def get(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` of module path ``name``; :class:`UnknownLayerError` listing near
        names and the stages (aliases and paths) if absent."""
        info = self.layers.get(name)
        if info is None:
            near = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.5)
            if not near:
                near = [n for n in self.feature_map_layers() if n.split(".")[0] == name.split(".")[0]][:5]
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise UnknownLayerError(f"unknown layer {name!r}{hint}{self._stage_hint()}")
        return info

    def resolve(self, name: str) -> str:
        """The module path for ``name``: a module path (which wins over an alias), or a stage alias
        ``stageK`` (1-based, shallow → deep); else :class:`UnknownLayerError`."""
        name = str(name).strip()
        if name in self.layers:
            return name
        match = _STAGE_ALIAS.match(name)
        if match:
            stages = self.stages()
            k = int(match.group(1))
            if 1 <= k <= len(stages):
                return stages[k - 1]
            raise UnknownLayerError(f"unknown layer {name!r}: the model has {len(stages)} stages"
                                    f"{self._stage_hint()}")
        self.get(name)  # raises with the hints
        return name

    def _stage_hint(self) -> str:
        try:
            stages = self.stages()
        except Exception:  # noqa: BLE001 - a hint must never hide the error it decorates
            return ""
        if not stages:
            return ""
        listed = ", ".join(f"stage{i + 1} = {n!r}" for i, n in enumerate(stages))
        return f"; stages (alias = module path): {listed}"

    def feature_map(self, name: str) -> LayerInfo:
        """Like :meth:`get`, but also requires the output to be a feature map (any layout)."""
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

    # -- layouts ----------------------------------------------------------------------------------
    def as_map(self, name: str, tensor: torch.Tensor, input_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Layer ``name``'s output ``(N, …)`` as ``(N, C, h, w)``: NCHW unchanged (the same tensor),
        NHWC permuted, tokens without the prefix reshaped to the patch grid. A linear selection:
        the gradient w.r.t. the output, converted the same way, is the gradient w.r.t. the map.
        ``input_size`` (default: the traced one) fixes the grid when the token count differs."""
        info = self.layers[name]
        if info.layout == "nhwc":
            return tensor.permute(0, 3, 1, 2)
        if info.layout == "tokens":
            channels, h, w = info.map_shape
            prefix = info.prefix
            if tensor.shape[1] != info.output_shape[0]:
                grid = token_grid(tensor.shape[1], tuple(input_size or self.input_size))
                if grid is None:
                    raise InvalidInputError(f"layer {name!r}: {tensor.shape[1]} tokens form no patch grid of "
                                            f"input {tuple(input_size or self.input_size)}")
                prefix, h, w, _ = grid
            return tensor[:, prefix:].reshape(tensor.shape[0], h, w, tensor.shape[-1]).permute(0, 3, 1, 2)
        return tensor

    def is_tokens(self, name: str) -> bool:
        """Whether layer ``name`` outputs a token sequence."""
        return self.layers[name].layout == "tokens"

    def attention_above(self, name: str) -> Optional[str]:
        """The first attention module (a type named ``*Attention*``) that runs after ``name`` is
        left — one a backward pass from the logits to ``name`` crosses; ``None`` if there is none."""
        base = self.get(name)
        for n in self.names():
            info = self.layers[n]
            if info.exited > base.exited and "attention" in info.type_name.lower():
                return n
        return None

    def stride(self, name: str) -> Optional[int]:
        """Input size / map size of feature-map layer ``name`` (``None`` if no grid of the input)."""
        return self.feature_map(name).stride

    # -- stages -------------------------------------------------------------------------------------
    def _children(self) -> Dict[str, List[str]]:
        """Module path → the recorded modules whose nearest recorded ancestor it is (execution order)."""
        kids: Dict[str, List[str]] = {}
        for name in self.names():
            parent = name
            while parent:
                parent = parent.rpartition(".")[0]
                if not parent or parent in self.layers:
                    break
            kids.setdefault(parent, []).append(name)
        return kids

    def _spans(self) -> Dict[str, set]:
        """Module path → the strides of the grid maps in its subtree (itself included)."""
        spans: Dict[str, set] = {}
        for name, info in self.layers.items():
            if info.resolution is None or info.calls != 1 or _PADDING.search(info.type_name):
                continue
            parts = name.split(".")
            for i in range(len(parts) + 1):
                spans.setdefault(".".join(parts[:i]), set()).add(info.stride)
        return spans

    def _units(self) -> List[str]:
        """The model cut into units, each at one resolution (stride), in execution order: a module
        whose subtree stays at one stride is a unit; one spanning two (a strided block, a small
        downsampling ``Sequential`` continuing the current stride) is a unit at its output's;
        a container spanning more (``features``, ``stages``, a wrapped backbone) is cut into its
        children. Modules called more than once are left out."""
        cached = self._cache.get("units")
        if cached is not None:
            return cached
        kids, spans, units = self._children(), self._spans(), []

        def walk(parent: str) -> None:
            for child in kids.get(parent, []):
                info = self.layers[child]
                span = spans.get(child)
                if info.calls != 1 or not span:
                    continue
                expand = info.resolution is None or len(span) >= 3 or (
                    len(span) == 2 and child in self.containers
                    and not (units and self.layers[units[-1]].stride in span))
                if expand:
                    walk(child)
                else:
                    units.append(child)

        walk("")
        self._cache["units"] = units
        return units

    @staticmethod
    def _may_name_a_stage(info: LayerInfo) -> bool:
        return (info.calls == 1 and info.resolution is not None and not _PASS_THROUGH.match(info.type_name)
                and not _NORM.match(info.type_name) and not _PADDING.search(info.type_name)
                and "Adaptive" not in info.type_name)

    def _token_blocks(self) -> List[str]:
        """The transformer blocks: token-layout modules called once, not containers, whose parent is
        a container and no ancestor of which is one too; the largest such family of siblings."""
        candidates = [n for n in self.names() if self.layers[n].layout == "tokens" and self.layers[n].calls == 1
                      and n not in self.containers and n.rpartition(".")[0] in self.containers]
        chosen = set(candidates)
        outer = [n for n in candidates
                 if not any(".".join(n.split(".")[:i]) in chosen for i in range(1, n.count(".") + 1))]
        families: Dict[str, List[str]] = {}
        for n in outer:
            families.setdefault(n.rpartition(".")[0], []).append(n)
        if not families:
            return []
        return max(families.values(), key=len)

    def discovered_stages(self) -> List[str]:
        """Stages found by the probe, shallow → deep: for a token model (ViT) its transformer blocks;
        else the last unit of each run of one resolution, i.e. stride (see :meth:`_units`), that can name it —
        called once, a grid map, not a pass-through (identity, dropout, permute, flatten), a norm
        (an affine of the map before it) or an adaptive pool."""
        cached = self._cache.get("stages")
        if cached is not None:
            return list(cached)
        stages = self._token_blocks()
        if not stages:
            runs: List[List[str]] = []
            for unit in self._units():
                stride = self.layers[unit].stride
                if runs and self.layers[runs[-1][-1]].stride == stride:
                    runs[-1].append(unit)
                else:
                    runs.append([unit])
            for run in runs:
                named = [u for u in run if self._may_name_a_stage(self.layers[u])]
                if named:
                    stages.append(named[-1])
        self._cache["stages"] = tuple(stages)
        return list(stages)

    def stages(self) -> List[str]:
        """The stages ``stage1`` … ``stageN`` name (shallow → deep): a profile's, else discovered."""
        return list(self.stage_names) if self.stage_names else self.discovered_stages()

    def default_layer(self) -> Optional[str]:
        """The default CAM layer. CNNs: the last map before pooling (the last unit that could name a
        stage and is no pooling module). Token models: the first norm of the last block (timm
        ``blocks[-1].norm1``, torchvision ``encoder_layer_11.ln_1``; pytorch-grad-cam's choice) —
        not the block's output, whose patch tokens get no gradient from a class-token head —
        else the block before the last. ``None`` if the model has no feature map."""
        blocks = self._token_blocks()
        if blocks:
            last = blocks[-1]
            for n in self.names():
                info = self.layers[n]
                if n.startswith(last + ".") and _NORM.match(info.type_name) and info.layout == "tokens":
                    return n
            return blocks[-2] if len(blocks) > 1 else last
        for unit in reversed(self._units()):
            info = self.layers[unit]
            if self._may_name_a_stage(info) and "Pool" not in info.type_name:
                return unit
        maps = self.feature_map_layers()
        return maps[-1] if maps else None

    # -- listing -------------------------------------------------------------------------------------
    def table(self, include_ungridded: bool = False) -> List[LayerRow]:
        """One :class:`LayerRow` per feature-map module in execution order: path, type, layout,
        ``(C, h, w)`` after conversion, stride and stage alias (``""`` if not a stage). Maps that are
        no grid of the input (a padding's output, attention heads) only with ``include_ungridded``."""
        aliases = {name: f"stage{i + 1}" for i, name in enumerate(self.stages())}
        rows = []
        for name in self.feature_map_layers():
            info = self.layers[name]
            if info.stride is None and not include_ungridded:
                continue
            shape = info.map_shape or info.output_shape
            rows.append(LayerRow(name, info.type_name, info.layout or "nchw", tuple(shape), info.stride,
                                 aliases.get(name, "")))
        return rows

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


def format_table(rows: Sequence[LayerRow]) -> str:
    """Rows of :meth:`LayerCatalog.table` as an aligned text table (shape ``C×h×w``, stride ``-`` if none)."""
    header = ("layer", "type", "layout", "shape (C×h×w)", "stride", "stage")
    body = [(r[0], r[1], r[2], "×".join(str(d) for d in r[3]), "-" if r[4] is None else str(r[4]), r[5] or "")
            for r in rows]
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header] + body]
    return "\n".join(lines)


def _container_names() -> Tuple[str, ...]:
    return tuple(c.__name__ for c in _CONTAINERS)
