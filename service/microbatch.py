"""One micro-batching loop for both hot paths: requests queue up, one task takes what is queued and runs it
as one batch (one Redis round trip, one torch call), then resolves each request's future.

While a batch runs, the next one fills, so under load the batch size grows by itself and an idle server adds
no delay. The queue is bounded: when it is full, ``submit`` raises ``Overloaded`` at once (the service answers
503 with Retry-After) instead of letting requests wait without bound; a request whose deadline passed while
it queued is dropped before any work is spent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class _Item(Generic[Req]):
    request: Req
    future: asyncio.Future
    deadline: float  # loop_time() after which nobody waits for the answer
    queued: float = field(default_factory=lambda: loop_time())


class MicroBatcher(Generic[Req, Res]):
    """Runs ``process(requests)`` on batches of queued requests; subclasses say what a batch does."""

    name = "batch"

    def __init__(self, max_size: int, max_wait_ms: float, max_queue: int) -> None:
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Item[Req]] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task | None = None

    async def process(self, requests: Sequence[Req]) -> Sequence[Res | BaseException]:
        """One result or exception per request, in order (an exception fails only its own request)."""
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.cancel()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, request: Req, deadline: float) -> Res:
        """Queue ``request`` and wait for its answer; ``Overloaded`` at once when the queue is full."""
        if self._task is None:
            raise RuntimeError(f"{self.name} batcher not started")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(request, fut, deadline))
        except asyncio.QueueFull:
            metrics.SHED.labels(self.name, "queue_full").inc()
            raise Overloaded(self.name, f"{self.max_queue} requests already queued") from None
        return await fut

    async def _collect(self) -> list[_Item[Req]]:
        batch = [await self._queue.get()]
        deadline = loop_time() + self.max_wait
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop_time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
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
