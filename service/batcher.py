"""Micro-batching of recommendation requests: concurrent requests share one catalogue product.

Requests queue up on the event loop; one task takes what is queued (waiting at most ``max_wait_ms`` for
company, up to ``max_size``), decodes the stored blobs and runs ``ServingModel.recommend`` in the torch thread,
then resolves each request's future. While a batch computes, the next one fills, so under load the batch
size grows by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from hytrec.model.serving import Recommendation, ServingModel
from hytrec.model.state import StateBatch
from hytrec.service import metrics
from hytrec.service.states import decode_snapshot
from hytrec.state_store import Runner, Snapshot

log = logging.getLogger("hytrec.service")


@dataclass
class _Request:
    snapshot: Snapshot  # decoded in the torch thread
    now: float
    k: int
    exclude_seen: bool
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Scored:
    """One request's answer: the top-k and the user's history length."""

    recommendation: Recommendation
    history_length: int


class RecommendBatcher:
    """Collects recommendation requests into batches run by one torch call each."""

    def __init__(self, model: ServingModel, runner: Runner, max_size: int = 64, max_wait_ms: float = 1.0) -> None:
        self.model = model
        self.run = runner
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="recommend-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            req = self._queue.get_nowait()
            if not req.future.done():
                req.future.cancel()

    async def submit(self, snapshot: Snapshot, now: float, k: int, exclude_seen: bool) -> Scored:
        """Score one user's stored state at request time ``now`` (``CorruptStateError`` if it does not decode)."""
        if self._task is None:
            raise RuntimeError("batcher not started")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(snapshot, now, k, exclude_seen, fut))
        return await fut

    async def _collect(self) -> list[_Request]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            batch = [r for r in batch if not r.future.done()]  # a client that went away
            if not batch:
                continue
            start = time.perf_counter()
            for r in batch:
                metrics.MICROBATCH_WAIT.observe(start - r.queued)
            metrics.MICROBATCH_SIZE.observe(len(batch))
            try:
                results = await self.run(lambda batch=batch: self._compute(batch))
            except asyncio.CancelledError:
                for r in batch:
                    if not r.future.done():
                        r.future.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            finally:
                metrics.MICROBATCH_COMPUTE.observe(time.perf_counter() - start)
            for r, res in zip(batch, results, strict=True):
                if r.future.done():
                    continue
                if isinstance(res, Exception):
                    r.future.set_exception(res)
                else:
                    r.future.set_result(res)

    def _compute(self, batch: list[_Request]) -> list[Scored | Exception]:
        """Runs in the torch thread: decode, one catalogue product, split per request.

        A state that fails to decode fails only its own request.
        """
        out: list[Scored | Exception | None] = [None] * len(batch)
        good: list[int] = []
        states: list[StateBatch] = []
        for i, r in enumerate(batch):
            try:
                state = decode_snapshot(self.model, r.snapshot)
                if state is None:
                    raise ValueError(f"no state stored for user {r.snapshot.user_id!r}")
                states.append(state)
                good.append(i)
            except Exception as exc:  # noqa: BLE001 - CorruptStateError mostly, handed to that request
                out[i] = exc
        if states:
            batched = StateBatch.cat(states)
            reqs = [batch[i] for i in good]
            k = max(r.k for r in reqs)
            recs = self.model.recommend(batched, [r.now for r in reqs], k, [r.exclude_seen for r in reqs])
            for i, r, rec, n in zip(good, reqs, recs, batched.count.tolist(), strict=True):
                out[i] = Scored(Recommendation(rec.item_ids[: r.k], rec.scores[: r.k]), int(n))
        return out  # type: ignore[return-value]
