"""The ordinary gradient of a captured segment from its input and output alone.

A *segment* (see :mod:`camserve.engine.capture`) is a ruled module followed by the element-wise
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
  geometry does not reproduce keeps its autograd graph;
* 2-D max pooling: autograd's own backward kernel and the forward's argmax indices, kept in the
  narrowest integer type that holds them (:func:`compact_pool_indices`: int16 after ResNet's stem,
  a quarter of autograd's int64) — ``x``'s values are read too.

Only the conv needs ``x``'s shape alone; the max pool needs ``x``'s values. A segment ending in an
activation reads only where its derivative is zero: when no relevance pass will read ``y``'s
values, the capture keeps that as a boolean mask (:meth:`SegmentGradient.mask`, a byte per element
instead of four) rather than ``y``.

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

from camserve.engine.core.layers import probe_forward

#: ``(g, y) → g_x`` for an element-wise module; ``y`` is ignored by constant derivatives, and an
#: activation's derivative also accepts, instead of ``y``, its :data:`Mask` (a ``bool`` tensor)
Derivative = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
#: ``y → mask``: where an activation's derivative is one (``True``; zero elsewhere), from its output
Mask = Callable[[torch.Tensor], torch.Tensor]


def max_pool_input_grad(module: nn.MaxPool2d, x: torch.Tensor, grad: torch.Tensor,
                        indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g_x`` of a 2-D max pool: autograd's kernel (``max_pool2d_with_indices_backward``) with
    the forward's argmax ``indices`` (any integer dtype, see :func:`compact_pool_indices`), or
    with indices recomputed from ``x`` when none were kept — the same indices either way, so the
    same gradient bit for bit."""
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride) if module.stride is not None else kernel
    padding, dilation = _pair(module.padding), _pair(module.dilation)
    with torch.no_grad():
        if indices is None:
            _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, module.ceil_mode)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, padding, dilation,
                                                               module.ceil_mode, indices.long())


