"""The recommendation micro-batcher: concurrent requests share one Redis round trip and one catalogue product.

A batch reads every user's snapshot in one pipelined ``get_many``, then decodes the blobs and runs
``ServingModel.recommend`` once in the torch thread. A user without a stored state gets ``None`` (the
caller falls back to popularity); a blob that does not decode fails only its own request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hytrec.model.serving import Recommendation, ServingModel
from hytrec.model.state import StateBatch
from hytrec.service.microbatch import MicroBatcher
from hytrec.service.states import decode_snapshot
from hytrec.service.tracing import span
from hytrec.state_store import Runner, Snapshot, StateStore


@dataclass(frozen=True, slots=True)
class RecommendRequest:
    user_id: str
    now: float
    k: int
    exclude_seen: bool


@dataclass(frozen=True, slots=True)
class Scored:
    """One request's answer: the top-k and the user's history length."""

    recommendation: Recommendation
    history_length: int


class RecommendBatcher(MicroBatcher[RecommendRequest, "Scored | None"]):
    """Scores batches of users; see the module docstring."""

    name = "recommend"

    def __init__(
        self,
        model: ServingModel,
        store: StateStore,
        runner: Runner,
        max_size: int = 64,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        max_delay_ms: float = math.inf,
    ) -> None:
        super().__init__(max_size, max_wait_ms, max_queue, max_delay_ms)
        self.model = model
        self.store = store
        self.run = runner

    async def process(self, requests: Sequence[RecommendRequest]) -> Sequence[Scored | None | BaseException]:
        snaps = await self.store.get_many([r.user_id for r in requests])
        with span("hytrec.batch", path=self.name, requests=len(requests)):
            return await self.run(lambda: self._compute(requests, snaps))

    def _compute(
        self, requests: Sequence[RecommendRequest], snaps: dict[str, Snapshot | None]
    ) -> list[Scored | None | BaseException]:
        """Runs in the torch thread: decode, one catalogue product, split per request."""
        out: list[Scored | None | BaseException] = [None] * len(requests)
        good: list[int] = []
        states: list[StateBatch] = []
        for i, r in enumerate(requests):
            snap = snaps.get(r.user_id)
            if snap is None:
                continue
            try:
                state = decode_snapshot(self.model, snap)
            except Exception as exc:  # noqa: BLE001 - CorruptStateError, handed to that request
                out[i] = exc
                continue
            if state is not None:
                states.append(state)
                good.append(i)
        if states:
            batched = StateBatch.cat(states)
            reqs = [requests[i] for i in good]
            k = max(r.k for r in reqs)
            recs = self.model.recommend(batched, [r.now for r in reqs], k, [r.exclude_seen for r in reqs])
            for i, r, rec, n in zip(good, reqs, recs, batched.count.tolist(), strict=True):
                out[i] = Scored(Recommendation(rec.item_ids[: r.k], rec.scores[: r.k]), int(n))
        return out
