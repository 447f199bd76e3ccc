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
class HiddenItems:
    """A catalogue's hidden items, built once per change of the set and shared by every mask: ``rows`` (sorted,
    distinct item indices, for the writes), ``flags`` (bool (n_items,)) and ``members`` for membership."""

    rows: torch.Tensor
    flags: torch.Tensor
    members: frozenset[int]  # the same, for the Python-side counts of small batches

    @classmethod
    def of(cls, rows: Sequence[int], n_items: int) -> HiddenItems:
        members = frozenset(rows)
        index = torch.tensor(sorted(members), dtype=torch.int64)
        flags = torch.zeros(n_items, dtype=torch.bool)
        flags[index] = True
        return cls(index, flags, members)


@dataclass(frozen=True)
class ItemMask:
    """Items a request may not be shown: ``drop`` (the request's own item indices, duplicates allowed),
    ``hidden`` (the catalogue's hidden items, shared by every mask, never copied per request) and, when set,
    every item ``outside`` (a shared, never mutated bool (n_items,) tensor: True for the items outside the asked
    categories; ``keep`` lists the others). Built from indices and cached unions, so its cost grows with the
    ids named, not with the catalogue: the top-k of a category request selects among ``keep`` only, no pass
    over the whole row."""

    drop: torch.Tensor
    outside: torch.Tensor | None = None
    outside_count: int = 0  # items ``outside`` marks (counted once, when the union was built)
    keep: torch.Tensor | None = None  # sorted indices of the items not ``outside`` (the top-k looks only there)
    hidden: HiddenItems | None = None

    def count(self, seen: torch.Tensor | None = None) -> int:
        """Items the mask removes, together with the ``seen`` item indices: O(drop + seen + hidden), not O(n)."""
        parts = [self.drop] + ([seen] if seen is not None and seen.numel() else [])
        parts += [self.hidden.rows] if self.hidden is not None else []
        extra = torch.unique(torch.cat(parts))
        if self.outside is not None:
            extra = extra[~self.outside[extra]]
        return self.outside_count + int(extra.numel())

    def banned(self, n_items: int) -> torch.Tensor:
        """The mask as a fresh bool (n_items,) tensor."""
        out = self.outside.clone() if self.outside is not None else torch.zeros(n_items, dtype=torch.bool)
        out[self.drop] = True
        if self.hidden is not None:
            out |= self.hidden.flags
        return out

    def removes(self, indices: torch.Tensor) -> torch.Tensor:
        """Which of ``indices`` the mask removes (bool, same shape)."""
        out = torch.isin(indices, self.drop)
        if self.hidden is not None:
            out |= self.hidden.flags[indices]
        if self.outside is not None:
            out |= self.outside[indices]
        return out


_NEG_INF = float("-inf")


def apply_masks(
    scores: torch.Tensor, masks: Sequence[ItemMask | None], seen: tuple[torch.Tensor, torch.Tensor] | None = None
) -> list[int | None]:
    """-inf on the items each row's mask removes, in place on ``scores`` (B, n_items), and each masked row's
    count of distinct removed items (None for rows without a mask), the ``seen`` (row, item index) pairs
    (already -inf) counted in.

    Batched, not per row: the (row, item) pairs of every request's own ids and seen items are written in one
    indexed write and each shared hidden set (one in the service) in one ``index_fill_``; the pairs are counted
    once, minus those a row's hidden set or categories already count (Python sets for a few pairs, where a
    dozen torch calls would cost more; :func:`_distinct_pairs` for many). The items outside a row's categories
    are not written (``_top`` selects among its ``keep`` only) but counted from the cached union's size.
    """
    b = scores.shape[0]
    rows = [i for i, m in enumerate(masks) if m is not None]
    counts: list[int | None] = [None] * b
    if not rows:
        return counts
    ms: list[ItemMask] = [masks[i] for i in rows]  # type: ignore[misc]
    lengths = [int(m.drop.numel()) for m in ms]
    r = torch.repeat_interleave(torch.tensor(rows), torch.tensor(lengths)) if len(rows) > 1 else None
    c = torch.cat([m.drop for m in ms]) if len(rows) > 1 else ms[0].drop
    if r is None:
        r = torch.full(c.shape, rows[0], dtype=torch.int64)
    if seen is not None and seen[0].numel():
        if len(rows) == b:
            r, c = torch.cat([r, seen[0]]), torch.cat([c, seen[1]])
        else:
            masked = torch.zeros(b, dtype=torch.bool)
            masked[rows] = True
            on = masked[seen[0]]
            r, c = torch.cat([r, seen[0][on]]), torch.cat([c, seen[1][on]])
    groups: dict[tuple[int, int], tuple[HiddenItems | None, torch.Tensor | None, list[int]]] = {}
    for i, m in zip(rows, ms, strict=True):
        groups.setdefault((id(m.hidden), id(m.outside)), (m.hidden, m.outside, []))[2].append(i)
    shared = [0] * b  # hidden items a row counts beyond its categories' union
    for hidden, outside, members in groups.values():
        if hidden is not None and hidden.rows.numel():
            n_shared = int(hidden.rows.numel()) if outside is None else int((~outside[hidden.rows]).sum())
            for i in members:
                shared[i] = n_shared
    if r.numel() <= SMALL_PAIRS:
        distinct = _distinct_small(r, c, rows, ms, b)
    else:
        distinct = _distinct_pairs(scores, r, c, _counted_elsewhere(r, c, groups, b))
    if r.numel():
        scores.index_put_((r, c), torch.tensor(_NEG_INF, dtype=scores.dtype))
    for hidden, _, members in groups.values():
        if hidden is None or not hidden.rows.numel():
            continue
        if len(members) == b:
            scores.index_fill_(1, hidden.rows, _NEG_INF)
        else:
            scores[torch.tensor(members)[:, None], hidden.rows[None, :]] = _NEG_INF
    for i, m in zip(rows, ms, strict=True):
        counts[i] = distinct[i] + shared[i] + m.outside_count
    return counts