def compact_pool_indices(output: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The argmax indices autograd saved for a 2-D max pool's ``output`` (flat positions in an
    input plane, int64) in the narrowest integer type that holds them — int16 up to 32,767
    positions per plane (ResNet's 112×112 stem: a quarter of the bytes) —, or ``None`` when the
    output's node is not the indices kernel's (the backward then finds them again from ``x``)."""
    node = output.grad_fn
    if node is None or type(node).__name__ != "MaxPool2DWithIndicesBackward0":
        return None
    indices = getattr(node, "_saved_result1", None)
    if not isinstance(indices, torch.Tensor):
        return None
    plane = x.shape[-1] * x.shape[-2]
    dtype = torch.int16 if plane <= 2 ** 15 - 1 else torch.int32 if plane <= 2 ** 31 - 1 else torch.int64
    return indices.to(dtype)


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def supported_max_pool(module: nn.Module) -> bool:
    """A 2-D max pool whose gradient :func:`max_pool_input_grad` computes (4-D input, one output)."""
    return type(module) is nn.MaxPool2d and not module.return_indices


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

    The probe is a seeded random image (:func:`camserve.engine.core.layers.probe_forward`); each conv's
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


def _masked(grad: torch.Tensor, passing: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``passing``, ``+0`` elsewhere — what ``threshold_backward`` /
    ``hardtanh_backward`` write —, by ``threshold_backward`` itself on the mask as 0/1 floats
    (a CPU ``masked_fill`` / ``where`` on a bool mask is ~20× slower than this pair)."""
    return torch.ops.aten.threshold_backward(grad, passing.view(torch.uint8).to(grad.dtype), 0.5)


def activation_mask(module: nn.Module) -> Optional[Mask]:
    """``y → [derivative is 1]`` for the activations :func:`elementwise_derivative` knows: the
    kernels' own conditions (ReLU: not ``y <= 0``; Hardtanh: ``lo < y < hi``), so a NaN behaves
    as there."""
    if isinstance(module, nn.Hardtanh):
        low, high = float(module.min_val), float(module.max_val)
        return lambda y: y.gt(low).logical_and_(y.lt(high))
    if isinstance(module, nn.ReLU):
        return lambda y: y.le(0.0).logical_not_()
    return None


def elementwise_derivative(module: nn.Module) -> Tuple[Optional[Derivative], bool]:
    """``(derivative, needs_output)`` for the element-wise modules this file knows, else ``(None, _)``.

    ``needs_output``: the derivative reads the module's own output (activations), so the module
    must be the segment's last; BatchNorm's is a constant per channel. An activation's derivative
    is given either ``y`` or its :func:`activation_mask`."""
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
        return (lambda grad, y: _masked(grad, y) if y.dtype == torch.bool else
                torch.ops.aten.hardtanh_backward(grad, y, low, high)), True
    if isinstance(module, nn.ReLU):
        return (lambda grad, y: _masked(grad, y) if y.dtype == torch.bool else
                torch.ops.aten.threshold_backward(grad, y, 0.0)), True
    return None, False


class SegmentGradient:
    """``g_x`` of a segment ``[head, tail_1, …, tail_k]`` from ``x`` and the output ``y``: the
    tails' derivatives in reverse order, then the head's (a verified conv geometry — ``x``'s shape
    only —, a 2-D max pool — ``x``'s values —, or an element-wise derivative). Built per forward
    call, read-only afterwards."""

    __slots__ = ("conv", "derivatives", "reads_output", "pool", "mask")

    def __init__(self, conv: Optional[ConvGeometry], derivatives: Sequence[Derivative], reads_output: bool,
                 pool: bool = False, mask: Optional[Mask] = None):
        #: whether :meth:`__call__` reads ``y`` (the last module is an activation): nothing may follow
        self.conv, self.derivatives, self.reads_output = conv, tuple(derivatives), reads_output
        #: the head is a max pool (:func:`max_pool_input_grad`): :meth:`__call__` reads ``x``'s values
        self.pool = pool
        #: ``y → mask`` of the last module when :attr:`reads_output`: :meth:`__call__` accepts it for ``y``
        self.mask = mask

    @property
    def reads_input(self) -> bool:
        """Whether :meth:`__call__` reads ``x``'s values (else its shape only)."""
        return self.pool

    @classmethod
    def start(cls, module: nn.Module, geometry: Optional[ConvGeometry]) -> Optional["SegmentGradient"]:
        """The plan for a segment made of ``module`` alone, or ``None`` if it needs autograd."""
        if geometry is not None:
            return cls(geometry, (), False)
        if supported_max_pool(module):
            return cls(None, (), False, pool=True)
        derivative, needs_output = elementwise_derivative(module)
        if derivative is None:
            return None
        return cls(None, (derivative,), needs_output, mask=activation_mask(module) if needs_output else None)

    def extend(self, module: nn.Module) -> Optional["SegmentGradient"]:
        """The plan once ``module`` is absorbed; ``None`` when the segment then needs autograd
        (an unknown module, or anything after an activation, whose mask needs its own output)."""
        if self.reads_output:
            return None
        derivative, needs_output = elementwise_derivative(module)
        if derivative is None:
            return None
        return SegmentGradient(self.conv, self.derivatives + (derivative,), needs_output, self.pool,
                               activation_mask(module) if needs_output else None)

    def __call__(self, head: nn.Module, x, y: Optional[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """``g_x = J_segmentᵀ g``; ``x`` is the input (or, unless :attr:`reads_input`, its shape),
        ``y`` the output or its :attr:`mask` (or ``None`` unless :attr:`reads_output`); for a max
        pool, the forward's argmax indices (or ``None``: found again from ``x``)."""
        for derivative in reversed(self.derivatives):
            grad = derivative(grad, y)  # only the last one reads y: the others are constants
        if self.conv is not None:
            grad = self.conv.input_grad(head, x if isinstance(x, torch.Size) else x.shape, grad)
        elif self.pool:  # y: the forward's argmax indices (compact_pool_indices) or None
            grad = max_pool_input_grad(head, x, grad, y)
        return grad
