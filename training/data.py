"""Interaction logs in memory: per-user sequences, leave-one-out split and padded batches.

Files are read by :func:`hytrec.eventlog.read_events` (format described there). Layout in memory
(:class:`Interactions`): one sequence per user in CSR form: vocab rows ``items[offsets[u]:offsets[u+1]]``
and ``timestamps`` over the same slice, each user's events sorted by time with ties kept in file order, or,
given a ``tie_seed``, in a seeded random order. Some public files order a second's events by item id, which a model
can learn (42 % of ML-1M test events share their second with the event before), so a random tie order checks
that a result does not lean on it.
Item rows come from :class:`hytrec.model.vocab.Vocab` (padding, unknown, then the items).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hytrec.eventlog import read_events
from hytrec.model.vocab import PAD_ROW, Vocab

# History-length buckets for per-bucket metrics: [0, 100), [100, 500), [500, 1000), [1000, inf).
BUCKET_EDGES = (100, 500, 1000)
BUCKET_LABELS = ("<100", "100-499", "500-999", ">=1000")


# --------------------------------------------------------------------------------------------- sequences


@dataclass(frozen=True, eq=False)
class Interactions:
    """Per-user event sequences in CSR form, each sorted by time (ties in file order).

    ``items[offsets[u]:offsets[u + 1]]`` (int64 vocab rows) and ``timestamps[...]`` (float64 seconds) are
    sequence ``u``, whose external id is ``user_ids[u]``.
    """

    user_ids: list[str]
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    vocab: Vocab

    @classmethod
    def from_file(cls, path: str | Path, vocab: Vocab | None = None, tie_seed: int | None = None) -> Interactions:
        """Load a file; build the vocabulary from its items unless ``vocab`` is given (then unknown -> UNKNOWN_ROW).

        Users keep their order of first appearance in the file. ``tie_seed``: see :meth:`from_events`.
        """
        users, items, ts = read_events(path)
        return cls.from_events(users, items, ts, vocab, tie_seed=tie_seed)

    @classmethod
    def from_events(
        cls,
        users: Sequence[str] | np.ndarray,
        items: Sequence[str] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
        vocab: Vocab | None = None,
        tie_seed: int | None = None,
    ) -> Interactions:
        """Build from parallel arrays of events in file order (see :meth:`from_file`).

        A user's events with equal timestamps keep file order, or, with ``tie_seed``, the order of one random
        permutation of the file's lines drawn from that seed: the same order for every run given the same
        file and seed, so training and evaluation see one sequence.
        """
        users = np.asarray(users, dtype=str)
        items = np.asarray(items, dtype=str)
        ts = np.asarray(timestamps, dtype=np.float64)
        if not (len(users) == len(items) == len(ts)):
            raise ValueError("users, items and timestamps must have the same length")
        if vocab is None:
            vocab = Vocab.build(items)
        uniq, first, inverse = np.unique(users, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")  # users in order of first appearance
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[by_first] = np.arange(len(uniq))
        code = rank[inverse.ravel()]
        if tie_seed is None:
            order = np.lexsort((ts, code))  # stable: equal (user, ts) keep file order
        else:
            tiebreak = np.random.default_rng(tie_seed).permutation(len(ts))
            order = np.lexsort((tiebreak, ts, code))
        counts = np.bincount(code, minlength=len(uniq))
        offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(
            user_ids=uniq[by_first].tolist(),
            offsets=offsets,
            items=vocab.encode(items[order]),
            timestamps=ts[order],
            vocab=vocab,
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """Events per sequence (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.n_users

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, timestamps) of sequence ``u`` (views, do not modify)."""
        lo, hi = self.offsets[u], self.offsets[u + 1]
        return self.items[lo:hi], self.timestamps[lo:hi]

    def take_prefixes(self, lengths: np.ndarray, index: np.ndarray | None = None) -> Interactions:
        """New CSR holding the first ``lengths[k]`` events of sequence ``index[k]`` (default: every user)."""
        index = np.arange(self.n_users) if index is None else np.asarray(index, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) != len(index) or (lengths < 0).any() or (lengths > self.lengths[index]).any():
            raise ValueError("take_prefixes: lengths must lie in [0, sequence length]")
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(self.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Interactions(
            user_ids=[self.user_ids[i] for i in index.tolist()],
            offsets=offsets,
            items=self.items[gather],
            timestamps=self.timestamps[gather],
            vocab=self.vocab,
        )


# --------------------------------------------------------------------------------------------- split


@dataclass(frozen=True, eq=False)
class EvalSet:
    """One prediction per evaluated user: the history the model sees, the target and the request time.

    ``history`` is an :class:`Interactions` whose sequence ``k`` is the history of prediction ``k``;
    ``user_index[k]`` is that user's index in the full data.
    """

    history: Interactions
    targets: np.ndarray  # int64 vocab rows, (n,)
    request_ts: np.ndarray  # float64 seconds, (n,)
    user_index: np.ndarray  # int64, (n,)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def history_lengths(self) -> np.ndarray:
        return self.history.lengths

    @property
    def buckets(self) -> np.ndarray:
        """History-length bucket of each prediction (see :func:`length_buckets`)."""
        return length_buckets(self.history.lengths)


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split. ``train``: per user, every event but the last two (all events for users with
    fewer than 3); ``valid``: history = train events, target = second last; ``test``: history = every event
    but the last (train + valid), target = last."""

    data: Interactions
    train: Interactions
    valid: EvalSet
    test: EvalSet


