"""The ordinary gradient of a captured segment from its input and output alone.

A *segment* (see :mod:`camserve.engine.classifier.capture`) is a ruled module followed by the element-wise
modules absorbed into its switch, e.g. ``conv → BatchNorm → ReLU6``. Autograd would keep, for a
gradient pass, the conv's (padded) input, the BatchNorm's input and the activation's input. When
every part of the segment has a derivative that needs nothing beyond the segment's input ``x``
(for its shape) and output ``y``, the capture drops the segment's graph and the switch computes

* activation as the segment's last module, from its output ``y``:
  ReLU ``g ⊙ [y > 0]``; Hardtanh / ReLU6 ``g ⊙ [lo < y < hi]`` — autograd's own backward kernels,
  given ``y`` where autograd gives ``x``: ``x > 0 ⇔ y > 0`` and ``lo < x < hi ⇔ lo < y < hi``;
* BatchNorm in eval mode (running statistics): ``g ⊙ γ / √(σ² + ε)`` per channel, no tensor;
* convolution (2-D, zero padding): ``Wᵀ g``, the transposed convolution with the module's stride,
  dilation and groups, and its padding — the module's own, or that of a ``ZeroPad2d`` child
  applied first (TF-style "same" convs). The geometry is read from the module and *verified*
  once per model on a probe input (:func:`trace_conv_geometries`); a conv whose output the
  geometry does not reproduce keeps its autograd graph.

Peak memory of a gradient pass at a shallow layer then drops to what relevance passes keep (one
input and one output per segment) and the backward does one element-wise product per segment
instead of BatchNorm's and the activation's backward kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import probe_forward

#: ``(g, y) → g_x`` for an element-wise module; ``y`` is ignored by constant derivatives
Derivative = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class ConvGeometry:
    """How a conv module maps ``x`` to ``y``: ``conv2d(pad(x, pads), W, b, stride, padding,
    dilation, groups)`` with ``pads = (left, right, top, bottom)`` from a padding child. Used for the
    lean gradient and, in relevance passes, to evaluate the module with modified weights (z⁺)."""

    pads: Tuple[int, int, int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    def _split(self) -> Tuple[Tuple[int, int, int, int], Tuple[int, int]]:
        """``pads`` split into an asymmetric rest and the conv padding that absorbs the symmetric part."""
        left, right, top, bottom = self.pads
        sym_h, sym_w = min(top, bottom), min(left, right)
        rest = (left - sym_w, right - sym_w, top - sym_h, bottom - sym_h)
        return rest, (self.padding[0] + sym_h, self.padding[1] + sym_w)

    def call(self, module: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` with ``params`` (``weight``/``bias``) substituted, from the geometry: no
        hook, no module state, and no padded copy of ``x`` where the padding is symmetric."""
        rest, padding = self._split()
        if any(rest):
            x = F.pad(x, rest)
        return F.conv2d(x, params.get("weight", module.weight), params.get("bias", module.bias), self.stride,
                        padding, self.dilation, self.groups)

    def input_grad(self, module: nn.Module, x_shape: torch.Size, grad: torch.Tensor) -> torch.Tensor:
        """``g_x = Wᵀ g``: the transposed convolution (with the symmetric padding folded in as in
        :meth:`call`; only an asymmetric rest — TF "same" at stride 2 — is cropped)."""
        (left, right, top, bottom), padding = self._split()
        n, c, h, w = x_shape
        padded = (n, c, h + top + bottom, w + left + right)
        grad_x = torch.nn.grad.conv2d_input(padded, module.weight.detach(), grad, self.stride, padding,
                                            self.dilation, self.groups)
        return grad_x[:, :, top:top + h, left:left + w] if (left or right or top or bottom) else grad_x


def _candidates(module: nn.Conv2d):
    base = dict(stride=tuple(module.stride), padding=tuple(module.padding), dilation=tuple(module.dilation),
                groups=module.groups)
    yield ConvGeometry(pads=(0, 0, 0, 0), **base)
    pads = [child.padding for child in module.children() if isinstance(child, nn.ZeroPad2d)]
    if len(pads) == 1:
        yield ConvGeometry(pads=tuple(int(p) for p in pads[0]), **base)


