"""Handler metrics through TorchServe 0.12's metrics cache (``context.metrics``).

``ExplanationTime`` (ms, gauge) with dimensions ``Method``, ``ModelName``, ``Level=Model``: the time
of the batch's forward+backward passes that produced that method's maps, and ``ExplanationCount``
(counter) per method. With ``metrics_mode=prometheus`` and ``model_metrics_auto_detect=true``
(see ``config.properties``) they appear on the metrics port as ``ts_…``-style series.
A metrics failure never fails a request.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Optional

logger = logging.getLogger(__name__)


def record_explanations(context, seconds_by_method: Dict[str, float], counts: Counter) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        from ts.metrics.dimension import Dimension

        request_id: Optional[str] = context.get_request_id(0)
        for method, seconds in seconds_by_method.items():
            metrics.add_time("ExplanationTime", round(seconds * 1000.0, 3), request_id, "ms",
                             [Dimension("Method", method)])
            metrics.add_counter("ExplanationCount", counts[method], request_id, [Dimension("Method", method)])
    except Exception:  # noqa: BLE001 - metrics must never break serving
        logger.warning("could not record explanation metrics", exc_info=True)
