"""One micro-batching loop for both hot paths: requests queue up, one task takes what is queued and runs it
as one batch (one Redis round trip, one torch call), then resolves each request's future.

While a batch runs, the next one fills, so under load the batch size grows by itself and an idle server adds
no delay. The queue is bounded twice, and ``submit`` raises ``Overloaded`` at once (the service answers 503
with Retry-After) instead of letting requests wait without bound:
- by length (``max_queue``), the memory bound;
- by delay, CoDel's signal (a sojourn time, measured, not a cost model): once no request has been seen
  waiting less than ``max_delay_ms`` for a whole ``standing_ms`` (the head of the queue is over the target and
  has stayed over it), the queue is standing, not draining, and a new request would wait at least as long.
  A burst that drains within the interval (one long batch, a collector pause) sheds nothing. Like CoDel, it
  remembers: for ``memory`` intervals after it last shed for delay, a queue over the target is shed at once,
  without waiting out a new interval. Without that, at 4x capacity each drained queue re-opened admission
  for a whole interval, whose arrivals then waited 4 intervals to drain; with it, the batcher's queue wait at
  4x capacity fell from p50 <= 100-250 ms to <= 50-100 ms against the 25 ms target, and 503s came back in
  milliseconds (``python -m hytrec.benchmarks.overload_fault``, docs/reliability.md).
A request whose deadline passed while it queued is dropped before any work is spent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hytrec.service import metrics

Req = TypeVar("Req")
Res = TypeVar("Res")
log = logging.getLogger("hytrec.service")


def loop_time() -> float:
    """The event loop's clock (what ``asyncio.timeout_at`` reads), so deadlines mean one thing everywhere."""
    return asyncio.get_running_loop().time()


class Overloaded(Exception):
    """The batcher's queue is full, or a request's deadline passed before it was served."""

    kind = "overloaded"  # the problem type of its 503

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def detail(self) -> str:
        return f"the service is over capacity ({self.reason}); retry after the delay"


class StoreStalled(Overloaded):
    """Shed at admission: a Redis round trip has been waiting past HYTREC_STORE_STALL_MS (503 unavailable)."""

    kind = "unavailable"

    def detail(self) -> str:
        return f"the state store is not answering ({self.reason}); retry after the delay"


@dataclass
class _Item(Generic[Req]):
    request: Req
    future: asyncio.Future
    deadline: float  # loop_time() after which nobody waits for the answer
    queued: float = field(default_factory=lambda: loop_time())


class MicroBatcher(Generic[Req, Res]):
    """Runs ``process(requests)`` on batches of queued requests; subclasses say what a batch does."""

    name = "batch"

    standing = 0.1  # seconds over the delay target before the queue counts as standing (CoDel's interval)
    memory = 10  # intervals after the last delay shed during which a queue over the target is shed at once

    def __init__(self, max_size: int, max_wait_ms: float, max_queue: int, max_delay_ms: float = math.inf) -> None:
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_delay = max_delay_ms / 1000.0
        self._below = -math.inf  # loop time at which a request was last seen waiting under the target
        self._shed_at = -math.inf  # loop time of the last shed for delay
        self._queue: deque[_Item[Req]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def process(self, requests: Sequence[Req]) -> Sequence[Res | BaseException]:
        """One result or exception per request, in order (an exception fails only its own request)."""
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Ask again until the loop has ended: a cancel delivered while a batch finishes can be lost (seen
            # under CPU load at shutdown, the loop then waiting for the next request forever), and a worker's
            # shutdown must stay bounded.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.cancel()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def pressure(self) -> str | None:
        """Why a request arriving now would be shed (``queue_full`` / ``queue_delay``), or None to admit it.

        Cheap enough to ask before a request is even parsed (the guard does).
        """
        if len(self._queue) >= self.max_queue:
            return "queue_full"
        now = loop_time()
        if not self._queue or now - self._queue[0].queued <= self.max_delay:
            self._below = now
            return None
        # Over the target since the head crossed it, or since a request was last seen under it, if later; no
        # new interval is granted while the last one that stood is remembered.
        above_since = max(self._queue[0].queued + self.max_delay, self._below)
        if now - above_since >= self.standing or now - self._shed_at < self.memory * self.standing:
            self._shed_at = now
            return "queue_delay"
        return None

    def shed(self, reason: str) -> Overloaded:
        """Count a shed request and say why (raised by ``submit``, answered early by the guard)."""
        metrics.SHED.labels(self.name, reason).inc()
        if reason == "queue_full":
            return Overloaded(self.name, f"{self.max_queue} requests already queued")
        waited, standing = f"{self.max_delay * 1e3:g} ms", f"{self.standing * 1e3:g} ms"
        detail = f"its queue is not draining: requests have waited over {waited} for {standing}"
        return Overloaded(self.name, detail)

    async def submit(self, request: Req, deadline: float) -> Res:
        """Queue ``request`` and wait for its answer; ``Overloaded`` at once when the queue is full or standing."""
        if self._task is None:
            raise RuntimeError(f"{self.name} batcher not started")
        reason = self.pressure()
        if reason is not None:
            raise self.shed(reason)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(request, fut, deadline))
        self._wake.set()
        return await fut

    async def _get(self, timeout: float | None = None) -> _Item[Req] | None:
        """The next queued request, waiting up to ``timeout`` seconds (None: forever) for one."""
        while not self._queue:
            self._wake.clear()
            if timeout is None:
                await self._wake.wait()
            else:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that arrives as the
                # event is set, and stop() then waits forever on a loop that goes on collecting.
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    return None
        return self._queue.popleft()

    async def _collect(self) -> list[_Item[Req]]:
        first = await self._get()
        assert first is not None
        batch = [first]
        deadline = loop_time() + self.max_wait
        while len(batch) < self.max_size:
            if self._queue:
                batch.append(self._queue.popleft())
                continue
            left = deadline - loop_time()
            if left <= 0:
                break
            item = await self._get(left)
            if item is None:
                break
            batch.append(item)
        return batch

    def _live(self, batch: list[_Item[Req]]) -> list[_Item[Req]]:
        """Drop the requests nobody waits for any more: cancelled, or past their deadline."""
        now = loop_time()
        live = []
        for item in batch:
            if item.future.done():
                continue
            if now > item.deadline:
                metrics.SHED.labels(self.name, "deadline").inc()
                item.future.set_exception(Overloaded(self.name, "the request's deadline passed while it queued"))
                continue
            live.append(item)
        return live

    async def _loop(self) -> None:
        while True:
            batch = self._live(await self._collect())
            if not batch:
                continue
            start = loop_time()
            for item in batch:
                metrics.MICROBATCH_WAIT.labels(self.name).observe(start - item.queued)
            if start - batch[-1].queued <= self.max_delay:  # the youngest waited under the target
                self._below = start
            metrics.MICROBATCH_SIZE.labels(self.name).observe(len(batch))
            try:
                results = await self.process([item.request for item in batch])
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                results = [exc] * len(batch)
            finally:
                metrics.MICROBATCH_COMPUTE.labels(self.name).observe(loop_time() - start)
            for item, res in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(res, BaseException):
                    item.future.set_exception(res)
                else:
                    item.future.set_result(res)
