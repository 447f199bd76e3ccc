"""A checkpoint ready to serve: item ids <-> rows, the state codec, and the two batched hot paths.

Everything torch-side that the service and the offline ``hytrec recommend`` do goes through here, so the
service stays a thin layer and both give the same answer. Nothing here knows HTTP or Redis. The methods
are synchronous CPU work: the service runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from hytrec.model.checkpoint import Checkpoint, load_checkpoint
from hytrec.model.config import HyTRecConfig
from hytrec.model.hytrec import HyTRec
from hytrec.model.state import StateBatch, decode_state, encode_state
from hytrec.model.vocab import FIRST_ITEM_ROW, PAD_ROW, Vocab


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[str]
    scores: list[float]
    filtered_out: int = 0  # catalogue items a mask (seen, filters, hidden) removed before the top-k


@dataclass(frozen=True)
class ItemMask:
    """Items a request may not be shown: ``drop`` (item indices, duplicates allowed) and, when set, every item
    ``outside`` (a shared, never mutated bool (n_items,) tensor: True for the items outside the asked
    categories; ``keep`` lists the others). Built from indices and cached unions, so its cost grows with the
    ids named and the categories' sizes, not with the catalogue: the top-k of a category request selects among
    ``keep`` only, no pass over the whole row."""

    drop: torch.Tensor
    outside: torch.Tensor | None = None
    outside_count: int = 0  # items ``outside`` marks (counted once, when the union was built)
    keep: torch.Tensor | None = None  # sorted indices of the items not ``outside`` (the top-k looks only there)

    def count(self, seen: torch.Tensor | None = None) -> int:
        """Items the mask removes, together with the ``seen`` item indices: O(drop + seen), not O(n)."""
        extra = self.drop if seen is None or not seen.numel() else torch.cat([self.drop, seen])
        extra = torch.unique(extra)
        if self.outside is not None:
            extra = extra[~self.outside[extra]]
        return self.outside_count + int(extra.numel())

    def banned(self, n_items: int) -> torch.Tensor:
        """The mask as a fresh bool (n_items,) tensor."""
        out = self.outside.clone() if self.outside is not None else torch.zeros(n_items, dtype=torch.bool)
        out[self.drop] = True
        return out

    def removes(self, indices: torch.Tensor) -> torch.Tensor:
        """Which of ``indices`` the mask removes (bool, same shape)."""
        out = torch.isin(indices, self.drop)
        if self.outside is not None:
            out |= self.outside[indices]
        return out


def apply_drops(scores: torch.Tensor, masks: Sequence[ItemMask | None]) -> None:
    """-inf on the dropped items of each row of ``scores`` (B, n_items), the whole batch in one indexed write
    (categories are not written: ``_top`` selects among their ``keep`` items)."""
    drop_rows, drop_cols = [], []
    for i, m in enumerate(masks):
        if m is not None and m.drop.numel():
            drop_rows.append(torch.full((m.drop.numel(),), i, dtype=torch.int64))
            drop_cols.append(m.drop)
    if drop_rows:
        scores[torch.cat(drop_rows), torch.cat(drop_cols)] = float("-inf")


class ServingModel:
    """A HyTRec checkpoint in eval mode with its vocabulary; see the module docstring.

    Item lookups (``row``, ``knows``, ``item_id``, ``item_ids``, ``n_items``) delegate to :attr:`vocab`.
    """

    def __init__(self, checkpoint: Checkpoint, state_dtype: str | None = None) -> None:
        if not isinstance(checkpoint.model, HyTRec):
            raise ValueError(f"model type {checkpoint.model_type!r} cannot be served incrementally")
        self.model: HyTRec = checkpoint.model.eval()
        self.cfg: HyTRecConfig = checkpoint.config
        self.version = checkpoint.version
        self.model_type = checkpoint.model_type
        self.vocab: Vocab = checkpoint.vocab
        self.item_ids: list[str] = self.vocab.ids
        self.state_dtype = state_dtype or self.cfg.state_dtype
        self._popular: list[int] = self.vocab.by_popularity().tolist()
        self._popularity: list[int] = self.vocab.popularity.tolist()

    @classmethod
    def load(cls, directory: str | Path, state_dtype: str | None = None) -> ServingModel:
        return cls(load_checkpoint(directory), state_dtype)

    @property
    def n_items(self) -> int:
        return self.cfg.n_items

    def row(self, item_id: str) -> int:
        """Embedding row of an external item id (UNKNOWN_ROW if the catalogue does not have it)."""
        return self.vocab.row(item_id)

    def knows(self, item_id: str) -> bool:
        return self.vocab.knows(item_id)

    def item_id(self, row: int) -> str | None:
        return self.vocab.item_id(row)

    # -------------------------------------------------------------------------------------- codec
    def encode(self, state: StateBatch) -> bytes:
        return encode_state(state, self.cfg, self.version, self.state_dtype)

    def decode(self, blob: bytes) -> StateBatch:
        return decode_state(blob, self.cfg, self.version)

    def empty_state(self) -> StateBatch:
        return StateBatch.empty(self.cfg, 1)

    # ----------------------------------------------------------------------------- hot path: events
    @torch.inference_mode()
    def advance(self, states: Sequence[StateBatch | None], events: Sequence[Sequence[tuple[int, float]]]) -> StateBatch:
        """Apply each user's events (item row, timestamp), in order, to their state.

        Users with at least one chunk of events (``chunk_size``) go through the chunked parallel form from
        their stored state, one pass each group; the others advance together by one batched step per event
        position, so the cost is (longest short list) steps whatever the number of users. Both compute the
        same function (tests/test_parity.py).
        """
        batch = StateBatch.cat([s if s is not None else self.empty_state() for s in states])
        lengths = [len(e) for e in events]
        if not any(lengths):
            return batch
        chunk = self.cfg.chunk_size
        long_users = [i for i, n in enumerate(lengths) if n >= chunk]
        if not long_users:
            return self._steps(batch, events)
        if len(long_users) == len(events):
            return self._extend(batch, events)
        short_users = [i for i, n in enumerate(lengths) if n < chunk]
        parts: dict[int, StateBatch] = {}
        for group, fn in ((long_users, self._extend), (short_users, self._steps)):
            done = fn(StateBatch.cat([batch.user(i) for i in group]), [events[i] for i in group])
            parts.update({u: done.user(j) for j, u in enumerate(group)})
        return StateBatch.cat([parts[i] for i in range(len(events))])

    @staticmethod
    def _padded(events: Sequence[Sequence[tuple[int, float]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        longest = max(len(e) for e in events)
        items = torch.full((len(events), longest), PAD_ROW, dtype=torch.int64)
        times = torch.zeros(len(events), longest, dtype=torch.float64)
        for i, user_events in enumerate(events):
            if user_events:
                rows, ts = zip(*user_events, strict=True)
                items[i, : len(rows)] = torch.tensor(rows)
                times[i, : len(ts)] = torch.tensor(ts, dtype=torch.float64)
        return items, times, torch.tensor([len(e) for e in events])

    def _extend(self, batch: StateBatch, events: Sequence[Sequence[tuple[int, float]]]) -> StateBatch:
        items, times, counts = self._padded(events)
        return self.model.extend_state(batch, items, times, counts)

    def _steps(self, batch: StateBatch, events: Sequence[Sequence[tuple[int, float]]]) -> StateBatch:
        items, times, counts = self._padded(events)
        for t in range(items.shape[1]):
            active = counts > t
            batch = self.model.step(batch, items[:, t], times[:, t], None if bool(active.all()) else active)
        return batch

    @torch.inference_mode()
    def build(self, rows: Sequence[int], times: Sequence[float]) -> StateBatch:
        """A state from a whole history in one parallel pass (backfill, offline recommend)."""
        items = torch.tensor([list(rows)], dtype=torch.int64)
        ts = torch.tensor([list(times)], dtype=torch.float64)
        return self.model.build_state(items, ts, torch.tensor([len(rows)]))

    # --------------------------------------------------------------------------- hot path: top-K
    @torch.inference_mode()
    def recommend(
        self,
        states: StateBatch,
        now: Sequence[float],
        k: int,
        exclude_seen: Sequence[bool],
        masks: Sequence[ItemMask | None] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> list[Recommendation]:
        """Top-k items for B users at request times ``now``: one catalogue product for the whole batch.

        ``exclude_seen`` removes the items in each user's ring buffer (their last K events). ``masks`` (per
        user, None or an :class:`ItemMask`) remove more items, as -inf on the scores before the one top-k;
        ``offsets`` skips that many of the best survivors (paging). Fewer than k items come back when fewer
        survive: nothing is padded. ``filtered_out`` counts the items the masks removed.
        """
        u = self.model.user_vector(states, torch.tensor(list(now), dtype=torch.float64))
        scores = self.model.item_scores(u)
        drop = torch.tensor(list(exclude_seen))[:, None] & (states.ring_items >= FIRST_ITEM_ROW)
        removed = [0] * len(exclude_seen)
        if bool(drop.any()):
            users, slots = drop.nonzero(as_tuple=True)
            scores[users, states.ring_items[users, slots] - FIRST_ITEM_ROW] = float("-inf")
            removed = _distinct(torch.where(drop, states.ring_items, -1)).tolist()
        if masks is not None and any(m is not None for m in masks):
            apply_drops(scores, masks)
            for i, m in enumerate(masks):
                if m is not None:
                    seen = states.ring_items[i][drop[i]] - FIRST_ITEM_ROW if exclude_seen[i] else None
                    removed[i] = m.count(seen)
        return self._top(scores, k, offsets, removed, masks)

    def _top(
        self,
        scores: torch.Tensor,
        k: int,
        offsets: Sequence[int] | None,
        removed: Sequence[int],
        masks: Sequence[ItemMask | None] | None = None,
    ) -> list[Recommendation]:
        """Each row's best ``k`` after its offset, ``-inf`` (masked) items dropped; a row with categories
        selects among their items only (a gather of ``keep``, then a top-k over it)."""
        skip = list(offsets) if offsets is not None else [0] * scores.shape[0]
        kk = min(k + max(skip, default=0), scores.shape[1])
        cats = [i for i, m in enumerate(masks or ()) if m is not None and m.keep is not None]
        plain = [i for i in range(scores.shape[0]) if i not in set(cats)] if cats else None
        all_values: list[list[float]] = [[] for _ in range(scores.shape[0])]
        all_indices: list[list[int]] = [[] for _ in range(scores.shape[0])]
        if plain is None or plain:  # rows without categories: one batched top-k over the catalogue
            rows = scores if plain is None else scores[plain]
            top = rows.topk(kk, dim=1)
            for i, v, j in zip(plain or range(scores.shape[0]), top.values.tolist(), top.indices.tolist(), strict=True):
                all_values[i], all_indices[i] = v, j
        for i in cats:
            keep = masks[i].keep  # type: ignore[index, union-attr]
            sub = scores[i, keep].topk(min(kk, int(keep.numel())))
            all_values[i], all_indices[i] = sub.values.tolist(), keep[sub.indices].tolist()
        out = []
        for values, indices, off, n in zip(all_values, all_indices, skip, removed, strict=True):
            keep = [(self.item_ids[i], v) for i, v in zip(indices[off : off + k], values[off : off + k], strict=True)]
            keep = [(i, v) for i, v in keep if v != float("-inf")]
            out.append(Recommendation([i for i, _ in keep], [v for _, v in keep], n))
        return out

    @torch.inference_mode()
    def rank(self, states: StateBatch, now: Sequence[float], candidates: Sequence[torch.Tensor]) -> list[list[float]]:
        """Scores of each user's candidate items (int64 item indices): O(candidates), not O(catalogue).

        Gathers the candidates' embedding rows and takes their products with the user vector: the same
        numbers as the catalogue product (up to float32 rounding of the summation order).
        """
        u = self.model.user_vector(states, torch.tensor(list(now), dtype=torch.float64))
        lengths = [int(c.numel()) for c in candidates]
        padded = torch.zeros(len(candidates), max(lengths, default=0), dtype=torch.int64)
        for i, c in enumerate(candidates):
            padded[i, : lengths[i]] = c
        emb = self.model.item_emb.weight[padded + FIRST_ITEM_ROW]  # (B, m, d): one gather, one batched product
        scores = (emb @ u[:, :, None]).squeeze(-1).tolist()
        return [row[:n] for row, n in zip(scores, lengths, strict=True)]

    @torch.inference_mode()
    def similar(self, index: int, k: int, mask: ItemMask | None = None, offset: int = 0) -> Recommendation:
        """The ``k`` items nearest item ``index`` by cosine of the item embeddings (exact), itself excluded."""
        scores = (self._unit @ self._unit[index])[None]
        scores[0, index] = float("-inf")
        apply_drops(scores, [mask])
        removed = mask.count(torch.tensor([index])) if mask is not None else 1
        return self._top(scores, k, [offset], [removed], [mask])[0]

    @cached_property
    def _unit(self) -> torch.Tensor:
        """Item embeddings normalised once (rows in item-index order), for cosine similarity."""
        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.item_emb.weight[FIRST_ITEM_ROW:].detach().float(), dim=1)

    @torch.inference_mode()
    def session_state(self, events: Sequence[tuple[int, float]]) -> StateBatch:
        """The state a fresh user would have after ``events`` and one store round trip: the same ``advance`` as
        ingestion, then encoded and decoded with the storage codec (a stored state is read back that way)."""
        return self.decode(self.encode(self.advance([None], [list(events)])))

    def popular_filtered(self, k: int, mask: ItemMask | None = None, offset: int = 0) -> Recommendation:
        """The popularity fallback under a mask: the most popular items that survive it, paged."""
        order = self._popular_order
        removed = 0
        if mask is not None:
            order = order[~mask.banned(self.n_items)[order]]
            removed = mask.count()
        top = order[offset : offset + k].tolist()
        return Recommendation([self.item_ids[i] for i in top], [self._popular_share[i] for i in top], removed)

    @cached_property
    def _popular_order(self) -> torch.Tensor:
        return torch.tensor(self._popular, dtype=torch.int64)

    @cached_property
    def _popular_share(self) -> list[float]:
        total = float(sum(self._popularity)) or 1.0
        return [p / total for p in self._popularity]

    def popularity_scores(self, indices: Sequence[int]) -> list[float]:
        """The fallback's score (share of training interactions) of each item index."""
        share = self._popular_share
        return [share[i] for i in indices]

    def popular(self, k: int, exclude: Sequence[str] = ()) -> Recommendation:
        """Cold-start fallback: the most popular training items (score = share of interactions)."""
        total = float(sum(self._popularity)) or 1.0
        skip = set(exclude)
        ids, scores = [], []
        for i in self._popular:
            if self.item_ids[i] in skip:
                continue
            ids.append(self.item_ids[i])
            scores.append(self._popularity[i] / total)
            if len(ids) == k:
                break
        return Recommendation(ids, scores)


def _distinct(rows: torch.Tensor) -> torch.Tensor:
    """Distinct non-negative values per row of a small (B, K) int tensor (the seen items of a ring buffer)."""
    r = rows.sort(dim=1).values
    new = torch.ones_like(r, dtype=torch.bool)
    new[:, 1:] = r[:, 1:] != r[:, :-1]
    return (new & (r >= 0)).sum(dim=1)