def leave_one_out(data: Interactions) -> Split:
    """Leave-one-out per user: last event = test, second last = validation, the rest = train.

    Users with fewer than 3 events are kept whole in ``train`` and get no validation or test prediction
    (they cannot supply a training prefix, a validation and a test event). Request time = the target's
    timestamp.
    """
    lengths = data.lengths
    evaluated = np.flatnonzero(lengths >= 3)
    train_len = np.where(lengths >= 3, lengths - 2, lengths)
    train = data.take_prefixes(train_len)
    last = data.offsets[1:][evaluated] - 1

    def eval_set(history_len: np.ndarray, target_pos: np.ndarray) -> EvalSet:
        return EvalSet(
            history=data.take_prefixes(history_len, evaluated),
            targets=data.items[target_pos],
            request_ts=data.timestamps[target_pos],
            user_index=evaluated.astype(np.int64),
        )

    valid = eval_set(lengths[evaluated] - 2, last - 1)
    test = eval_set(lengths[evaluated] - 1, last)
    return Split(data=data, train=train, valid=valid, test=test)


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket index (int64, 0..3, labels :data:`BUCKET_LABELS`) of each history length.

    The evaluator buckets by the length of the history the model sees for the prediction (for the test
    prediction: every event but the last, so a user with exactly 500 events falls in ``100-499``).
    """
    return np.searchsorted(np.asarray(BUCKET_EDGES), np.asarray(lengths), side="right").astype(np.int64)


# --------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)
class Batch:
    """Right-padded sequences. Padding: item row 0, timestamp = the sequence's last real timestamp.

    ``index[b]`` is the sequence's index in the source :class:`Interactions`.
    """

    items: np.ndarray  # int64 (B, L)
    timestamps: np.ndarray  # float64 (B, L)
    lengths: np.ndarray  # int64 (B,)
    index: np.ndarray  # int64 (B,)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Padded size B * L."""
        return int(self.items.size)

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        """Tensors ``items``, ``timestamps`` (float64), ``lengths``, ``index`` on ``device``."""
        import torch

        return {
            name: torch.from_numpy(getattr(self, name)).to(device)
            for name in ("items", "timestamps", "lengths", "index")
        }


