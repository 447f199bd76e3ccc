"""The recommendation use case: a user's top-K from their stored state, and what is held for a user.

``Recommender.recommend`` scores the user through the micro-batcher (one Redis round trip and one catalogue
product for every request queued together) and falls back to the most popular items for a user without a
state, or with a state that does not decode (logged and counted, never served). The HTTP layer only maps
parameters in and the answer out.
"""

from __future__ import annotations

import logging

from hytrec.model.serving import Recommendation, ServingModel
from hytrec.model.vocab import PAD_ROW
from hytrec.service import metrics
from hytrec.service.batcher import RecommendBatcher, RecommendRequest
from hytrec.service.online_eval import ImpressionLog
from hytrec.service.schemas import RecentEvent, Recommendations, ScoredItem, UserSummary
from hytrec.service.states import decode_snapshot
from hytrec.state_store import CorruptStateError, Runner, StateStore

log = logging.getLogger("hytrec.service")


class Recommender:
    """Top-K answers and user summaries over one model and one store; see the module docstring."""

    impressions: ImpressionLog | None = None  # online evaluation: set by the runtime (service/online_eval.py)

    def __init__(
        self, model: ServingModel, store: StateStore, batcher: RecommendBatcher, popular: Recommendation, run: Runner
    ) -> None:
        self.model = model
        self.store = store
        self.batcher = batcher
        self.popular = popular  # the top ``max_k`` popular items, computed once at start-up
        self.run = run

    async def recommend(self, user_id: str, k: int, exclude_seen: bool, now: float, deadline: float) -> Recommendations:
        """The top ``k`` at request time ``now``; ``fallback="popularity"`` when the model cannot answer.

        ``deadline`` (``time.monotonic()``): past it the queued request is dropped (``Overloaded``).
        """
        rec: Recommendation | None = None
        history = 0
        try:
            scored = await self.batcher.submit(RecommendRequest(user_id, now, k, exclude_seen), deadline)
        except CorruptStateError as exc:
            log.error("%s; answering with the popularity fallback", exc)
            metrics.RECOMMENDATIONS.labels("corrupt_state").inc()
        else:
            if scored is None:
                metrics.RECOMMENDATIONS.labels("no_state").inc()
            else:
                rec, history = scored.recommendation, scored.history_length
                metrics.RECOMMENDATIONS.labels("model").inc()
        fallback = rec is None
        if rec is None:
            rec = Recommendation(self.popular.item_ids[:k], self.popular.scores[:k])
        answer = Recommendations(
            user_id=user_id,
            items=[ScoredItem(item_id=i, score=v) for i, v in zip(rec.item_ids, rec.scores, strict=True)],
            model_version=self.model.version,
            history_length=history,
            fallback="popularity" if fallback else False,
            request_time=now,
        )
        if self.impressions is not None:
            self.impressions.record(answer)  # a sampled user's answer is queued for the impression log, no I/O
        return answer

    async def summary(self, user_id: str) -> UserSummary | None:
        """What the store holds for the user under the served version (None: nothing)."""
        snap = await self.store.get(user_id)
        if snap is None:
            return None
        state = await self.run(lambda: decode_snapshot(self.model, snap))
        if state is None:  # a hash without a blob is reported corrupt by the store, so this is a race with DELETE
            return None
        count = int(state.count[0])
        rows, stamps = state.ring_items[0].tolist(), state.ring_ts[0].tolist()
        return UserSummary(
            user_id=user_id,
            model_version=self.model.version,
            history_length=count,
            last_ts=float(state.last_ts[0]) if count else None,
            recent=[
                RecentEvent(item_id=self.model.item_id(r), ts=t)
                for r, t in zip(rows, stamps, strict=True)
                if r != PAD_ROW
            ],
            state_bytes=len(snap.blob or b""),
            store_version=snap.version,
            updated_ms=snap.updated_ms,
        )
