"""How the forward runs on this machine: memory format, reduced precision, and the gradient-free fast
path on an optimised runtime (OpenVINO) for the rows that need only the last feature map and the head.

Everything here is decided once, when a worker loads its model (measured probes, warm-up), and is
read-only afterwards; the request path never converts, compiles or measures anything.
"""

from camserve.engine.runtime.fast_path import EAGER, OPENVINO, FastPath, build_fast_path
from camserve.engine.runtime.memory_format import MemoryFormatChoice, choose_memory_format, format_of
from camserve.engine.runtime.settings import RUNTIME_ENV, RuntimeSettings
from camserve.engine.runtime.configure import configure_runtime

__all__ = ["EAGER", "OPENVINO", "RUNTIME_ENV", "FastPath", "MemoryFormatChoice", "RuntimeSettings", "build_fast_path",
           "choose_memory_format", "configure_runtime", "format_of"]
