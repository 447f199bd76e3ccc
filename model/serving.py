"""A checkpoint ready to serve: item ids <-> rows, the state codec, and the two batched hot paths.

Everything torch-side that the service and the offline ``hytrec recommend`` do goes through here, so the
service stays a thin layer and both give the same answer. Nothing here knows HTTP or Redis. The methods
are synchronous CPU work: the service runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
        self, states: StateBatch, now: Sequence[float], k: int, exclude_seen: Sequence[bool]
    ) -> list[Recommendation]:
        """Top-k items for B users at request times ``now``: one catalogue product for the whole batch.

        ``exclude_seen`` removes the items in each user's ring buffer (their last K events).
        """
        u = self.model.user_vector(states, torch.tensor(list(now), dtype=torch.float64))
        scores = self.model.item_scores(u)
        drop = torch.tensor(list(exclude_seen))[:, None] & (states.ring_items >= FIRST_ITEM_ROW)
        if bool(drop.any()):
            users, slots = drop.nonzero(as_tuple=True)
            scores[users, states.ring_items[users, slots] - FIRST_ITEM_ROW] = float("-inf")
        top = scores.topk(min(k, self.n_items), dim=1)
        out = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            keep = [(self.item_ids[i], v) for i, v in zip(indices, values, strict=True) if v != float("-inf")]
            out.append(Recommendation([i for i, _ in keep], [v for _, v in keep]))
        return out

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
