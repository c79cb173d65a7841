"""An asyncio micro-batcher: concurrent requests → one call of a synchronous batch function.

KServe calls a model's ``predict`` on its event loop, one coroutine per request, and batches only
with its cluster-side agent. :class:`MicroBatcher` does what TorchServe's frontend does with
``batchSize`` / ``maxBatchDelay``: the first request of a batch opens it, the batch closes when it
holds ``max_batch_size`` requests or ``max_delay_s`` after that first request arrived, whichever is
first, and the batch runs **off the event loop** in a single engine thread (the handler is not
thread-safe, and one engine call at a time is what a TorchServe worker does). Requests that arrive
while a batch runs wait for the next one; if their deadline has already passed by then, the next
batch leaves at once.

No KServe import here: the batcher is plain asyncio and is used by :mod:`camserve.kserve.predictor`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request waiting for a batch: what the batch function needs, and its future."""

    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """``await batcher.submit(payload)`` → that payload's result from ``run(list of payloads)``.

    ``run`` is synchronous, returns one result per payload (in order) and runs in the batcher's own
    single thread. If ``run`` raises, every request of that batch gets the exception. ``on_batch``
    (optional) is called in that thread with ``(batch size, seconds waited by the oldest request)``.
    """

    def __init__(self, run: Callable[[List[Any]], Sequence[Any]], max_batch_size: int = 8,
                 max_delay_s: float = 0.1, name: str = "camserve-engine",
                 on_batch: Optional[Callable[[int, float], None]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
        self.run = run
        self.max_batch_size = int(max_batch_size)
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batches = 0
        self.requests = 0
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def alive(self) -> bool:
        """False once the collecting task has died (it never should)."""
        return self._task is None or not self._task.done()

    def _ensure_started(self) -> None:
        if self._task is None:  # created lazily on the server's own event loop
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="camserve-batcher")

    async def submit(self, payload: Any) -> Any:
        self._ensure_started()
        if not self.alive:
            raise RuntimeError("the camserve batcher stopped; the server needs a restart")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(Job(payload, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            jobs = [first]
            deadline = first.arrived + self.max_delay_s
            while len(jobs) < self.max_batch_size:
                try:  # whatever is already queued joins at once
                    jobs.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), timeout=left))
                except asyncio.TimeoutError:
                    break
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if not jobs:
                continue
            waited = time.monotonic() - jobs[0].arrived
            try:
                results = await loop.run_in_executor(self.executor, self._run, [j.payload for j in jobs], waited)
            except Exception as error:  # noqa: BLE001 - every request of the batch gets it
                logger.error("camserve batch of %d failed", len(jobs), exc_info=error)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, payloads: List[Any], waited: float) -> Sequence[Any]:
        results = self.run(payloads)
        if len(results) != len(payloads):
            raise RuntimeError(f"batch function answered {len(results)} of {len(payloads)} requests")
        self.batches += 1
        self.requests += len(payloads)
        if self.on_batch is not None:
            try:
                self.on_batch(len(payloads), waited)
            except Exception:  # noqa: BLE001 - metrics never fail a batch
                logger.warning("on_batch hook failed", exc_info=True)
        return results

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
