"""The model's forward compiled by OpenVINO, with the last feature map as a second output.

OpenVINO (the ``fast`` extra) converts the PyTorch module in memory (its PyTorch frontend traces it;
nothing is read from or written to disk, nothing pickled is loaded, no telemetry is sent) and compiles it for the CPU
with a dynamic batch dimension. The converted module returns ``(logits, A)``: a forward hook on the
layer hands its output out during the trace and is removed before the call returns.

Inference runs in float32 unless ``precision="bfloat16"`` (OpenVINO otherwise silently picks bf16 on
CPUs that support it), on the worker's torch thread count. A call takes an infer request for itself
from a pool (or creates one) and returns it afterwards, so concurrent requests never share one.
"""

from __future__ import annotations

import importlib.util
import queue
import warnings
from typing import Tuple

import torch
from torch import nn

PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}


def openvino_available() -> bool:
    """Whether the ``fast`` extra (OpenVINO) is installed."""
    return importlib.util.find_spec("openvino") is not None


class _WithFeatures(nn.Module):
    """``model`` returning ``(output, output of layer)`` (the hook lives for one call)."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, images: torch.Tensor):
        seen = []
        handle = self.layer.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            output = self.model(images)
        finally:
            handle.remove()
        return output, seen[-1]


def convert(module: nn.Module, input_size: Tuple[int, int]):
    """``module`` as an OpenVINO model with a dynamic batch, through OpenVINO's PyTorch frontend
    directly (``openvino.convert_model`` would also send usage telemetry to Intel from the worker)."""
    from openvino import PartialShape
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
        decoder = TorchScriptPythonDecoder(module, example_input=(torch.zeros(1, 3, *input_size),))
    frontend = FrontEndManager().load_by_framework("pytorch")
    graph = frontend.load(decoder)
    graph.set_partial_shape(graph.get_inputs()[0], PartialShape([-1, 3, *input_size]))
    return frontend.convert(graph)


class OpenVinoForward:
    """A module's forward on OpenVINO's CPU plugin, built once per worker: ``forward(images)`` returns
    its outputs (a tuple, in the module's order) as float32 CPU tensors. :meth:`with_features` builds
    the classifier's ``(logits, A)``."""

    def __init__(self, module: nn.Module, input_size: Tuple[int, int], threads: int, precision: str = "float32"):
        import openvino as ov  # the fast extra; callers check openvino_available() first

        self.precision = precision
        self.version = ov.__version__.split("-")[0]
        config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
        core = ov.Core()
        self.compiled = core.compile_model(convert(module.eval(), input_size), "CPU", config)
        # a single image (a lone request) runs a static-shape compilation: about 6 % faster than the
        # dynamic one on EfficientNet-Lite0 here
        single = convert(module.eval(), input_size)
        single.reshape({0: ov.PartialShape([1, 3, *input_size])})
        self.compiled_single = core.compile_model(single, "CPU", config)
        # infer requests are reused (a fresh one costs about 1 ms); each call takes one for itself
        self._idle = {id(self.compiled): queue.SimpleQueue(), id(self.compiled_single): queue.SimpleQueue()}

    @classmethod
    def with_features(cls, model: nn.Module, layer: str, input_size: Tuple[int, int], threads: int,
                      precision: str = "float32") -> "OpenVinoForward":
        """``model``'s output and the output of its module ``layer``."""
        return cls(_WithFeatures(model, dict(model.named_modules())[layer]), input_size, threads, precision)

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The outputs for ``images`` (copies: they outlive the call's use of its infer request)."""
        compiled = self.compiled_single if images.shape[0] == 1 else self.compiled
        idle = self._idle[id(compiled)]
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            array = images.detach().to("cpu", torch.float32).contiguous().numpy()
            outputs = request.infer({0: array})
            return tuple(torch.from_numpy(outputs[port]) for port in compiled.outputs)
        finally:
            idle.put(request)
