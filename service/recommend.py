"""The recommendation use cases: a user's top-K, candidate ranking, similar items, sessions, user summaries.

``Recommender.recommend`` and ``rank`` go through the micro-batcher (one Redis round trip and one catalogue
product, or candidate gather, for every request queued together) and fall back to the most popular items for
a user without a state, or with a state that does not decode (logged and counted, never served). Every path
applies the same filters (``Filters``: exclude, categories, exclude_seen with the never-again set, offset,
hidden items) as a mask before the top-k. The HTTP layer only maps parameters in and the answer out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hytrec.model.serving import Recommendation, ServingModel
from hytrec.model.vocab import PAD_ROW
from hytrec.service import metrics
from hytrec.service.batcher import RecommendBatcher, RecommendRequest, Scored
from hytrec.service.catalogue import Catalogue, Filters, UnknownCategory
from hytrec.service.errors import field_problem
from hytrec.service.online_eval import ImpressionLog
from hytrec.service.schemas import (
    Ranked,
    RecentEvent,
    Recommendations,
    ScoredItem,
    SessionEvent,
    SessionRecommendations,
    SimilarItems,
    UserSummary,
)
from hytrec.service.states import decode_snapshot
from hytrec.state_store import CorruptStateError, Runner, StateStore

log = logging.getLogger("hytrec.service")


class Recommender:
    """Top-K answers, candidate ranking, similar items, sessions and user summaries; see the module docstring."""

    impressions: ImpressionLog | None = None  # online evaluation: set by the runtime (service/online_eval.py)

    def __init__(
        self,
        model: ServingModel,
        store: StateStore,
        batcher: RecommendBatcher,
        popular: Recommendation,
        run: Runner,
        catalogue: Catalogue | None = None,
        never_again: frozenset[str] = frozenset(),
        count_only: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        self.store = store
        self.batcher = batcher
        self.popular = popular  # the top ``max_k`` popular items, computed once at start-up
        self.run = run
        self.catalogue = catalogue or batcher.catalogue
        self.never_again = never_again
        self.count_only = count_only

    def check(self, f: Filters) -> None:
        """422 naming ``categories`` for a category the catalogue does not have (a typo matches nothing)."""
        try:
            self.catalogue.check_categories(f.categories)
        except UnknownCategory as exc:
            raise field_problem(
                [{"field": "categories", "in": "query", "message": str(exc), "type": "unknown"}]
            ) from None

    async def recommend(
        self,
        user_id: str,
        k: int,
        exclude_seen: bool,
        now: float,
        deadline: float,
        filters: Filters | None = None,
        impression: bool = True,
    ) -> Recommendations:
        """The top ``k`` at request time ``now``; ``fallback="popularity"`` when the model cannot answer.

        ``deadline`` (``time.monotonic()``): past it the queued request is dropped (``Overloaded``).
        ``filters`` (None: only ``exclude_seen``) become a mask before the top-k, on either path.
        ``impression=False``: the caller records the impression itself (canary and shadow: service/swap.py).
        """
        if filters is not None:
            self.check(filters)
        try:
            scored = await self.batcher.submit(RecommendRequest(user_id, now, k, exclude_seen, filters), deadline)
        except CorruptStateError as exc:
            log.error("%s; answering with the popularity fallback", exc)
            metrics.RECOMMENDATIONS.labels("corrupt_state").inc()
            f = filters or Filters(exclude_seen=exclude_seen)
            rec = self.model.popular_filtered(k, self.catalogue.mask(f), f.offset)
            scored = Scored(rec, 0, False)
        else:
            metrics.RECOMMENDATIONS.labels("model" if scored.had_state else "no_state").inc()
        rec = scored.recommendation
        metrics.FILTERED_OUT.observe(rec.filtered_out)
        answer = Recommendations(
            user_id=user_id,
            items=[ScoredItem(item_id=i, score=v) for i, v in zip(rec.item_ids, rec.scores, strict=True)],
            model_version=self.model.version,
            had_state=scored.had_state,
            filtered_out=rec.filtered_out,
            offset=filters.offset if filters else 0,
            exhausted=len(rec.item_ids) < k,
            history_length=scored.history_length,
            fallback=False if scored.had_state else "popularity",
            request_time=now,
        )
        if impression and self.impressions is not None:
            self.impressions.record(answer)  # a sampled user's answer is queued for the impression log, no I/O
        return answer

    async def rank(
        self, user_id: str, candidates: Sequence[str], filters: Filters, now: float, deadline: float
    ) -> Ranked:
        """The candidates ordered by the model's score (popularity without state); unknown, hidden and
        filtered candidates listed apart. Costs O(candidates): only their embedding rows are gathered."""
        self.check(filters)
        known: dict[int, str] = {}
        unknown: list[str] = []
        for c in dict.fromkeys(candidates):  # a repeated candidate is ranked once
            i = self.catalogue.index(c)
            if i is None:
                unknown.append(c)
            else:
                known[i] = c
        hidden = [c for c in known.values() if c in self.catalogue.hidden_ids]
        rows = tuple(known)
        items: list[ScoredItem] = []
        filtered: list[str] = []
        had_state, fallback = False, True
        if rows:
            req = RecommendRequest(user_id, now, len(rows), filters.exclude_seen, filters, rows)
            try:
                scored = await self.batcher.submit(req, deadline)
            except CorruptStateError as exc:
                log.error("%s; ranking by popularity", exc)
                scored = self.batcher.fallback(req, self.catalogue.mask(filters))
            had_state, fallback = scored.had_state, not scored.had_state
            hidden_set = set(hidden)
            pairs = []
            for i, score in zip(rows, scored.scores or [], strict=True):
                c = known[i]
                if i in scored.removed:
                    if c not in hidden_set:
                        filtered.append(c)
                else:
                    pairs.append((score, c))
            pairs.sort(key=lambda p: -p[0])  # stable: equal scores keep the candidates' order
            items = [ScoredItem(item_id=c, score=v) for v, c in pairs]
        metrics.PRODUCT_REQUESTS.labels("rank", "ok").inc()
        return Ranked(
            user_id=user_id,
            items=items,
            unknown=unknown,
            hidden=hidden,
            filtered=filtered,
            model_version=self.model.version,
            had_state=had_state,
            fallback="popularity" if fallback else False,
            request_time=now,
        )

    async def similar(self, item_id: str, k: int, filters: Filters) -> SimilarItems | None:
        """The ``k`` nearest items by cosine (None: the model does not know the item)."""
        self.check(filters)
        index = self.catalogue.index(item_id)
        if index is None:
            return None
        mask = self.catalogue.mask(filters)
        rec = await self.run(lambda: self.model.similar(index, k, mask, filters.offset))
        metrics.PRODUCT_REQUESTS.labels("similar", "ok").inc()
        return SimilarItems(
            item_id=item_id,
            items=[ScoredItem(item_id=i, score=v) for i, v in zip(rec.item_ids, rec.scores, strict=True)],
            model_version=self.model.version,
            had_state=False,
            filtered_out=rec.filtered_out,
            offset=filters.offset,
            exhausted=len(rec.item_ids) < k,
        )

    async def session(
        self, events: Sequence[SessionEvent], k: int, filters: Filters, now: float
    ) -> SessionRecommendations:
        """Top-k from a visit's events, nothing read or written: the function a fresh user's stored state
        computes (same advance, same codec round trip, same mask; never-again types mask their items)."""
        self.check(filters)
        applied = [(self.model.row(e.item_id), e.ts) for e in events if e.event_type not in self.count_only]
        never = [e.item_id for e in events if e.event_type in self.never_again]
        mask = self.catalogue.mask(filters, never)

        def compute() -> Recommendation:
            if not applied:
                return self.model.popular_filtered(k, mask, filters.offset)
            state = self.model.session_state(applied)
            return self.model.recommend(state, [now], k, [filters.exclude_seen], [mask], [filters.offset])[0]

        rec = await self.run(compute)
        metrics.PRODUCT_REQUESTS.labels("session", "ok").inc()
        return SessionRecommendations(
            items=[ScoredItem(item_id=i, score=v) for i, v in zip(rec.item_ids, rec.scores, strict=True)],
            model_version=self.model.version,
            had_state=bool(applied),
            filtered_out=rec.filtered_out,
            offset=filters.offset,
            exhausted=len(rec.item_ids) < k,
            history_length=len(applied),
            fallback=False if applied else "popularity",
            request_time=now,
        )

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
