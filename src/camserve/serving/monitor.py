"""Monitoring plain traffic: a sampled fraction of *plain* requests also gets a cheap map in the same
forward, and only its summary is recorded (audit log, ``kind: monitor``) — the client's answer is the
plain answer, byte for byte.

``model-config.yaml``::

    handler:
      audit_log: /var/log/camserve/audit.jsonl   # where the summaries go (required)
      monitor:
        fraction: 0.01        # of plain requests (default 0.01; 0 switches it off)
        method: cam           # default: cam when the model's head allows it (global pool + linear), else gradcam
        layer: _conv_head     # default: the method's layer in the archive (method_layers, default_layer)
        # the rolling drift score (ExplanationDrift gauge; camserve.ops.drift_monitor):
        reference: /var/lib/camserve/reference-audit.jsonl   # default: the first reference_size monitored maps
        reference_size: 200
        window: 200           # the latest monitored maps compared with the reference
        score_every: 50       # a new score every 50 monitored maps

Each plain image is drawn on its own (``os.urandom``: no state shared between requests), so over
``n`` plain images about ``fraction · n`` are monitored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from camserve.engine import ExplainSpec
from camserve.engine.errors import ExplanationInputError

CHEAPEST = ("cam", "gradcam")


@dataclass(frozen=True)
class MonitorSettings:
    """``fraction`` of plain images explained with ``method`` at ``layer`` for their summaries."""

    fraction: float
    method: str
    layer: str

    @classmethod
    def from_config(cls, settings: Any, explainer: Any, audit_on: bool) -> Optional["MonitorSettings"]:
        """The ``handler.monitor`` section of the handler ``settings``, checked against the explainer
        (the layer resolved to its module path); ``None`` when absent or ``fraction`` is 0. Monitoring
        needs the audit log (it is where the summaries go)."""
        section = settings.extra.get("monitor")
        if section is None:
            return None
        if not isinstance(section, Mapping):
            raise ValueError(f"handler.monitor must be a mapping (fraction, method, layer), got {section!r}")
        fraction = float(section.get("fraction", 0.01))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"handler.monitor.fraction must be in [0, 1], got {fraction}")
        if fraction == 0.0:
            return None
        if not audit_on:
            raise ValueError("handler.monitor records summaries in the audit log: set handler.audit_log "
                             "(or CAMSERVE_AUDIT_LOG) too")
        methods = [section["method"]] if section.get("method") else list(CHEAPEST)
        for method in methods:
            layer = settings.layer_for(str(method), section.get("layer"))
            try:
                layer = explainer.catalog.resolve(layer) if layer else explainer.default_layer
                explainer.validate(ExplainSpec(str(method), layer))
            except ExplanationInputError as error:
                if section.get("method"):
                    raise ValueError(f"handler.monitor: {error}") from None
                continue
            return cls(fraction, str(method), layer)
        raise ValueError(f"handler.monitor: none of {CHEAPEST} can explain layer {section.get('layer')!r} of this model")

    def spec(self) -> ExplainSpec:
        """The monitoring map's request: the predicted class, at the monitoring layer."""
        return ExplainSpec(self.method, self.layer, "top1")

    def draw(self) -> bool:
        """Whether this plain image is monitored (probability ``fraction``)."""
        return int.from_bytes(os.urandom(4), "big") < self.fraction * 2 ** 32
