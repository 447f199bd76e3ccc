"""The event loop's own queueing delay, as an admission signal: a request parsed by a loop that is behind waits
for it before its route runs, and the request's deadline starts only in the route.

A sampler task sleeps ``tick`` and notes how late it woke: the time a callback that became ready then waited
for the loop. CoDel's rule, as the batchers use it (``MicroBatcher.pressure``): the loop counts as standing, not
just busy, once no wake-up has come within ``target`` of its time for a whole ``interval``; while it stands, the
guard answers new requests 503 before their bodies are read or parsed, the work that keeps the loop behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

from hytrec.service import metrics
from hytrec.service.microbatch import Overloaded, loop_time


class LoopLag:
    """Samples the running loop's lateness; ``pressure()`` says whether it stands over the target."""

    def __init__(self, target_ms: float, interval_ms: float, tick_ms: float = 10.0, shed: bool = True) -> None:
        self.target, self.interval, self.tick = target_ms / 1000.0, interval_ms / 1000.0, tick_ms / 1000.0
        self.shed = shed  # False: only sampled (the metric, ``on_time_at`` for the stall breaker)
        self._below = math.inf  # loop time of the last wake-up within the target (inf: not sampling yet)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._below = loop_time()
            self._task = asyncio.create_task(self._sample(), name="hytrec-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self) -> None:
        while True:
            due = loop_time() + self.tick
            await asyncio.sleep(self.tick)
            woke = loop_time()
            late = woke - due
            metrics.LOOP_LAG.observe(max(late, 0.0))
            if late <= self.target:
                self._below = woke

    @property
    def on_time_at(self) -> float:
        """Loop time (``time.monotonic()``) the loop was last seen keeping time: what had arrived for it by
        then, a Redis reply say, it was free to handle. Now, while not sampling."""
        return loop_time() if self._task is None else self._below

    def pressure(self) -> Overloaded | None:
        """Why a request arriving now is shed (counted), or None: the loop has stayed over the target."""
        if not self.shed or loop_time() - self._below < self.interval:
            return None
        metrics.SHED.labels("admission", "loop_lag").inc()
        target, interval = f"{self.target * 1e3:g} ms", f"{self.interval * 1e3:g} ms"
        return Overloaded("admission", f"the event loop has run over {target} behind for {interval}")