SMALL_PAIRS = 2048  # up to this many (row, item) pairs a batch is counted with Python sets


def _distinct_small(r: torch.Tensor, c: torch.Tensor, rows: list[int], ms: list[ItemMask], b: int) -> list[int]:
    """Distinct pairs per row not already counted by the row's hidden set or categories, in Python sets."""
    per_row: dict[int, set[int]] = {}
    for i, j in zip(r.tolist(), c.tolist(), strict=True):
        per_row.setdefault(i, set()).add(j)
    out = [0] * b
    for i, m in zip(rows, ms, strict=True):
        items = per_row.get(i)
        if not items:
            continue
        if m.hidden is not None:
            items -= m.hidden.members
        if m.outside is not None and items:
            out[i] = int((~m.outside[torch.tensor(list(items), dtype=torch.int64)]).sum())
        else:
            out[i] = len(items)
    return out


def _counted_elsewhere(
    r: torch.Tensor,
    c: torch.Tensor,
    groups: dict[tuple[int, int], tuple[HiddenItems | None, torch.Tensor | None, list[int]]],
    b: int,
) -> torch.Tensor:
    """Bool per pair: its item is hidden or outside the categories for its row (counted by the shared parts)."""
    counted = torch.zeros(r.shape, dtype=torch.bool)
    for hidden, outside, members in groups.values():
        if hidden is None and outside is None:
            continue
        hit = hidden.flags[c] if hidden is not None else torch.zeros(c.shape, dtype=torch.bool)
        if outside is not None:
            hit |= outside[c]
        if len(groups) == 1:
            return hit
        member = torch.zeros(b, dtype=torch.bool)
        member[members] = True
        counted |= member[r] & hit
    return counted


_STAMP = {4: torch.int32, 8: torch.int64}


def _distinct_pairs(scores: torch.Tensor, r: torch.Tensor, c: torch.Tensor, skip: torch.Tensor) -> list[int]:
    """Distinct (row r, column c) pairs per row of ``scores``, the pairs flagged in ``skip`` left out; the cells
    are left garbage (the caller writes -inf over them). O(pairs), no sort: each pair writes its own number
    into its cell (seen as integers), and of the pairs that share a cell exactly one, the last writer, reads
    its number back. Falls back to a ``unique`` over r * n + c for element sizes without an integer view."""
    b, n = scores.shape
    if not r.numel():
        return [0] * b
    stamp_dtype = _STAMP.get(scores.element_size())
    if stamp_dtype is None or r.numel() >= torch.iinfo(stamp_dtype).max:
        keys = torch.unique(torch.where(skip, -1, r * n + c))
        keys = keys[keys >= 0]
        return torch.bincount(torch.div(keys, n, rounding_mode="floor"), minlength=b).tolist()
    cells = scores.view(stamp_dtype)
    stamp = torch.arange(r.numel(), dtype=stamp_dtype)
    cells.index_put_((r, c), stamp)
    won = (cells[r, c] == stamp) & ~skip
    return torch.zeros(b, dtype=torch.int64).index_add_(0, r, won.to(torch.int64)).tolist()


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
        seen = None
        if bool(drop.any()):
            users, slots = drop.nonzero(as_tuple=True)
            seen = (users, states.ring_items[users, slots] - FIRST_ITEM_ROW)
            scores[seen] = float("-inf")
            removed = _distinct(torch.where(drop, states.ring_items, -1)).tolist()
        if masks is not None:
            counts = apply_masks(scores, masks, seen)
            removed = [n if n is not None else r for n, r in zip(counts, removed, strict=True)]
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
        plain = sorted(set(range(scores.shape[0])).difference(cats)) if cats else None
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
        counted = apply_masks(scores, [mask], (torch.zeros(1, dtype=torch.int64), torch.tensor([index])))[0]
        removed = counted if counted is not None else 1
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
