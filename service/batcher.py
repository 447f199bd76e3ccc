"""The recommendation micro-batcher: concurrent requests share one Redis round trip and one catalogue product.

A batch reads every user's snapshot in one pipelined ``get_many`` (and, when never-again event types are
configured, the never-again sets of the users asking ``exclude_seen`` in a second pipeline sent at the same
time), then decodes the blobs and runs ``ServingModel.recommend`` once in the torch thread, each request's
filters as a mask on its row of the product. Candidate-ranking requests (``candidates``) share the read and
the user-vector pass, and gather only their candidates' embeddings. A user without a stored state gets the
popularity fallback under the same mask; a blob that does not decode fails only its own request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hytrec.model.serving import ItemMask, Recommendation, ServingModel
from hytrec.model.state import StateBatch
from hytrec.model.vocab import FIRST_ITEM_ROW
from hytrec.service.catalogue import Catalogue, Filters
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
    filters: Filters | None = None  # None: exclude_seen only (the unfiltered fast path)
    candidates: tuple[int, ...] | None = None  # rank mode: item indices to score, nothing else


@dataclass(frozen=True, slots=True)
class Scored:
    """One request's answer: the top-k (or, in rank mode, every candidate's score and which ones the mask
    removed), the user's history length and whether a state answered (else: the popularity fallback)."""

    recommendation: Recommendation
    history_length: int
    had_state: bool = True
    scores: list[float] | None = None
    removed: frozenset[int] = frozenset()


class RecommendBatcher(MicroBatcher[RecommendRequest, Scored]):
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
        catalogue: Catalogue | None = None,
        read_never: bool = False,
    ) -> None:
        super().__init__(max_size, max_wait_ms, max_queue, max_delay_ms)
        self.model = model
        self.store = store
        self.run = runner
        self.catalogue = catalogue or Catalogue(model.vocab)
        self.read_never = read_never  # never-again types configured: read the sets of users asking exclude_seen

    async def process(self, requests: Sequence[RecommendRequest]) -> Sequence[Scored | BaseException]:
        users = [r.user_id for r in requests]
        asking = sorted({r.user_id for r in requests if r.exclude_seen}) if self.read_never else []
        if asking:
            snaps, never = await asyncio.gather(self.store.get_many(users), self.store.never_many(asking))
        else:
            snaps, never = await self.store.get_many(users), {}
        with span("hytrec.batch", path=self.name, requests=len(requests)):
            return await self.run(lambda: self._compute(requests, snaps, never))

    def _mask(self, r: RecommendRequest, never: dict[str, list[str]]) -> ItemMask | None:
        f = r.filters or Filters(exclude_seen=r.exclude_seen)
        return self.catalogue.mask(f, never.get(r.user_id, ()))

    def _compute(
        self, requests: Sequence[RecommendRequest], snaps: dict[str, Snapshot | None], never: dict[str, list[str]]
    ) -> list[Scored | BaseException]:
        """Runs in the torch thread: decode, masks, one catalogue product (and candidate gathers), split."""
        out: list[Scored | BaseException | None] = [None] * len(requests)
        good: list[int] = []
        states: list[StateBatch] = []
        masks = [self._mask(r, never) for r in requests]
        for i, r in enumerate(requests):
            snap = snaps.get(r.user_id)
            if snap is None:
                out[i] = self.fallback(r, masks[i])
                continue
            try:
                state = decode_snapshot(self.model, snap)
            except Exception as exc:  # noqa: BLE001 - CorruptStateError, handed to that request
                out[i] = exc
                continue
            if state is not None:
                states.append(state)
                good.append(i)
            else:
                out[i] = self.fallback(r, masks[i])
        top = [j for j, i in enumerate(good) if requests[i].candidates is None]
        ranked = [j for j, i in enumerate(good) if requests[i].candidates is not None]
        if top:
            batched = StateBatch.cat([states[j] for j in top])
            reqs = [requests[good[j]] for j in top]
            k = max(r.k for r in reqs)
            recs = self.model.recommend(
                batched,
                [r.now for r in reqs],
                k,
                [r.exclude_seen for r in reqs],
                [masks[good[j]] for j in top],
                [r.filters.offset if r.filters else 0 for r in reqs],
            )
            for j, r, rec, n in zip(top, reqs, recs, batched.count.tolist(), strict=True):
                out[good[j]] = Scored(Recommendation(rec.item_ids[: r.k], rec.scores[: r.k], rec.filtered_out), int(n))
        if ranked:
            batched = StateBatch.cat([states[j] for j in ranked])
            reqs = [requests[good[j]] for j in ranked]
            cands = [torch.tensor(r.candidates, dtype=torch.int64) for r in reqs]
            scores = self.model.rank(batched, [r.now for r in reqs], cands)
            for n, (j, r, s) in enumerate(zip(ranked, reqs, scores, strict=True)):
                seen = batched.ring_items[n] if r.exclude_seen else None
                removed = self._removed(r.candidates or (), masks[good[j]], seen)
                out[good[j]] = Scored(Recommendation([], []), int(batched.count[n]), True, s, removed)
        return out  # type: ignore[return-value]

    @staticmethod
    def _removed(candidates: Sequence[int], mask: ItemMask | None, seen: torch.Tensor | None) -> frozenset[int]:
        """Candidate indices the mask (or the ring buffer, with exclude_seen) removes."""
        gone: set[int] = set()
        if mask is not None:
            cands = torch.tensor(list(candidates), dtype=torch.int64)
            gone = set(cands[mask.removes(cands)].tolist())
        if seen is not None:
            ring = {int(x) - FIRST_ITEM_ROW for x in seen.tolist() if x >= FIRST_ITEM_ROW}
            gone |= ring.intersection(candidates)
        return frozenset(gone)

    def fallback(self, r: RecommendRequest, mask: ItemMask | None) -> Scored:
        """No usable state: popularity under the same mask (rank mode: the candidates' popularity)."""
        if r.candidates is not None:
            scores = self.model.popularity_scores(r.candidates)
            return Scored(Recommendation([], []), 0, False, scores, self._removed(r.candidates, mask, None))
        offset = r.filters.offset if r.filters else 0
        return Scored(self.model.popular_filtered(r.k, mask, offset), 0, False)
