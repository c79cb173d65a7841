"""Handler metrics through TorchServe 0.12's metrics cache (``context.metrics``).

``ExplanationTime`` (ms, gauge) with dimensions ``Method``, ``ModelName``, ``Level=Model``: per batch
and method, the sum of that method's images' shares of the batch's work (each image's ``seconds``:
the shared forward split over the batch's images, each backward over the rows it served, each map
computation over its rows; a ``compare`` explanation's own call), so the methods of one batch add up
to the batch's time instead of each reporting all of it. Timers synchronise CUDA before reading
(:func:`camserve.engine.timing.clock`). ``ExplanationCount`` (counter) per method.
``AuditWriteErrors`` / ``AuditDropped`` / ``AuditPending`` (see :mod:`camserve.ops.audit`) report
the audit log's failed write attempts, the records it gave up on, and the records not yet on disk.
``BatchRetries`` (counter, dimension ``Reason``) counts the batch splits of
:meth:`CamserveHandler.run_isolated`; ``BatchBudgetRejected`` the requests refused by the per-batch
Captum/compare budget. With ``metrics_mode=prometheus`` and ``model_metrics_auto_detect=true`` (see
``config.properties``) they appear on the metrics port as ``ts_…``-style series.
A metrics failure never fails a request.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Mapping, Optional

logger = logging.getLogger(__name__)


def _request_id(context) -> Optional[str]:
    try:
        return context.get_request_id(0)
    except Exception:  # noqa: BLE001 - direct calls without request ids
        return None


def record_explanations(context, seconds_by_method: Dict[str, float], counts: Counter) -> None:
    """``seconds_by_method``: the sum of each method's per-image ``seconds`` in this batch."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        from ts.metrics.dimension import Dimension

        request_id = _request_id(context)
        for method, seconds in seconds_by_method.items():
            metrics.add_time("ExplanationTime", round(seconds * 1000.0, 3), request_id, "ms",
                             [Dimension("Method", method)])
            metrics.add_counter("ExplanationCount", counts[method], request_id, [Dimension("Method", method)])
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.warning("could not record explanation metrics", exc_info=True)


def record_counters(context, counters: Mapping[str, float], dimension: Optional[tuple] = None,
                    gauges: Optional[Mapping[str, float]] = None) -> None:
    """Add ``counters`` (name → increment; zeros skipped) and set ``gauges`` (name → value), optionally
    with one ``(dimension name, value)``."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        dims = [Dimension(*dimension)] if dimension else []
        request_id = _request_id(context)
        for name, value in counters.items():
            if value:
                metrics.add_counter(name, value, request_id, dims)
        for name, value in (gauges or {}).items():
            metrics.add_metric(name, value, "count", request_id, dims, metric_type=MetricTypes.GAUGE)
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.warning("could not record metrics %s", sorted(counters), exc_info=True)
