"""The micro-batcher's delay shedding on its own: CoDel's interval, and its memory of the last standing queue."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from hytrec.service.microbatch import MicroBatcher


class Gated(MicroBatcher[int, int]):
    """Batches of one that wait for ``gate``: nothing drains while it is clear."""

    name = "gated"

    def __init__(self, memory: int) -> None:
        super().__init__(max_size=1, max_wait_ms=0.0, max_queue=1000, max_delay_ms=20.0)
        self.standing, self.memory = 0.1, memory
        self.gate = asyncio.Event()

    async def process(self, requests: Sequence[int]) -> Sequence[int]:
        await self.gate.wait()
        return list(requests)


async def _stall(b: Gated, over_s: float) -> list[asyncio.Task]:
    """One request in the running batch and one queued behind it, the queued one left waiting ``over_s``."""
    b.gate.clear()
    far = asyncio.get_running_loop().time() + 60
    tasks = [asyncio.create_task(b.submit(i, far)) for i in range(2)]
    await asyncio.sleep(over_s)
    return tasks


async def _drain(b: Gated, tasks: list[asyncio.Task]) -> None:
    b.gate.set()
    assert await asyncio.gather(*tasks) == [0, 1]
    assert b.queued == 0 and b.pressure() is None


def _two_stalls(memory: int, between_s: float) -> tuple[str | None, str | None]:
    """The pressure after a 150 ms stall (standing) and, ``between_s`` after draining it, after a 60 ms one."""

    async def body() -> tuple[str | None, str | None]:
        b = Gated(memory)
        b.start()
        try:
            tasks = await _stall(b, 0.15)
            first = b.pressure()
            await _drain(b, tasks)
            await asyncio.sleep(between_s)
            tasks = await _stall(b, 0.06)
            second = b.pressure()
            await _drain(b, tasks)
            return first, second
        finally:
            await b.stop()

    return asyncio.run(body())


@pytest.mark.parametrize("memory", [0, 10])
def test_after_a_standing_queue_the_next_one_is_shed_without_a_new_interval(memory: int) -> None:
    """A queue over the 20 ms target for 150 ms stands (shed). Once drained, admission reopens. A second stall
    over the target for only 60 ms (under the 100 ms interval) is shed at once while the first is remembered,
    and admitted when the batcher keeps no memory (each episode gets its interval)."""
    assert _two_stalls(memory, 0.0) == ("queue_delay", "queue_delay" if memory else None)


def test_the_memory_fades_after_its_intervals() -> None:
    """With a memory of 2 intervals (200 ms), a stall 400 ms after the last delay shed gets its interval again."""
    assert _two_stalls(2, 0.4) == ("queue_delay", None)