def make_batch(data: Interactions, index: np.ndarray, max_len: int | None = None) -> Batch:
    """Pad sequences ``index`` of ``data`` (each truncated to its LAST ``max_len`` events if given)."""
    index = np.asarray(index, dtype=np.int64)
    full = data.lengths[index]
    used = full if max_len is None else np.minimum(full, max_len)
    width = int(used.max()) if len(used) else 0
    start = data.offsets[index] + (full - used)
    col = np.arange(width)
    gather = start[:, None] + np.minimum(col[None, :], np.maximum(used - 1, 0)[:, None])
    pad = col[None, :] >= used[:, None]
    if data.n_events:
        items = data.items[gather]
        ts = data.timestamps[gather]
    else:
        items = np.zeros((len(index), width), dtype=np.int64)
        ts = np.zeros((len(index), width), dtype=np.float64)
    items[pad] = PAD_ROW
    ts[used == 0] = 0.0
    return Batch(items=items, timestamps=ts, lengths=used.astype(np.int64), index=index)


def _pack(order: np.ndarray, lengths: np.ndarray, max_tokens: int, max_batch_size: int | None) -> list[np.ndarray]:
    """Greedily cut ``order`` (sorted by ascending length) into runs whose padded size fits ``max_tokens``.

    A sequence longer than ``max_tokens`` forms a batch of its own (never truncated here).
    """
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    cap = max_batch_size or n
    while start < n:
        end = start + 1
        while end < n and end - start < cap and (end - start + 1) * int(lengths[order[end]]) <= max_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def epoch_plan(
    data: Interactions,
    max_tokens: int,
    *,
    seed: int | np.random.Generator = 0,
    max_len: int | None = None,
    max_batch_size: int | None = None,
    min_len: int = 2,
    bucket_size: int | None = None,
) -> list[np.ndarray]:
    """The sequence indices of each batch of one shuffled epoch, in order (see :func:`train_batches`).

    A function of ``data``'s lengths and the generator's state only, so every process of a data-parallel run
    computes the same plan from the same seed, and a resumed run recomputes it from the saved state.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lengths = data.lengths if max_len is None else np.minimum(data.lengths, max_len)
    keep = np.flatnonzero(lengths >= max(min_len, 1))
    keep = keep[rng.permutation(len(keep))]
    step = bucket_size or max(len(keep), 1)
    batches: list[np.ndarray] = []
    for lo in range(0, len(keep), step):
        chunk = keep[lo : lo + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_pack(chunk, lengths, max_tokens, max_batch_size))
    return [batches[b] for b in rng.permutation(len(batches))]


def train_batches(
    data: Interactions,
    max_tokens: int,
    *,
    seed: int | np.random.Generator = 0,
    max_len: int | None = None,
    max_batch_size: int | None = None,
    min_len: int = 2,
    bucket_size: int | None = None,
) -> Iterator[Batch]:
    """One shuffled epoch of length-bucketed, padded batches.

    Sequences (truncated to their last ``max_len`` events if given; shorter than ``min_len`` skipped) are
    shuffled, grouped into buckets of ``bucket_size`` sequences (default: one bucket), sorted by length in
    each bucket (random order among equal lengths) and packed so that batch size x padded length <=
    ``max_tokens`` (and batch size <= ``max_batch_size``); a longer sequence is a batch on its own. Batch
    order is then shuffled. ``seed``: an int or a numpy Generator (pass one Generator across epochs).
    """
    plan = epoch_plan(
        data,
        max_tokens,
        seed=seed,
        max_len=max_len,
        max_batch_size=max_batch_size,
        min_len=min_len,
        bucket_size=bucket_size,
    )
    for index in plan:
        yield make_batch(data, index, max_len)


def eval_batches(
    data: Interactions,
    max_tokens: int,
    *,
    max_len: int | None = None,
    max_batch_size: int | None = None,
) -> Iterator[Batch]:
    """Deterministic batches covering every non-empty sequence once, by ascending length (ties by index).

    Use ``batch.index`` to match rows with per-sequence arrays (e.g. ``EvalSet.targets[batch.index]``).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    lengths = data.lengths if max_len is None else np.minimum(data.lengths, max_len)
    keep = np.flatnonzero(lengths >= 1)
    order = keep[np.argsort(lengths[keep], kind="stable")]
    for idx in _pack(order, lengths, max_tokens, max_batch_size):
        yield make_batch(data, idx, max_len)
