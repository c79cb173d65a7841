"""The server's rolling explanation-drift score: the monitored maps of plain traffic against a
reference, as a gauge an alert rule can fire on.

:class:`DriftMonitor` belongs to one handler (one model). The request thread only hands it the
summaries of a batch's monitored maps (:meth:`DriftMonitor.observe`: a queue put, microseconds); its
own daemon thread decodes the grids and keeps a :class:`~camserve.ops.drift.RollingDrift` — the last
``window`` grids against the reference, an MMD permutation test every ``score_every`` new grids
(≈ 10–40 ms, off the request path). :attr:`DriftMonitor.score` is the latest ``1 − p`` in [0, 1]
(NaN until the first window is full enough); the handler publishes it after each batch as the
``ExplanationDrift`` gauge (TorchServe's metrics port; ``camserve_explanation_drift{model}`` on the
KServe predictor). A score ≥ 0.99 (p ≤ 0.01) over several scrapes is the alert the docs suggest.

The reference: ``reference`` — an audit log or ``camserve batch`` records of this model (read with
:func:`camserve.ops.drift_records.read_rows`; the maps of the monitored method and layer), loaded
once at start; without one, the first ``reference_size`` monitored maps after start are the reference.
"""

from __future__ import annotations

import base64
import logging
import math
import queue
import threading
from typing import Any, Iterable, List, Mapping, Optional

import numpy as np

from camserve.engine.imaging.summary import GRID
from camserve.ops.drift import MIN_SAMPLES, RollingDrift
from camserve.ops.drift_records import read_rows

logger = logging.getLogger(__name__)
_STOP = object()


class DriftMonitor:
    """One model's rolling drift score over the monitored maps of ``method`` at ``layer``."""

    def __init__(self, method: str, layer: Optional[str], reference_grids: Optional[np.ndarray] = None,
                 reference_size: int = 200, window: int = 200, score_every: int = 50):
        if min(reference_size, window) < MIN_SAMPLES or score_every < 1:
            raise ValueError(f"handler.monitor: reference_size ({reference_size}) and window ({window}) must be "
                             f"≥ {MIN_SAMPLES} (the drift test's smallest sample), score_every ({score_every}) ≥ 1")
        self.method, self.layer = method, layer
        self.reference_size, self.window, self.score_every = int(reference_size), int(window), int(score_every)
        self.score = math.nan
        self.scored = 0  # scores computed
        self.seen = 0  # grids received by the monitor's thread
        self._collected: List[np.ndarray] = []
        self._rolling = RollingDrift(reference_grids, window=self.window) if reference_grids is not None else None
        self._inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="camserve-drift-monitor", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, section: Mapping[str, Any], model_name: str, method: str,
                      layer: Optional[str]) -> "DriftMonitor":
        """From ``handler.monitor`` (``reference``, ``reference_size``, ``window``, ``score_every``)."""
        reference = section.get("reference")
        grids = None
        if reference:
            rows = read_rows(str(reference), model=model_name).stream(method, layer)
            if len(rows) < MIN_SAMPLES:
                raise ValueError(f"handler.monitor.reference {reference}: fewer than {MIN_SAMPLES} maps of {method} at "
                                 f"{layer} for model {model_name!r}")
            grids = rows.grids
        return cls(method, layer, grids, reference_size=int(section.get("reference_size", 200)),
                   window=int(section.get("window", 200)), score_every=int(section.get("score_every", 50)))

    # -- the request thread ---------------------------------------------------------------------------
    def observe(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Hand over summaries (records' form: ``method``, ``layer``, ``grid``, …); those of the monitored
        method and layer count. Cheap: one queue put per map."""
        for entry in entries:
            if entry.get("method") == self.method and entry.get("layer") == self.layer:
                self._inbox.put(entry["grid"])

    def close(self, timeout: float = 5.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything observed so far is taken in (tests; a scheduled report)."""
        done = threading.Event()
        self._inbox.put(done)
        done.wait(timeout)

    # -- the monitor's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._take(np.frombuffer(base64.b64decode(item), dtype=np.uint8).reshape(GRID * GRID)
                           .astype(np.float32) / 255.0)
            except Exception:  # noqa: BLE001 - monitoring must never take the server down
                logger.warning("drift monitor: a map summary could not be used", exc_info=True)

    def _take(self, grid: np.ndarray) -> None:
        self.seen += 1
        if self._rolling is None:
            self._collected.append(grid)
            if len(self._collected) >= self.reference_size:
                self._rolling = RollingDrift(np.stack(self._collected), window=self.window)
                self._collected = []
                logger.info("drift monitor (%s at %s): reference of the first %d monitored maps taken",
                            self.method, self.layer, self.reference_size)
            return
        self._rolling.add(grid)
        if len(self._rolling) and (self.seen % self.score_every == 0):
            score = self._rolling.score()
            if not math.isnan(score):
                self.score = float(score)
                self.scored += 1
