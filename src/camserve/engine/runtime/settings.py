"""The archive's ``handler.runtime`` section: how a worker runs its forward.

``memory_format``: ``auto`` (a timing probe at load picks the faster of contiguous and channels-last,
:mod:`~camserve.engine.runtime.memory_format`), ``channels_last`` or ``contiguous``.
``fast_path``: ``auto`` (OpenVINO when the ``fast`` extra is installed and the worker runs on a CPU),
``openvino`` (required: a worker that cannot build it does not load) or ``off``.
``precision``: ``float32`` (default) or ``bfloat16``: the fast path's inference precision (OpenVINO's
``INFERENCE_PRECISION_HINT``); the eager engine always runs in the model's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

#: the environment variable an operator overrides ``handler.runtime`` with (doors read it, not the engine)
RUNTIME_ENV = "CAMSERVE_RUNTIME"

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
FAST_PATHS = ("auto", "openvino", "off")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class RuntimeSettings:
    """How the forward runs (see the module docstring); the defaults are what an archive without a
    ``handler.runtime`` section gets."""

    memory_format: str = "auto"
    fast_path: str = "auto"
    precision: str = "float32"

    @classmethod
    def from_mapping(cls, section: Optional[Mapping[str, Any]]) -> "RuntimeSettings":
        """Checked settings from ``model-config.yaml``'s ``handler.runtime``; an unknown key or value
        is a ``ValueError`` naming it (a configuration error: the worker does not load)."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"handler.runtime: unknown key(s) {unknown}; known: {sorted(known)}")
        for key, allowed in (("memory_format", MEMORY_FORMATS), ("fast_path", FAST_PATHS),
                             ("precision", PRECISIONS)):
            if key in section and section[key] not in allowed:
                raise ValueError(f"handler.runtime.{key} must be one of {list(allowed)}, got {section[key]!r}")
        return cls(**section)

    def overridden(self, text: str, what: str = "override") -> "RuntimeSettings":
        """These settings with the ``key=value`` pairs of ``text`` (comma-separated; e.g. an operator's
        ``$CAMSERVE_RUNTIME``) in their place, checked like the archive's section."""
        section = {f.name: getattr(self, f.name) for f in fields(self)}
        for pair in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{what}: expected key=value pairs separated by commas, got {pair!r}")
            section[key.strip()] = value.strip()
        return RuntimeSettings.from_mapping(section)