def _supported_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def trace_conv_geometries(model: nn.Module, input_size: Tuple[int, int],
                          overwritten: Optional[Set[str]] = None) -> Tuple[Dict[str, ConvGeometry], torch.Tensor]:
    """``{name: geometry}`` for every 2-D conv whose output one probe forward reproduces, and the
    model's output for that probe (the caller needs no other forward to learn, e.g., the class count).

    The probe is a seeded random image (:func:`camserve.engine.layers.probe_forward`); each conv's
    recorded input is fed to the candidate geometries (the module's own padding, then a
    ``ZeroPad2d`` child's first) and the first that matches the recorded output within float
    tolerance is kept.

    ``overwritten`` (a set, filled in): the same probe also names every module whose output a later
    in-place op changes (torchvision's ``out += identity`` on ``bn2``'s output) — a switch there
    hands on a copy so that the backward need not recompute the segment (see capture.py)."""
    modules = {name: m for name, m in model.named_modules() if _supported_conv(m)}
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    outputs: list = []  # (name, output, its version when the module returned)

    def register(handles):
        for name, module in modules.items():
            def hook(mod, args, output, name=name):
                if name not in seen and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                    seen[name] = (args[0], output)
            handles.append(module.register_forward_hook(hook))
        if overwritten is not None:
            for name, module in model.named_modules():
                def record(mod, args, output, name=name):
                    if isinstance(output, torch.Tensor):
                        outputs.append((name, output, output._version))
                handles.append(module.register_forward_hook(record))

    output = probe_forward(model, input_size, register, seed=0)
    if overwritten is not None:
        overwritten.update(name for name, tensor, version in outputs if tensor._version != version)
    geometries = {}
    with torch.no_grad():
        for name, (x, y) in seen.items():
            for geometry in _candidates(modules[name]):
                try:
                    rebuilt = geometry.call(modules[name], {}, x)
                except RuntimeError:  # e.g. a kernel larger than the unpadded input
                    continue
                scale = y.abs().max().clamp_min(1e-12)
                if rebuilt.shape == y.shape and bool(((rebuilt - y).abs().max() / scale) < 1e-4):
                    geometries[name] = geometry
                    break
    return geometries, output


def elementwise_derivative(module: nn.Module) -> Tuple[Optional[Derivative], bool]:
    """``(derivative, needs_output)`` for the element-wise modules this file knows, else ``(None, _)``.

    ``needs_output``: the derivative reads the module's own output (activations), so the module
    must be the segment's last; BatchNorm's is a constant per channel."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_var is None:
            return None, False
        # the CPU kernel's order and precision (1/√ in double, then ⊙ 1/σ, then ⊙ γ): bit-identical
        # gradients keep ill-conditioned maps (Grad-CAM++'s α) equal to autograd-based tools'
        var = module.running_var.detach()
        invstd = (1 / torch.sqrt(var.double() + module.eps)).to(var.dtype)
        weight = module.weight.detach() if module.weight is not None else None

        def batchnorm(grad, _y, invstd=invstd, weight=weight):
            shape = (1, -1) + (1,) * (grad.dim() - 2)
            grad = grad * invstd.view(shape)
            return grad.mul_(weight.view(shape)) if weight is not None else grad
        return batchnorm, False
    if isinstance(module, nn.Hardtanh):  # ReLU6 too; autograd's own kernel, fed y instead of x
        low, high = float(module.min_val), float(module.max_val)
        return (lambda grad, y: torch.ops.aten.hardtanh_backward(grad, y, low, high)), True
    if isinstance(module, nn.ReLU):
        return (lambda grad, y: torch.ops.aten.threshold_backward(grad, y, 0.0)), True
    return None, False


class SegmentGradient:
    """``g_x`` of a segment ``[head, tail_1, …, tail_k]`` from ``x``'s shape and the output ``y``:
    the tails' derivatives in reverse order, then the head's (a verified conv geometry or an
    element-wise derivative). Built per forward call, read-only afterwards."""

    __slots__ = ("conv", "derivatives", "reads_output")

    def __init__(self, conv: Optional[ConvGeometry], derivatives: Sequence[Derivative], reads_output: bool):
        #: whether :meth:`__call__` reads ``y`` (the last module is an activation): nothing may follow
        self.conv, self.derivatives, self.reads_output = conv, tuple(derivatives), reads_output

    @classmethod
    def start(cls, module: nn.Module, geometry: Optional[ConvGeometry]) -> Optional["SegmentGradient"]:
        """The plan for a segment made of ``module`` alone, or ``None`` if it needs autograd."""
        if geometry is not None:
            return cls(geometry, (), False)
        derivative, needs_output = elementwise_derivative(module)
        return None if derivative is None else cls(None, (derivative,), needs_output)

    def extend(self, module: nn.Module) -> Optional["SegmentGradient"]:
        """The plan once ``module`` is absorbed; ``None`` when the segment then needs autograd
        (an unknown module, or anything after an activation, whose mask needs its own output)."""
        if self.reads_output:
            return None
        derivative, needs_output = elementwise_derivative(module)
        if derivative is None:
            return None
        return SegmentGradient(self.conv, self.derivatives + (derivative,), needs_output)

    def __call__(self, head: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``g_x = J_segmentᵀ g``."""
        for derivative in reversed(self.derivatives):
            grad = derivative(grad, y)  # only the last one reads y: the others are constants
        if self.conv is not None:
            grad = self.conv.input_grad(head, x.shape, grad)
        return grad
