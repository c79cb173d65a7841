"""Prometheus metrics for the KServe predictor: the handlers' own metrics, and the batcher's.

The handlers report through TorchServe's metrics API (``context.metrics.add_time/add_counter/
add_metric``, see :mod:`camserve.ops.metrics`). :class:`PrometheusSink` implements that API on
``prometheus_client`` (KServe's ``/metrics`` route serves the default registry), so the same handler
code feeds both servers:

=============================================  ==========  ============================================
series                                         type        from
=============================================  ==========  ============================================
``camserve_explanation_seconds{model,method}``  histogram   ``ExplanationTime`` (per batch and method:
                                                            the sum of that method's images' shares)
``camserve_explanations_total{model,method}``   counter     ``ExplanationCount``
``camserve_handler_seconds{model}``             histogram   ``HandlerTime`` (one ``handle`` call)
``camserve_<name>_total{model,…}``              counter     any other counter (``BatchRetries{reason}``,
                                                            ``BatchBudgetRejected``)
``camserve_<name>{model,…}``                    gauge       gauges (``AuditPending``, …)
``camserve_batches_total{model}``               counter     batcher: engine batches (``handle`` calls)
``camserve_batch_size{model}``                  histogram   batcher: requests per batch
``camserve_batch_wait_seconds{model}``          histogram   batcher: the oldest request's queueing time
``camserve_model_forwards_total{model}``        counter     forward calls of the model's top module
``camserve_queued_requests{model}``             gauge       requests waiting for a batch
=============================================  ==========  ============================================

KServe's own series (``request_predict_seconds``, ``request_explain_seconds``, …) sit beside them.
A metrics failure never fails a request.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Dict, Iterable, Optional, Tuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: handler metric name → (series, kind)
NAMED = {"ExplanationTime": ("camserve_explanation_seconds", "histogram"),
         "ExplanationCount": ("camserve_explanations_total", "counter"),
         "HandlerTime": ("camserve_handler_seconds", "histogram")}


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower().replace("-", "_").replace(" ", "_")


def _dimensions(dimensions: Optional[Iterable[Any]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for d in dimensions or []:
        name, value = (getattr(d, "name", None), getattr(d, "value", None)) if not isinstance(d, tuple) else d
        if name and snake(name) not in ("model_name", "level", "host"):  # the model label is ours
            out[snake(name)] = str(value)
    return out


class PrometheusSink:
    """TorchServe's ``context.metrics`` API (the calls the handlers make) on Prometheus series."""

    def __init__(self, model_name: str, registry: CollectorRegistry = REGISTRY):
        self.model_name = model_name
        self.registry = registry
        self._series: Dict[str, Tuple[Any, Tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self.forwards = self._get("camserve_model_forwards_total", "counter", (),
                                  "forward calls of the model's top module (batched explanations share one)")
        self.batches = self._get("camserve_batches_total", "counter", (), "engine batches (handler.handle calls)")
        self.batch_size = self._get("camserve_batch_size", "histogram", (), "requests per engine batch")
        self.batch_wait = self._get("camserve_batch_wait_seconds", "histogram", (),
                                    "queueing time of a batch's oldest request")
        self.queued = self._get("camserve_queued_requests", "gauge", (), "requests waiting for a batch")

    # -- series ---------------------------------------------------------------------------------
    def _get(self, series: str, kind: str, labels: Tuple[str, ...], doc: Optional[str] = None):
        key = series
        with self._lock:
            found = self._series.get(key)
            if found is not None:
                metric, names = found
                if names != labels:
                    raise ValueError(f"{series}: labels {labels} differ from the first use's {names}")
                return metric
            names = ("model",) + tuple(labels)
            existing = getattr(self.registry, "_names_to_collectors", {}).get(series)
            if existing is not None:  # a second sink in one process (tests): reuse the series
                metric = existing
            elif kind == "counter":
                metric = Counter(series, doc or series, names, registry=self.registry)
            elif kind == "histogram":
                buckets = BATCH_BUCKETS if series == "camserve_batch_size" else SECONDS_BUCKETS
                metric = Histogram(series, doc or series, names, buckets=buckets, registry=self.registry)
            else:
                metric = Gauge(series, doc or series, names, registry=self.registry)
            self._series[key] = (metric, tuple(labels))
            return metric

    def _emit(self, name: str, value: float, kind: str, dimensions, unit: Optional[str] = None) -> None:
        try:
            dims = _dimensions(dimensions)
            series, kind = NAMED.get(name, (None, kind))
            if series is None:
                series = f"camserve_{snake(name)}" + ("_total" if kind == "counter" else "")
            metric = self._get(series, kind, tuple(sorted(dims)), f"camserve handler metric {name}")
            child = metric.labels(model=self.model_name, **dims)
            if kind == "counter":
                child.inc(float(value))
            elif kind == "histogram":
                child.observe(float(value) / 1000.0 if (unit or "ms") == "ms" else float(value))
            else:
                child.set(float(value))
        except Exception:  # noqa: BLE001 - metrics never fail a request
            logger.warning("could not record metric %s", name, exc_info=True)

    # -- TorchServe's metrics API (ts.metrics.metric_cache_abstract) -----------------------------
    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self._emit(name, value, "histogram", dimensions, unit)

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._emit(name, value, "counter", dimensions)

    def add_metric(self, name, value, unit="count", idx=None, dimensions=None, metric_type=None):
        kind = "counter" if str(getattr(metric_type, "name", metric_type or "")).upper() == "COUNTER" else "gauge"
        self._emit(name, value, kind, dimensions)

    def add_size(self, name, value, idx=None, unit="MB", dimensions=None, metric_type=None):
        self._emit(name, value, "gauge", dimensions)

    def add_percent(self, name, value, idx=None, dimensions=None, metric_type=None):
        self._emit(name, value, "gauge", dimensions)

    # -- the batcher's -------------------------------------------------------------------------
    def batch(self, size: int, waited_s: float) -> None:
        self.batches.labels(model=self.model_name).inc()
        self.batch_size.labels(model=self.model_name).observe(size)
        self.batch_wait.labels(model=self.model_name).observe(waited_s)

    def forward(self, *_args) -> None:
        self.forwards.labels(model=self.model_name).inc()

    def set_queued(self, count: int) -> None:
        self.queued.labels(model=self.model_name).set(count)
